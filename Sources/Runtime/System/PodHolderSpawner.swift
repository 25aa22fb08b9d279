#if canImport(Glibc)
import Glibc
#endif
import CShims
import KuasarOCI

/// Starts pod holders (CShims' podholder.c): a process per pod in the pod's new
/// namespaces, whose program is a few instructions mapped from one sealed memfd.
public enum PodHolderSpawner {
    /// What the holder's pre-exec child does, in this order.
    public struct Setup {
        public var newNamespaces: UInt64
        /// A network namespace to join instead of a new one (containerd's CNI netns).
        public var netnsPath: String?
        public var hostname: String?
        /// /proc/sys path → value, written inside the pod's namespaces.
        public var sysctls: [(path: String, value: String)] = []
        /// /proc/self/ns/<name> → an existing empty file to bind it onto.
        public var pins: [(procName: String, target: String)] = []
        public var argv: [String]
        public init(newNamespaces: UInt64, argv: [String]) { self.newNamespaces = newNamespaces; self.argv = argv }
    }

    /// The image is made once per daemon (on the first pod): every holder maps the same
    /// pages. Running holders keep their mapping; the engine releases this at close.
    nonisolated(unsafe) private static var imageFD: Int32 = -1

    public static func releaseImage() {
        guard imageFD >= 0 else { return }
        _ = close(imageFD)
        imageFD = -1
    }

    static func image() throws(SystemError) -> Int32 {
        if imageFD >= 0 { return imageFD }
        let fd = ks_pod_holder_image()
        guard fd >= 0 else { throw SystemError("memfd(pod holder image)", nil, errno: Errno(rawValue: -fd)) }
        imageFD = fd
        return fd
    }

    public static func spawn(_ setup: Setup) throws(SystemError) -> SpawnedProcess {
        let image = try image()
        let arena = CArena()
        defer { arena.free() }
        var netns: Int32 = -1
        if let path = setup.netnsPath {
            netns = try sys("open network namespace", path) { open(path, O_RDONLY | O_CLOEXEC) }
        }
        defer { if netns >= 0 { _ = close(netns) } }
        var attr = ks_pod_holder_attr()
        attr.image_fd = image
        attr.clone_flags = setup.newNamespaces
        attr.netns_fd = netns
        attr.netns_path = setup.netnsPath.map { arena.string($0) }
        attr.hostname = setup.hostname.map { arena.string($0) }
        attr.loopback_up = setup.newNamespaces & NamespaceFlag.network != 0 ? 1 : 0
        attr.sysctls = arena.array(setup.sysctls.map { ks_sysctl(key: arena.string($0.path), value: arena.string($0.value)) })
        attr.sysctl_count = Int32(setup.sysctls.count)
        attr.pin_sources = arena.constStringArray(setup.pins.map { "/proc/self/ns/" + $0.procName })
        attr.pin_targets = arena.constStringArray(setup.pins.map(\.target))
        attr.pin_count = Int32(setup.pins.count)
        attr.argv = arena.stringArray(setup.argv)
        var pid: pid_t = 0, pidfd: Int32 = -1
        var err = [CChar](repeating: 0, count: 256)
        let rc = ks_pod_holder_spawn(&attr, &pid, &pidfd, &err, err.count)
        guard rc == 0 else {
            let what = String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw SystemError("pod holder", what, errno: Errno(rawValue: -rc))
        }
        return SpawnedProcess(pid: pid, pidfd: OwnedFD(adopting: pidfd))
    }
}

