#if canImport(Glibc)
import Glibc
#endif
import CShims

/// Loading kernel modules the way modprobe does, for a guest's PID 1: `modules.dep` of
/// the running kernel gives each module's file and what it needs, loaded first.
public struct KernelModules {
    public let directory: String
    /// Where the running kernel lists what it has loaded (`/sys/module/<name>`): a module
    /// found there is not loaded again, whoever loaded it (the guest's boot thread, an
    /// earlier call). Built-in modules with parameters show there too, rightly skipped.
    public let kernelModules: String
    /// Module name (dashes as underscores) → (file relative to `directory`, its dependencies).
    private var entries: [String: (path: String, deps: [String])] = [:]
    public private(set) var loaded: [String] = []

    /// Reads `<directory>/modules.dep` (`kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko ...`).
    public init(directory: String, kernelModules: String = "/sys/module") throws(SystemError) {
        self.directory = directory
        self.kernelModules = kernelModules
        let text = try Files.readString(directory + "/modules.dep")
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let path = String(line[..<colon])
            let deps = line[line.index(after: colon)...].split(separator: " ").map { Self.name(of: String($0)) }
            entries[Self.name(of: path)] = (path, deps)
        }
    }

    /// A module file's endings, as bytes.
    private static let extensions = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].map { Array($0.utf8) }

    /// `kernel/net/9p/9pnet_virtio.ko` → `9pnet_virtio` (and `virtio-mmio` → `virtio_mmio`).
    /// On bytes: PID 1 asks this on its way to the first answer, where each piece of code
    /// run for the first time costs its translation under TCG (Character iteration is
    /// the grapheme breaking code).
    public static func name(of path: String) -> String {
        var base = Array(path.utf8)
        if let slash = base.lastIndex(of: UInt8(ascii: "/")) { base.removeSubrange(...slash) }
        for e in Self.extensions {
            if base.count > e.count && base[(base.count - e.count)...].elementsEqual(e) {
                base.removeLast(e.count)
                break
            }
        }
        for i in base.indices where base[i] == UInt8(ascii: "-") { base[i] = UInt8(ascii: "_") }
        return String(decoding: base, as: UTF8.self)
    }

    public func knows(_ module: String) -> Bool { entries[Self.name(of: module)] != nil }

    /// What loading `modules` takes, in order: each one's dependencies first, each module
    /// once, none the kernel has already; modules not in modules.dep (built in) left out.
    public func plan(_ modules: [String]) -> [(name: String, file: String)] {
        var out: [(name: String, file: String)] = []
        var seen = Set(loaded)
        func visit(_ module: String) {
            let name = Self.name(of: module)
            guard !seen.contains(name), let entry = entries[name] else { return }
            seen.insert(name)
            guard !isLoaded(name) else { return }
            for dep in entry.deps { visit(dep) }
            out.append((name, directory + "/" + entry.path))
        }
        for m in modules { visit(m) }
        return out
    }

    /// Whether the running kernel has `name` (dashes as underscores) loaded.
    public func isLoaded(_ name: String) -> Bool { Self.isLoaded(name, kernelModules: kernelModules) }

    /// The same without a modules.dep read, for a caller that parses it only when needed.
    public static func isLoaded(_ name: String, kernelModules: String = "/sys/module") -> Bool {
        access(kernelModules + "/" + Self.name(of: name), F_OK) == 0
    }

    /// Loads `module` after its dependencies, each only when the kernel does not have it
    /// yet. A module not in modules.dep is taken to be built in (returns false).
    @discardableResult
    public mutating func load(_ module: String) throws(SystemError) -> Bool {
        guard knows(module) else { return false }
        for step in plan([module]) {
            let fd = try Self.open(step.file)
            let rc = ks_finit_module(fd)
            _ = close(fd)
            if let error = Self.failure(rc, step.file) { throw error }
            loaded.append(step.name)
        }
        return true
    }

    /// What finit_module's result means: nil when loaded (or loaded already).
    static func failure(_ rc: Int32, _ file: String) -> SystemError? {
        rc < 0 && rc != -EEXIST ? SystemError("finit_module", file, errno: Errno(rawValue: -rc)) : nil
    }

    /// A module's file, open for finit_module (the guest image holds them uncompressed).
    private static func open(_ file: String) throws(SystemError) -> Int32 {
        guard file.hasSuffix(".ko") else {
            throw SystemError("finit_module", file + " (compressed: the guest image must hold modules uncompressed)", errno: Errno(rawValue: ENOEXEC))
        }
        return try sys("open", file) { Glibc.open(file, O_RDONLY | O_CLOEXEC) }
    }
}
