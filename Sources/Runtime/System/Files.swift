#if canImport(Glibc)
import Glibc
#endif
import CShims
import KuasarOCI

/// Small whole-file operations for /proc, /sys/fs/cgroup and state files.
public enum Files {
    public static func read(_ path: String, limit: Int = 1 << 20) throws(SystemError) -> [UInt8] {
        let fd = try sys("open", path) { open(path, O_RDONLY | O_CLOEXEC) }
        defer { _ = close(fd) }
        var out: [UInt8] = []
        // A regular file says its size (a module, compiled code: one allocation, not a
        // doubling per chunk); /proc and cgroup files say 0.
        var st = stat()
        if fstat(fd, &st) == 0, st.st_size > 0 { out.reserveCapacity(min(Int(st.st_size), limit)) }
        var chunk = [UInt8](repeating: 0, count: 16384)
        while out.count < limit {
            let n = try sys("read", path) { chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) } }
            if n == 0 { break }
            out.append(contentsOf: chunk[..<n])
        }
        return out
    }

    public static func readString(_ path: String) throws(SystemError) -> String {
        String(decoding: try read(path), as: UTF8.self)
    }

    /// Writes `value` in one write(2), as cgroup and proc files want.
    public static func write(_ path: String, _ value: String, create: Bool = false, mode: mode_t = 0o644) throws(SystemError) {
        let flags = O_WRONLY | O_CLOEXEC | (create ? O_CREAT | O_TRUNC : 0)
        let fd = try sys("open", path) { open(path, flags, mode) }
        defer { _ = close(fd) }
        let bytes = Array(value.utf8)
        _ = try sys("write", path) { bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } }
    }

    /// Replaces `path` atomically: a temporary file in the same directory, fsync, rename,
    /// fsync of the directory. A crash leaves either the old or the new content.
    /// `durable: false` skips the syncs, for what may be lost in a crash but must never be
    /// read half-written (a cache whose entries carry their own checksum): no disk wait.
    public static func writeAtomically(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o600, durable: Bool = true) throws(SystemError) {
        let tmp = path + ".tmp"
        let replacing = access(path, F_OK) == 0
        let fd = try sys("open", tmp) { open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode) }
        do throws(SystemError) {
            try writeAll(fd, bytes, name: tmp)
            if durable { _ = try sys("fdatasync", tmp) { fdatasync(fd) } }
        } catch {
            _ = close(fd)
            _ = unlink(tmp)
            throw error
        }
        _ = close(fd)
        _ = try sys("rename", path) { rename(tmp, path) }
        // A new name must reach the disk too; replacing one leaves the old or the new
        // content after a power cut, both complete.
        guard durable, !replacing else { return }
        let dir = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let dfd = open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { _ = fsync(dfd); _ = close(dfd) }
    }

    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// Opens `path` read-only as if `root` were "/": no symlink or ".." leads out of it
    /// (openat2 RESOLVE_IN_ROOT, no magic links). For files a container's root holds.
    /// open(2)'s O_PATH (Glibc's module leaves it out): a handle to a name, not its content.
    public static let pathOnly: Int32 = 0o10000000

    /// An anonymous file in memory (memfd, close-on-exec), `name` for /proc's eyes.
    /// `sealable`: its contents can later be frozen with `seal`.
    public static func memoryFile(_ name: String, sealable: Bool = false) throws(SystemError) -> Int32 {
        let fd = ks_memfd(name, sealable ? 1 : 0)
        guard fd >= 0 else { throw SystemError("memfd_create", name, errno: Errno(rawValue: -fd)) }
        return fd
    }

    /// A memfd holding `bytes`, sealed (`seal`).
    public static func sealedMemoryFile(_ name: String, _ bytes: [UInt8]) throws(SystemError) -> Int32 {
        let fd = try memoryFile(name, sealable: true)
        do throws(SystemError) {
            try writeAll(fd, bytes, name: name)
            try seal(fd)
        } catch {
            _ = close(fd)
            throw error
        }
        return fd
    }

    /// Every byte of `bytes` to the blocking descriptor `fd` (`name` in errors).
    public static func writeAll(_ fd: Int32, _ bytes: [UInt8], name: String) throws(SystemError) {
        var off = 0
        while off < bytes.count {
            off += try sys("write", name) { bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + off, $0.count - off) } }
        }
    }

    /// Freezes a sealable memfd's contents: no descriptor of it, in any process and with
    /// any privilege, can write, grow or shrink it again (what a container may read but
    /// must not alter).
    public static func seal(_ fd: Int32) throws(SystemError) {
        let rc = ks_seal_contents(fd)
        guard rc == 0 else { throw SystemError("seal memfd", nil, errno: Errno(rawValue: -rc)) }
    }

    public static func openInRoot(_ root: String, _ path: String) throws(SystemError) -> OwnedFD {
        let rootfd = open(root, Files.pathOnly | O_DIRECTORY | O_CLOEXEC)
        guard rootfd >= 0 else { throw SystemError("open", root, errno: .current) }
        defer { _ = close(rootfd) }
        let fd = ks_openat2(rootfd, path, O_RDONLY, UInt64(0x10 | 0x02))  // RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
        guard fd >= 0 else { throw SystemError("open in \(root)", path, errno: Errno(rawValue: -fd)) }
        return OwnedFD(adopting: fd)
    }

    /// A 128-bit content digest of the file (32 hex digits; not cryptographic: it tells a
    /// changed or corrupt file), and its size. ~GB/s: a 256 MiB VM image in a few 10 ms.
    public static func digest(_ path: String) throws(SystemError) -> (hex: String, size: UInt64) {
        let fd = try sys("open", path) { open(path, O_RDONLY | O_CLOEXEC) }
        defer { _ = close(fd) }
        var out: (UInt64, UInt64) = (0, 0)
        var size: UInt64 = 0
        _ = try shim("read", path) { withUnsafeMutableBytes(of: &out) { ks_digest_fd(fd, $0.baseAddress!.assumingMemoryBound(to: UInt64.self), &size) } }
        return (hex(out), size)
    }

    /// The same digest of bytes in memory (a file with these contents has it too).
    public static func digest(bytes: [UInt8]) -> String {
        var out: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &out) { o in bytes.withUnsafeBytes { ks_digest_bytes($0.baseAddress ?? UnsafeRawPointer(o.baseAddress!), $0.count, o.baseAddress!.assumingMemoryBound(to: UInt64.self)) } }
        return hex(out)
    }

    private static func hex(_ v: (UInt64, UInt64)) -> String {
        func h(_ x: UInt64) -> String { let s = String(x, radix: 16); return String(repeating: "0", count: 16 - s.count) + s }
        return h(v.0) + h(v.1)
    }

    /// What changes when a file is replaced or written: device, inode, size, mtime, ctime.
    public static func fingerprint(_ path: String) -> String? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return "\(st.st_dev):\(st.st_ino):\(st.st_size):\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec):\(st.st_ctim.tv_sec).\(st.st_ctim.tv_nsec)"
    }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// Entries of a directory, without "." and "..".
    public static func list(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var out: [String] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
            }
            if name != "." && name != ".." { out.append(name) }
        }
        return out
    }

    /// Names of the directories in a directory (from readdir's d_type; a file system
    /// that does not give it is asked with lstat).
    public static func subdirectories(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var out: [String] = []
        while let e = readdir(dir) {
            let type = e.pointee.d_type
            guard type == UInt8(DT_DIR) || type == UInt8(DT_UNKNOWN) else { continue }
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
            }
            guard name != "." && name != ".." else { continue }
            if type == UInt8(DT_UNKNOWN) {
                var st = stat()
                guard lstat(path + "/" + name, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else { continue }
            }
            out.append(name)
        }
        return out
    }

    /// `rm -rf` that never crosses into another mount (a leftover mount is an error to
    /// report, not something to delete through).
    public static func removeTree(_ path: String) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in list(path) {
                var cst = stat()
                let child = path + "/" + name
                if lstat(child, &cst) == 0 && cst.st_dev != st.st_dev { continue }
                removeTree(child)
            }
            _ = rmdir(path)
        } else {
            _ = unlink(path)
        }
    }
}

/// mount(2) and friends, plus /proc/self/mountinfo.
public enum Mounts {
    /// mount_setattr(2) (Linux 5.12+): recursive read-only mounts ("rro") are possible.
    public static var haveMountSetattr: Bool { ks_have_mount_setattr() != 0 }

    public static func mount(source: String?, target: String, type: String?, flags: UInt, data: String? = nil) throws(SystemError) {
        _ = try shim("mount", "\(type ?? "bind") \(source ?? "none") on \(target)") {
            withOptionalCString(source) { s in
                withOptionalCString(type) { t in
                    withOptionalCString(data) { d in ks_mount(s, target, t, flags, d) }
                }
            }
        }
    }

    /// Unmounts `target`; MNT_DETACH when `lazy`. Not mounted is not an error.
    public static func unmount(_ target: String, lazy: Bool = false) throws(SystemError) {
        let rc = ks_umount(target, lazy ? Int32(MNT_DETACH) : 0)
        if rc == 0 || rc == -Errno.EINVAL.rawValue || rc == -Errno.ENOENT.rawValue { return }
        throw SystemError("umount", target, errno: Errno(rawValue: -rc))
    }

    /// Unmounts everything at or below `path`, deepest first.
    public static func unmountAll(under path: String) {
        let prefix = path.hasSuffix("/") ? path : path + "/"
        let targets = mountPoints().filter { $0 == path || $0.hasPrefix(prefix) }.sorted { $0.count > $1.count }
        for t in targets { try? unmount(t, lazy: true) }
    }

    /// Mount points of this mount namespace, in mountinfo order (octal escapes decoded).
    /// New namespaces (`flags`, CLONE_NEW*) pinned by bind-mounting each `procNames`
    /// entry of /proc/self/ns onto the matching target (an existing empty file), from a
    /// vfork-style child that exits at once: no process stays behind.
    public static func pinNewNamespaces(flags: Int32, procNames: [String], targets: [String]) throws(SystemError) {
        let sources = procNames.map { strdup("/proc/self/ns/" + $0) }
        let dsts = targets.map { strdup($0) }
        defer { for p in sources + dsts { free(p) } }
        var failed: Int32 = -1
        let rc = sources.map { UnsafePointer($0!) }.withUnsafeBufferPointer { src in
            dsts.map { UnsafePointer($0!) }.withUnsafeBufferPointer { dst in
                ks_pin_namespaces(flags, src.baseAddress!, dst.baseAddress!, Int32(targets.count), &failed)
            }
        }
        if rc < 0 {
            let what = failed >= 0 ? "mount(\(procNames[Int(failed)]) -> \(targets[Int(failed)]))" : "clone(new namespaces)"
            throw SystemError("pin namespaces", what, errno: Errno(rawValue: -rc))
        }
    }

    public static func mountPoints() -> [String] {
        guard let text = try? Files.readString("/proc/self/mountinfo") else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            return f.count > 4 ? unescape(String(f[4])) : nil
        }
    }

    static func unescape(_ s: String) -> String {
        guard s.contains("\\") else { return s }
        var out: [UInt8] = []
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "\\"), i + 3 < b.count,
               let v = UInt8(String(decoding: b[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// The kernel's random state.
public enum KernelRandom {
    /// Mixes `seed` into the pool (credited) and reseeds the CRNG at once: a VM clone
    /// stops sharing its template's random state (needs CAP_SYS_ADMIN).
    public static func reseed(_ seed: [UInt8]) throws(SystemError) {
        _ = try shim("RNDRESEEDCRNG", "/dev/urandom") { seed.withUnsafeBytes { ks_reseed_random($0.baseAddress!, $0.count) } }
    }
}
