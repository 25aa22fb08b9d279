#!/usr/bin/env python3
"""Writes an OCI image tarball of a busybox rootfs (from Debian's busybox-static) that
`ctr images import` accepts offline: oci-layout, index.json with the image name as
annotation, a manifest, a config, one gzip layer. Usage: make_image.py OUT.tar NAME
[--wasm DIR]: with --wasm, the layer holds DIR's .wasm files at its top (and the empty
directories a container's mounts need) and the entrypoint is /hello.wasm: a wasm image
as runwasi's examples are built, no busybox."""
import gzip, hashlib, io, json, os, subprocess, sys, tarfile, time

out, name = sys.argv[1], sys.argv[2]
wasm = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--wasm" else None
busybox = "/bin/busybox"
applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()

def add_dir(tar, path):
    ti = tarfile.TarInfo(path); ti.type = tarfile.DIRTYPE; ti.mode = 0o755; tar.addfile(ti)

def add_file(tar, path, data, mode=0o644):
    ti = tarfile.TarInfo(path); ti.size = len(data); ti.mode = mode; tar.addfile(ti, io.BytesIO(data))

raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "var", "usr", "usr/bin"] if wasm is None else ["dev", "etc", "proc", "sys", "tmp"]:
        add_dir(tar, d)
    for m in sorted(os.listdir(wasm)) if wasm else []:
        if m.endswith(".wasm"):
            with open(os.path.join(wasm, m), "rb") as f:
                add_file(tar, m, f.read(), 0o755)
    with open(busybox, "rb") as f:
        if wasm is None:
            add_file(tar, "bin/busybox", f.read(), 0o755)
    for a in applets if wasm is None else []:
        if a == "busybox":
            continue
        ti = tarfile.TarInfo("bin/" + a); ti.type = tarfile.SYMTYPE; ti.linkname = "busybox"; tar.addfile(ti)
    add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
    add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
layer_tar = raw.getvalue()
layer_gz = gzip.compress(layer_tar, mtime=0)

def digest(b): return "sha256:" + hashlib.sha256(b).hexdigest()

config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]} if wasm is None else
              {"Env": ["PATH=/"], "Entrypoint": ["/hello.wasm"]},
    "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
    "created": "2024-01-01T00:00:00Z",
}).encode()
manifest = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(layer_gz), "size": len(layer_gz)}],
}).encode()
index = json.dumps({
    "schemaVersion": 2,
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(manifest), "size": len(manifest),
                   "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest"},
                   "platform": {"architecture": "amd64", "os": "linux"}}],
}).encode()

with tarfile.open(out, "w") as tar:
    add_file(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add_file(tar, "index.json", index)
    for blob in (config, manifest, layer_gz):
        add_file(tar, "blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
