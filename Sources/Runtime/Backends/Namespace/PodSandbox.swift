#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarHostWire
import KuasarContainer
import KuasarSandbox

/// What a CRI pod of the namespace kind is made of, from containerd's
/// `runtime.v1.PodSandboxConfig`: its namespaces (held by a holder process, the pid
/// containerd points containers at), its hostname, DNS and hosts files, its /dev/shm and
/// its sysctls — what containerd's own pod sandbox (a pause container) would give it.
public struct PodSettings: Sendable {
    public var hostname: String
    public var resolvConf: String
    public var hosts: String
    /// Namespaced sysctls only, applied inside the pod's namespaces.
    public var sysctls: [String: String] = [:]
    /// Namespaces the pod creates; one left out is the node's (CRI `NODE` mode). A pod
    /// on containerd's CNI netns joins that one instead of making its own.
    public var newPid = true, newIPC = true, newNetwork = true
    /// The node's network (CRI `NODE`), and with it the node's hostname.
    public var hostNetwork = false
    public var newUTS: Bool { !hostNetwork }
    public var shmBytes: UInt64 = PodSettings.defaultShmBytes
    public static let defaultShmBytes: UInt64 = 64 << 20
    /// A pod annotation that sizes its /dev/shm (bytes), as CRI has no field for it.
    public static let shmSizeAnnotation = "io.kuasar.shm-size"

    /// Settings from the pod's config (nil: a client that sent none, e.g. not the CRI).
    /// Throws InvalidArgument naming the field for what cannot be honoured.
    public init(_ config: Runtime_V1_PodSandboxConfig?, netnsPath: String) throws(RPCError) {
        hostname = config?.hostname ?? ""
        if hostname.isEmpty { hostname = PodFiles.hostname() }
        try PodFiles.check(hostname: hostname)
        hosts = PodFiles.defaultHosts
        if let dns = config?.dnsConfig, config?.hasDnsConfig == true {
            resolvConf = PodFiles.resolvConf(servers: dns.servers, searches: dns.searches, options: dns.options)
        } else {
            resolvConf = PodFiles.nodeResolvConf()
        }
        if let opts = config?.linux.securityContext.namespaceOptions {
            newPid = opts.pid != .node
            newIPC = opts.ipc != .node
            hostNetwork = opts.network == .node
        }
        newNetwork = !hostNetwork && netnsPath.isEmpty
        for (key, value) in config?.linux.sysctls ?? [:] {
            guard let kind = Self.namespacedSysctl(key) else {
                throw RPCError(.invalidArgument, "options: linux.sysctls: \"\(key)\" is not a namespaced sysctl (kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*, net.*): it would change the node, not the pod")
            }
            if kind == "net" && hostNetwork {
                throw RPCError(.invalidArgument, "options: linux.sysctls: \"\(key)\" needs the pod's own network namespace; this pod uses the node's")
            }
            if kind == "ipc" && !newIPC {
                throw RPCError(.invalidArgument, "options: linux.sysctls: \"\(key)\" needs the pod's own IPC namespace; this pod uses the node's")
            }
            guard !value.contains("\n"), !value.contains("\0"), !key.contains("/"), !key.contains("..") else {
                throw RPCError(.invalidArgument, "options: linux.sysctls: \"\(key)\" = \"\(value.prefix(40))\" is malformed")
            }
            sysctls[key] = value
        }
        if let s = config?.annotations[Self.shmSizeAnnotation] {
            guard let bytes = UInt64(s), bytes >= 4096 else {
                throw RPCError(.invalidArgument, "options: annotation \(Self.shmSizeAnnotation)=\"\(s)\" is not a size in bytes (at least 4096)")
            }
            shmBytes = bytes
        }
    }

    /// "net" or "ipc" for a sysctl that lives in that namespace, nil for any other.
    static func namespacedSysctl(_ key: String) -> String? {
        if key.hasPrefix("net.") { return "net" }
        if key.hasPrefix("kernel.shm") || key.hasPrefix("kernel.msg") || key == "kernel.sem" || key.hasPrefix("fs.mqueue.") { return "ipc" }
        return nil
    }
}

/// Makes and releases a CRI pod's host-side parts.
public enum PodSandbox {
    /// Prepares a registered (empty) sandbox as a pod: its files, /dev/shm and holder,
    /// watched by `supervisor` (`onHolderExit` runs on the loop when it ends). On failure
    /// the caller removes the sandbox, which undoes what was made here.
    public static func prepare(_ s: Sandbox, settings: PodSettings, netnsPath: String, supervisor: ProcessSupervisor,
                               onHolderExit: @escaping (ExitStatus) -> Void) throws {
        s.isPod = true
        try PodFiles.write(s, hostname: settings.hostname, hosts: settings.hosts, resolvConf: settings.resolvConf)
        if settings.newIPC {
            try makeDirectories(s.shmDir, mode: 0o1777)
            try Mounts.mount(source: "shm", target: s.shmDir, type: "tmpfs",
                             flags: MountOptions.NOSUID | MountOptions.NODEV | MountOptions.NOEXEC,
                             data: "mode=1777,size=\(settings.shmBytes)")
            s.hasShm = true
        }
        var setup = PodHolderSpawner.Setup(newNamespaces: 0, argv: ["kuasar-pod", s.id])
        var pinnedTypes: [String] = []
        if settings.newPid { setup.newNamespaces |= NamespaceFlag.pid }
        if settings.newIPC { setup.newNamespaces |= NamespaceFlag.ipc; pinnedTypes.append("ipc") }
        if settings.newUTS { setup.newNamespaces |= NamespaceFlag.uts; pinnedTypes.append("uts"); setup.hostname = settings.hostname }
        if settings.newNetwork { setup.newNamespaces |= NamespaceFlag.network; pinnedTypes.append("network") }
        if !netnsPath.isEmpty { setup.netnsPath = netnsPath }
        let pins = try PinnedNamespaces.targets(in: s.stateDir, types: pinnedTypes)
        setup.pins = pinnedTypes.map { (NamespaceFlag.procName($0), pins[$0]!) }
        setup.sysctls = settings.sysctls.sorted { $0.key < $1.key }.map { ("/proc/sys/" + $0.key.replacingDots(), $0.value) }
        let process = try PodHolderSpawner.spawn(setup)
        s.pinned = pins
        // containerd (CNI) made the network namespace: joined, never ours to release.
        if !netnsPath.isEmpty { s.pinned["network"] = netnsPath }
        s.holder = Sandbox.Holder(pid: process.pid, startTime: ExitRecords.startTime(of: process.pid))
        s.holderPidfd = process.pidfd.rawValue
        try supervisor.adopt(process) { [weak s] status in
            s?.holderPidfd = -1
            onHolderExit(status)
        }
    }
}

extension String {
    /// A sysctl name as its /proc/sys path ("net.ipv4.ip_forward" → "net/ipv4/ip_forward").
    func replacingDots() -> String { String(map { $0 == "." ? "/" : $0 }) }
}
