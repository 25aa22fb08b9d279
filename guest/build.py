#!/usr/bin/env python3
"""Builds the guest image for VM sandboxes: an uncompressed vmlinux (the PVH entry QEMU's
microvm boots fastest) and an initramfs holding the static `kuasar-agent` as /init and the
kernel modules it loads (and their dependencies), nothing else.

Reproducible: the same kernel package and agent give the same bytes (entries sorted, every
mtime, uid and gid 0, fixed inode numbers, lz4 legacy frames without timestamps).

    build.py --agent PATH --out DIR [--kernel-package NAME] [--cache DIR]
    build.py --baseline --out DIR      # initrd-baseline.lz4: a /init that only prints a
                                       # line (busybox), the benchmark's floor
"""
import argparse, hashlib, json, lzma, os, shutil, struct, subprocess, sys

# What the agent loads at boot (GuestInit.modules(for:): those its settings use) — each
# brings what its .modinfo says it needs. In the initramfs: every byte there is unpacked at
# every boot.
MODULES = ["virtio_mmio", "virtio_pci", "virtio_console", "virtio_net", "9pnet_virtio", "9p", "virtiofs",
           "vmw_vsock_virtio_transport", "virtio_balloon"]
# What PID 1's first C constructor loads on its boot thread, before the Swift runtime
# starts (Sources/CAgentInit): the serial channel's drivers, the channel every VM driver
# here configures (kuasar.channel=serial://agent). Written, dependencies first, to
# lib/modules/<release>/kuasar.boot; GuestInit loads what else its settings need (the PCI
# transport, vsock, a template's share) once that thread is done.
EARLY = ["virtio_mmio", "virtio_console"]
# What it loads on first use (overlay, a hot-plugged block rootfs's driver and filesystem):
# not in the initramfs but in DIR/modules/<release>/, which the host shares read-only into
# each VM's share (.modules). Their dependencies that are boot modules must be ones every
# boot loads (virtio, virtio_ring): they are left out of that modules.dep.
ON_DEMAND = ["overlay", "virtio_blk", "ext4"]
# Soft dependencies (.modinfo "softdep=pre: ..."), named by the module that provides them
# here: ext4 asks the crypto API for crc32c, which nothing loads by itself.
SOFTDEPS = {"ext4": ["crc32c_generic"]}


def run(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def kernel_package(name):
    """linux-image-amd64 is a metapackage: the image it depends on."""
    if not name.endswith("-amd64") or name.count("-") > 2:
        return name
    try:
        deps = run("apt-cache", "depends", name)
    except subprocess.CalledProcessError:
        run("apt-get", "update", "-qq")
        deps = run("apt-cache", "depends", name)
    for line in deps.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split(": ", 1)[1]
    sys.exit(f"build.py: apt-cache depends {name} names no linux-image package")


def unpack_kernel(package, cache):
    os.makedirs(cache, exist_ok=True)
    debs = [f for f in os.listdir(cache) if f.startswith(package + "_") and f.endswith(".deb")]
    if not debs:
        try:
            run("apt-get", "download", package, cwd=cache)
        except subprocess.CalledProcessError:
            # A fresh machine may have no package lists yet.
            run("apt-get", "update", "-qq")
            run("apt-get", "download", package, cwd=cache)
        debs = [f for f in os.listdir(cache) if f.startswith(package + "_") and f.endswith(".deb")]
    deb = os.path.join(cache, sorted(debs)[-1])
    root = os.path.join(cache, "root-" + os.path.basename(deb)[:-4])
    if not os.path.isdir(root):
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run("dpkg-deb", "-x", deb, tmp)
        os.rename(tmp, root)
    return deb, root


def extract_vmlinux(bzimage):
    """The bzImage's payload is an xz stream of the ELF vmlinux: find its magic, inflate
    the first stream (what follows it is the setup's trailer), check the ELF header."""
    data = open(bzimage, "rb").read()
    magic = b"\xfd7zXZ\x00"
    start = 0
    while True:
        i = data.find(magic, start)
        if i < 0:
            sys.exit(f"build.py: no xz payload in {bzimage}")
        try:
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[i:])
        except lzma.LZMAError:
            start = i + 1
            continue
        if out[:4] == b"\x7fELF":
            return out
        start = i + 1


def modinfo_depends(path):
    """The `depends=` of a module's .modinfo ELF section (what depmod reads)."""
    data = open(path, "rb").read()
    if path.endswith(".xz"):
        data = lzma.decompress(data)
    if data[:4] != b"\x7fELF" or data[4] != 2:
        sys.exit(f"build.py: {path} is not a 64-bit ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def section(i):
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size
    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if data[stroff + name: data.index(b"\0", stroff + name)] == b".modinfo":
            for entry in data[off: off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
            return []
    return []


def module_files(moddir, mods):
    """Each module of `mods` (module_closure's) as (path in the tree, bytes: uncompressed,
    signature stripped), and the modules.dep text listing them with their dependencies
    among `mods`."""
    plain = lambda p: p[:-3] if p.endswith(".xz") else p
    files, lines = [], []
    for name, path, deps in mods:
        data = open(os.path.join(moddir, path), "rb").read()
        if path.endswith(".xz"):
            data = lzma.decompress(data)
        files.append((plain(path), strip_signature(data)))
        lines.append("%s: %s" % (plain(path), " ".join(plain(p) for n, p, _ in mods if n in deps)))
    return files, "\n".join(sorted(lines)) + "\n"


def module_closure(moddir, wanted):
    """The wanted modules and everything they depend on, dependencies first. Uses
    modules.dep when the tree has one, else each module's own .modinfo (no kmod needed)."""
    paths = {}
    for dirpath, _, files in os.walk(os.path.join(moddir, "kernel")):
        for f in files:
            if ".ko" in f:
                rel = os.path.relpath(os.path.join(dirpath, f), moddir)
                paths[name_of(rel)] = rel
    chosen, order = set(), []

    def visit(m):
        if m in chosen or m not in paths:
            return  # built in, or absent from this kernel
        chosen.add(m)
        deps = [name_of(d) for d in modinfo_depends(os.path.join(moddir, paths[m]))] + SOFTDEPS.get(m, [])
        for d in deps:
            visit(d)
        order.append((m, paths[m], deps))

    for m in wanted:
        visit(m)
    return order


MODULE_SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(data):
    """Drops a module's appended signature. The kernel checks a signature it finds (an RSA
    verification per module: ~20 ms each under TCG, most of the boot's module loading);
    the image is the host's own and nothing enforces signatures in the guest, so its
    modules load unsigned (the guest kernel notes a taint once)."""
    if not data.endswith(MODULE_SIG_MAGIC):
        return data
    info = data[-len(MODULE_SIG_MAGIC) - 12: -len(MODULE_SIG_MAGIC)]
    signer_len, key_id_len = info[3], info[4]
    sig_len, = struct.unpack(">I", info[8:12])
    return data[: len(data) - len(MODULE_SIG_MAGIC) - 12 - sig_len - signer_len - key_id_len]


def name_of(path):
    base = os.path.basename(path)
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return base.replace("-", "_")


class Cpio:
    """newc archive with fixed metadata."""

    def __init__(self):
        self.out = bytearray()
        self.ino = 1

    def add(self, name, mode, data=b"", rdev=(0, 0)):
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out += hdr + name.encode() + b"\0"
        self.out += b"\0" * ((4 - len(self.out) % 4) % 4)
        self.out += data
        self.out += b"\0" * ((4 - len(self.out) % 4) % 4)

    def finish(self):
        self.add("TRAILER!!!", 0)
        self.out += b"\0" * ((512 - len(self.out) % 512) % 512)
        return bytes(self.out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--debug", action="store_true", help="add busybox (/bin/sh and its applets) for kuasar.debug=1's shell")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernel-package", default="linux-image-amd64")
    ap.add_argument("--cache", default=None)
    a = ap.parse_args()
    if a.baseline:
        return baseline(a.out)
    if not a.agent:
        sys.exit("build.py: --agent PATH (or --baseline)")
    cache = a.cache or os.path.join(a.out, "cache")
    package = kernel_package(a.kernel_package)
    deb, root = unpack_kernel(package, cache)
    release = package[len("linux-image-"):]
    vmlinux = extract_vmlinux(os.path.join(root, "boot", "vmlinuz-" + release))
    moddir = os.path.join(root, "lib", "modules", release)
    mods = module_closure(moddir, MODULES)

    entries = {}  # path -> (mode, data, rdev)
    for d in ["dev", "proc", "sys", "run", "tmp", "etc", "lib", "lib/modules", "lib/modules/" + release]:
        entries[d] = (0o040755, b"", (0, 0))
    entries["tmp"] = (0o041777, b"", (0, 0))
    # PID 1's stdio: the kernel opens /dev/console before /init runs.
    entries["dev/console"] = (0o020600, b"", (5, 1))
    entries["init"] = (0o100755, open(a.agent, "rb").read(), (0, 0))
    files, dep_text = module_files(moddir, mods)
    for path, data in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            entries["lib/modules/%s/%s" % (release, "/".join(parts[:i]))] = (0o040755, b"", (0, 0))
        entries["lib/modules/%s/%s" % (release, path)] = (0o100644, data, (0, 0))
    entries["lib/modules/%s/modules.dep" % release] = (0o100644, dep_text.encode(), (0, 0))
    plain = {n: (p[:-3] if p.endswith(".xz") else p) for n, p, _ in mods}
    early = [plain[n] for n, _, _ in module_closure(moddir, EARLY)]
    entries["lib/modules/%s/kuasar.boot" % release] = (0o100644, "".join(p + "\n" for p in early).encode(), (0, 0))
    if a.debug:
        entries["bin"] = (0o040755, b"", (0, 0))
        entries["sbin"] = (0o040755, b"", (0, 0))
        entries["bin/busybox"] = (0o100755, open("/bin/busybox", "rb").read(), (0, 0))
        for applet in run("/bin/busybox", "--list").split():
            if applet != "busybox":
                entries["bin/" + applet] = (0o120777, b"busybox", (0, 0))
    entries["etc/kuasar-guest"] = (0o100644, ("kernel %s\nagent %s\n" % (release, hashlib.sha256(entries["init"][1]).hexdigest())).encode(), (0, 0))

    cpio = Cpio()
    for path in sorted(entries):
        mode, data, rdev = entries[path]
        cpio.add(path, mode, data, rdev)
    archive = cpio.finish()

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "vmlinux.tmp"), "wb") as f:
        f.write(vmlinux)
    os.replace(os.path.join(a.out, "vmlinux.tmp"), os.path.join(a.out, "vmlinux"))
    raw = os.path.join(a.out, "initrd.cpio")
    with open(raw, "wb") as f:
        f.write(archive)
    # lz4 legacy frames (the kernel's lz4 initrd format), -9 for size; no timestamps.
    initrd = os.path.join(a.out, "initrd.lz4")
    subprocess.run(["lz4", "-l", "-9", "-f", "-q", raw, initrd + ".tmp"], check=True)
    os.replace(initrd + ".tmp", initrd)
    os.unlink(raw)
    # The on-demand modules, beside the image (shared into each VM read-only).
    boot_names = {n for n, _, _ in mods}
    extra = [m for m in module_closure(moddir, ON_DEMAND) if m[0] not in boot_names]
    shutil.rmtree(os.path.join(a.out, "modules"), ignore_errors=True)
    extra_root = os.path.join(a.out, "modules", release)
    extra_files, extra_dep = module_files(moddir, extra)
    extra_digest = hashlib.sha256()
    for path, data in extra_files:
        os.makedirs(os.path.dirname(os.path.join(extra_root, path)), exist_ok=True)
        with open(os.path.join(extra_root, path), "wb") as f:
            f.write(data)
        extra_digest.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
    os.makedirs(extra_root, exist_ok=True)
    with open(os.path.join(extra_root, "modules.dep"), "w") as f:
        f.write(extra_dep)
    for dirpath, dirs, files in os.walk(os.path.join(a.out, "modules")):
        for n in dirs + files:
            os.utime(os.path.join(dirpath, n), (0, 0))
    manifest = {
        "kernel": release,
        "onDemandModules": [m for m, _, _ in extra],
        "onDemandSha256": extra_digest.hexdigest(),
        "kernelPackage": os.path.basename(deb),
        "modules": [m for m, _, _ in mods],
        "sha256": {n: hashlib.sha256(open(os.path.join(a.out, n), "rb").read()).hexdigest() for n in ("vmlinux", "initrd.lz4")},
        "bytes": {n: os.path.getsize(os.path.join(a.out, n)) for n in ("vmlinux", "initrd.lz4")},
        "agentBytes": len(entries["init"][1]),
    }
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps(manifest, sort_keys=True))


def baseline(out):
    """The same kernel booting to the least an init can do: print one line on the console."""
    cpio = Cpio()
    script = b"#!/bin/busybox sh\n/bin/busybox echo kuasar-baseline-ready\nexec /bin/busybox sleep 3600\n"
    for path, mode, data, rdev in sorted([
            ("bin", 0o040755, b"", (0, 0)), ("bin/busybox", 0o100755, open("/bin/busybox", "rb").read(), (0, 0)),
            ("dev", 0o040755, b"", (0, 0)), ("dev/console", 0o020600, b"", (5, 1)), ("init", 0o100755, script, (0, 0))]):
        cpio.add(path, mode, data, rdev)
    os.makedirs(out, exist_ok=True)
    raw = os.path.join(out, "initrd-baseline.cpio")
    with open(raw, "wb") as f:
        f.write(cpio.finish())
    subprocess.run(["lz4", "-l", "-9", "-f", "-q", raw, os.path.join(out, "initrd-baseline.lz4")], check=True)
    os.unlink(raw)


if __name__ == "__main__":
    main()
