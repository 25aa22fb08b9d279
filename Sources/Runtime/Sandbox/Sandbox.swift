#if canImport(Glibc)
import Glibc
#endif
import Logging
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer

/// IDs that become paths (state directories, cgroups): refused unless they are plain
/// names, so "../x", "a/b" or an empty id can never point anywhere else.
public enum Identifier {
    public static func validate(_ id: String, what: String) throws(ContainerError) {
        guard !id.isEmpty, id.utf8.count <= 128 else {
            throw ContainerError(.invalid, "\(what) id must be 1 to 128 characters, got \(id.utf8.count)")
        }
        guard let first = id.utf8.first, isAlnum(first) else {
            throw ContainerError(.invalid, "\(what) id \"\(id.prefix(64))\" must start with a letter or digit")
        }
        for b in id.utf8 where !(isAlnum(b) || b == UInt8(ascii: "_") || b == UInt8(ascii: "-") || b == UInt8(ascii: ".")) {
            throw ContainerError(.invalid, "\(what) id \"\(id.prefix(64))\" may only contain letters, digits, '_', '-' and '.'")
        }
    }

    static func isAlnum(_ b: UInt8) -> Bool {
        (b >= 48 && b <= 57) || (b >= 65 && b <= 90) || (b >= 97 && b <= 122)
    }
}

/// A namespace sandbox: a group of containers (a pod) with one Task API socket, one
/// state directory and one cgroup parent. Containers follow their specs' namespaces;
/// those a CRI pod shares are joined by path.
public final class Sandbox {
    /// created: by the Controller's Create, not started yet; ready: serving its Task API;
    /// stopped: its containers are gone (Controller Stop), state kept until Shutdown.
    public enum State: String, Sendable { case created, ready, stopped }

    public let id: String
    public let namespace: String
    public let stateDir: String
    /// The kind that made it (its SandboxBackend's `kind`); shim-path sandboxes are "namespace".
    public var kind = "namespace"
    /// The sandboxer name containerd's Controller.Create named (nil: made through the
    /// shim path, which removes it with its last container; else the Controller does).
    public var sandboxer: String?
    /// What serves its Task API (chosen by its kind at Start; Linux containers when nil).
    public var taskBackend: TaskBackend?
    /// Where containerd reaches its Task API when something other than this daemon
    /// serves it (a task-serving sandbox program), and that API's version.
    public var taskAddressOverride: String?
    public var taskVersionOverride: UInt32 = 3
    /// What Controller.Start and Status answer: the override, else our own socket (v3).
    public var taskEndpoint: (address: String, version: UInt32) {
        taskAddressOverride.map { ($0, taskVersionOverride) } ?? ("ttrpc+unix://" + taskSocket, 3)
    }
    /// Its kind's own state as the last daemon saved it, until the kind recovers it.
    public var recoveredState: [String: String] = [:]
    public internal(set) var createdAt = WallTime.now()
    public var eventsAddress: String
    public private(set) var containers: [String: Container] = [:]
    /// Order of creation, for listings.
    public private(set) var containerOrder: [String] = []
    public var state: State = .ready
    /// Set by the sandbox Controller (containerd 2.x): labels, when it stopped, and who
    /// waits for that.
    public var labels: [String: String] = [:]
    /// Controller Update's `extensions`: type URL and bytes, kept for whoever set them.
    public var extensions: [String: Extension] = [:]
    public struct Extension: Codable, Sendable, Equatable {
        public var typeURL: String
        public var value: [UInt8]
        public init(typeURL: String, value: [UInt8]) { self.typeURL = typeURL; self.value = value }
    }
    public var exitedAt: WallTime?
    public var stopWaiters = WaiterList<WallTime>()

    /// Namespace type → pinned ns file, for a sandbox that shares namespaces.
    public var pinned: [String: String] = [:]

    /// A CRI pod (made by the Controller): the process that lives in its namespaces (the
    /// pid containerd points containers at), and what the pod gives its containers.
    public struct Holder: Equatable, Sendable {
        public var pid: pid_t
        public var startTime: UInt64
        public init(pid: pid_t, startTime: UInt64) { self.pid = pid; self.startTime = startTime }
    }
    public var holder: Holder?
    /// The holder's pidfd while it is watched (borrowed from whoever watches it; for signals).
    public var holderPidfd: Int32 = -1
    /// How the pod ended (its holder's exit), for Controller.Wait.
    public var exitStatus: ExitStatus?
    /// Controller.Stop killed the holder (its exit is then no surprise worth a warning).
    public var holderStopping = false
    /// Set for a CRI pod: its containers get /etc/hostname, /etc/hosts, /etc/resolv.conf
    /// from these files and, when they share its IPC namespace, its /dev/shm.
    public var isPod = false
    /// The pod's namespaces are those of the process serving it (the guest agent, whose
    /// VM is the pod): a container joining them is what is asked, not the host's.
    public var namespacesAreServers = false
    public var hasShm = false
    public var hostnameFile: String { stateDir + "/hostname" }
    public var hostsFile: String { stateDir + "/hosts" }
    public var resolvConfFile: String { stateDir + "/resolv.conf" }
    public var shmDir: String { stateDir + "/shm" }
    /// Container ids whose Create is in flight (so an id cannot be taken twice).
    public var pendingCreates = Set<String>()

    public var taskSocket: String { stateDir + "/task.sock" }
    public var taskAddress: String { "unix://" + taskSocket }
    /// The sandbox's cgroup parent and a container's cgroup under it (both below the
    /// daemon's own cgroup).
    public var cgroupParent: String { cgroupRoot + "/" + id }
    /// The configured parent of every sandbox's cgroup ([namespace] cgroup_parent).
    public var cgroupRoot = "kuasar"
    public func cgroupPath(for containerID: String) -> String { cgroupParent + "/" + containerID }

    init(id: String, namespace: String, stateDir: String, eventsAddress: String) {
        self.id = id
        self.namespace = namespace
        self.stateDir = stateDir
        self.eventsAddress = eventsAddress
    }

    /// The spec a container of this sandbox runs with.
    /// - A namespace path that names the daemon itself is refused: joining it would put
    ///   the container in the host's namespaces.
    /// - containerd 2.x's `/proc/<holder>/ns/<type>` is joined through the pinned file of
    ///   that type (the same namespace, and immune to the holder's pid being reused).
    /// - A namespace the container would create new is joined from the sandbox instead
    ///   when the sandbox pins one of that type (network, ipc, uts; never pid, so a
    ///   container-level `pid` without a path keeps its own).
    /// - A pod's containers get its /etc/hostname, /etc/hosts and /etc/resolv.conf
    ///   unless their spec mounts them, and its /dev/shm when they share its IPC namespace.
    public func adapt(_ spec: OCISpec) throws(SpecError) -> OCISpec {
        guard var ns = spec.linux?.namespaces else { return spec }
        for i in ns.indices {
            let type = ns[i].type
            guard let path = ns[i].path else {
                if let file = pinned[type] { ns[i].path = file }
                continue
            }
            let pid = Self.procPid(path)
            if let h = holder, pid == String(h.pid), let file = pinned[type] { ns[i].path = file; continue }
            // By name for every sandbox; for a pod also by identity, whoever's pid the path
            // names (containerd leaves out what a host-network pod shares).
            if namespacesAreServers { continue }
            if pid == "self" || pid == "thread-self" || pid == DaemonNamespaces.pid || (isPod && DaemonNamespaces.isDaemons(path, type: type)) {
                throw SpecError("linux.namespaces[\(type)].path",
                                "\(path) is the kuasar daemon's own namespace (the host's); a pod's containers join the pid that Controller.Start returned\(holder.map { " (\($0.pid))" } ?? "")")
            }
        }
        var out = spec
        out.linux!.namespaces = ns
        if isPod {
            // Holder paths were turned into the pin above, so sharing is one comparison.
            let sharesIPC = pinned["ipc"].map { file in ns.contains { $0.type == "ipc" && $0.path == file } } ?? false
            out.mounts = podMounts(out.mounts ?? [], sharesIPC: sharesIPC, readOnly: spec.root?.readonly == true)
        }
        return out
    }

    /// The pod's files bound over what the spec does not mount itself (prepared at
    /// Controller.Create, so they exist), and its /dev/shm for containers in its IPC namespace.
    private func podMounts(_ specMounts: [OCISpec.Mount], sharesIPC: Bool, readOnly: Bool) -> [OCISpec.Mount] {
        var mounts = specMounts
        for (dest, file) in [("/etc/hostname", hostnameFile), ("/etc/hosts", hostsFile), ("/etc/resolv.conf", resolvConfFile)]
        where !mounts.contains(where: { $0.destination == dest }) {
            mounts.append(OCISpec.Mount(destination: dest, type: "bind", source: file, options: ["rbind", "rprivate", readOnly ? "ro" : "rw"]))
        }
        if sharesIPC && hasShm, let i = mounts.firstIndex(where: { $0.destination == "/dev/shm" && $0.type == "tmpfs" }) {
            mounts[i] = OCISpec.Mount(destination: "/dev/shm", type: "bind", source: shmDir, options: ["rbind", "rprivate", "rw"])
        }
        return mounts
    }

    /// The `<pid>` of a `/proc/<pid>/ns/<type>` path.
    static func procPid(_ path: String) -> String? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true)
        guard parts.count == 4, parts[0] == "proc", parts[2] == "ns" else { return nil }
        return String(parts[1])
    }

    public func add(_ c: Container) {
        containers[c.id] = c
        containerOrder.append(c.id)
    }

    public func remove(_ id: String) {
        containers.removeValue(forKey: id)
        containerOrder.removeAll { $0 == id }
    }
}

/// The daemon's own namespaces, read once: a container must never join them by accident.
enum DaemonNamespaces {
    static let pid = String(getpid())
    /// Namespace type → (device, inode) of /proc/self/ns/<type>.
    static let identities: [String: (UInt64, UInt64)] = {
        var out: [String: (UInt64, UInt64)] = [:]
        for type in ["network", "ipc", "uts", "pid"] {
            var st = stat()
            if stat("/proc/self/ns/" + NamespaceFlag.procName(type), &st) == 0 { out[type] = (UInt64(st.st_dev), UInt64(st.st_ino)) }
        }
        return out
    }()

    static func isDaemons(_ path: String, type: String) -> Bool {
        guard let own = identities[type] else { return false }
        var st = stat()
        return stat(path, &st) == 0 && (UInt64(st.st_dev), UInt64(st.st_ino)) == own
    }
}

/// Every sandbox of the daemon, by id, with their state directories under `root`.
public final class SandboxRegistry {
    public let root: String
    public let engine: ContainerEngine
    public internal(set) var sandboxes: [String: Sandbox] = [:]
    static let maxSocketPath = 107
    /// [namespace] cgroup_parent: every sandbox's cgroup is <cgroupRoot>/<id>.
    public var cgroupRoot = "kuasar"
    /// The kind's own state of a sandbox, saved with it (set by whoever knows the kinds).
    public var backendState: ((Sandbox) -> [String: String])?
    let logger: Logger

    public init(root: String, engine: ContainerEngine, logger: Logger) {
        self.root = root
        self.engine = engine
        self.logger = logger
    }

    /// The sandbox `id`, made (state directory 0700) when it does not exist yet.
    /// `save`: write its state now (the Controller writes it once it has set it up).
    public func register(id: String, namespace: String, eventsAddress: String, sharedNamespaces: Bool = false,
                         save saveNow: Bool = true) throws -> (Sandbox, created: Bool) {
        try Identifier.validate(id, what: "sandbox")
        if let s = sandboxes[id] {
            guard s.namespace == namespace || namespace.isEmpty else {
                throw ContainerError(.alreadyExists, "sandbox \(id) exists in namespace \(s.namespace), not \(namespace)")
            }
            if !eventsAddress.isEmpty { s.eventsAddress = eventsAddress }
            return (s, false)
        }
        let dir = root + "/" + id
        // The Task API socket must fit a sockaddr_un (107 bytes and a NUL): refused here,
        // not at Start after the sandbox was made.
        let socketPath = dir + "/task.sock"
        guard socketPath.utf8.count <= Self.maxSocketPath else {
            throw ContainerError(.invalid, "sandbox id \"\(id.prefix(64))…\" is too long for this root: \(socketPath.utf8.count) bytes in \(socketPath.prefix(40))…/task.sock, a unix socket path holds at most \(Self.maxSocketPath) (at most \(Self.maxSocketPath - root.utf8.count - 11) bytes of id under \(root))")
        }
        try makeDirectories(dir, mode: 0o700)
        let s = Sandbox(id: id, namespace: namespace, stateDir: dir, eventsAddress: eventsAddress)
        s.cgroupRoot = cgroupRoot
        if sharedNamespaces {
            do {
                s.pinned = try PinnedNamespaces.create(in: dir)
            } catch {
                Files.removeTree(dir)
                throw error
            }
        }
        sandboxes[id] = s
        if saveNow { save(s) }
        return (s, true)
    }

    /// Forgets a sandbox with no containers left and removes its state directory.
    public func remove(_ sandbox: Sandbox) {
        if let tasks = sandbox.taskBackend { tasks.release(sandbox) } else { for c in sandbox.containers.values { c.destroy() } }
        if sandbox.holderPidfd >= 0 { try? sendSignal(pidfd: sandbox.holderPidfd, SIGKILL) }
        if sandbox.hasShm { try? Mounts.unmount(sandbox.shmDir, lazy: true); sandbox.hasShm = false }
        PinnedNamespaces.release(sandbox.pinned, ownedUnder: sandbox.stateDir)
        sandbox.pinned = [:]
        // The sandbox's cgroup parent, now that its containers' cgroups are gone.
        // Its containers' cgroups below it may still be busy: the reaper takes them first.
        if let host = engine.cgroups {
            engine.cgroupReaper.remove(host.existing(sandbox.cgroupParent), owner: "sandbox \(sandbox.id)", kill: false)
        }
        sandboxes.removeValue(forKey: sandbox.id)
        sandbox.state = .stopped
        Files.removeTree(sandbox.stateDir)
    }

    public func container(_ id: String, namespace: String? = nil) -> (Sandbox, Container)? {
        for s in sandboxes.values where namespace == nil || s.namespace == namespace {
            if let c = s.containers[id] { return (s, c) }
        }
        return nil
    }

    public var containerCount: Int { sandboxes.values.reduce(0) { $0 + $1.containers.count } }
}

/// Namespaces a sandbox holds for its containers without a pause process: created by
/// a vfork-style child that bind-mounts its own /proc/self/ns files into the sandbox's
/// state directory and exits; released (unmounted) on shutdown.
public enum PinnedNamespaces {
    public static let types = ["network", "ipc", "uts"]

    /// The empty files in `dir` that namespaces of `types` get bound onto: type → file.
    public static func targets(in dir: String, types: [String]) throws -> [String: String] {
        var pinned: [String: String] = [:]
        for type in types {
            let file = dir + "/" + NamespaceFlag.procName(type)
            try Files.write(file, "", create: true, mode: 0o600)
            pinned[type] = file
        }
        return pinned
    }

    /// Creates the namespaces and returns type → pinned file.
    public static func create(in dir: String, types: [String] = types) throws -> [String: String] {
        let pinned = try targets(in: dir, types: types)
        let flags = types.reduce(UInt64(0)) { $0 | NamespaceFlag.flag($1) }
        do {
            try Mounts.pinNewNamespaces(flags: Int32(truncatingIfNeeded: flags), procNames: types.map(NamespaceFlag.procName),
                                        targets: types.map { pinned[$0]! })
        } catch {
            release(pinned, ownedUnder: dir)
            throw error
        }
        return pinned
    }

    public static func release(_ pinned: [String: String], ownedUnder dir: String) {
        for file in pinned.values where file.hasPrefix(dir + "/") {
            try? Mounts.unmount(file, lazy: true)
            _ = unlink(file)
        }
    }
}
