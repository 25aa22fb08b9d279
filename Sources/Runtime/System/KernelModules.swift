#if canImport(Glibc)
import Glibc
#endif
import CShims

/// Loading kernel modules the way modprobe does, for a guest's PID 1: `modules.dep` of
/// the running kernel gives each module's file and what it needs, loaded first.
public struct KernelModules {
    public let directory: String
    /// Module name (dashes as underscores) → (file relative to `directory`, its dependencies).
    private var entries: [String: (path: String, deps: [String])] = [:]
    public private(set) var loaded: [String] = []

    /// Reads `<directory>/modules.dep` (`kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko ...`).
    public init(directory: String) throws(SystemError) {
        self.directory = directory
        let text = try Files.readString(directory + "/modules.dep")
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let path = String(line[..<colon])
            let deps = line[line.index(after: colon)...].split(separator: " ").map { Self.name(of: String($0)) }
            entries[Self.name(of: path)] = (path, deps)
        }
    }

    /// `kernel/net/9p/9pnet_virtio.ko` → `9pnet_virtio` (and `virtio-mmio` → `virtio_mmio`).
    public static func name(of path: String) -> String {
        var base = path.split(separator: "/").last.map(String.init) ?? path
        for ext in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] where base.hasSuffix(ext) { base = String(base.dropLast(ext.count)); break }
        return String(base.map { $0 == "-" ? "_" : $0 })
    }

    public func knows(_ module: String) -> Bool { entries[Self.name(of: module)] != nil }

    /// Loads `module` after its dependencies. A module not in modules.dep is taken to be
    /// built in (returns false); one already loaded is fine.
    @discardableResult
    public mutating func load(_ module: String) throws(SystemError) -> Bool {
        let name = Self.name(of: module)
        if loaded.contains(name) { return true }
        guard let entry = entries[name] else { return false }
        for dep in entry.deps { try load(dep) }
        let file = directory + "/" + entry.path
        guard file.hasSuffix(".ko") else {
            throw SystemError("finit_module", file + " (compressed: the guest image must hold modules uncompressed)", errno: Errno(rawValue: ENOEXEC))
        }
        let fd = try sys("open", file) { open(file, O_RDONLY | O_CLOEXEC) }
        defer { _ = close(fd) }
        let rc = ks_finit_module(fd)
        if rc < 0 && rc != -EEXIST { throw SystemError("finit_module", file, errno: Errno(rawValue: -rc)) }
        loaded.append(name)
        return true
    }
}
