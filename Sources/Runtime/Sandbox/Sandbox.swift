#if canImport(Glibc)
import Glibc
#endif
import Logging
import SwiftProtobuf

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

    /// The spec a container of this sandbox runs with: a namespace it would create new
    /// is joined from the sandbox instead when the sandbox pins one of that type.
    public func adapt(_ spec: OCISpec) -> OCISpec {
        guard !pinned.isEmpty, var ns = spec.linux?.namespaces else { return spec }
        for i in ns.indices where ns[i].path == nil {
            if let file = pinned[ns[i].type] { ns[i].path = file }
        }
        var out = spec
        out.linux!.namespaces = ns
        return out
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

/// Every sandbox of the daemon, by id, with their state directories under `root`.
public final class SandboxRegistry {
    public let root: String
    public let engine: ContainerEngine
    public internal(set) var sandboxes: [String: Sandbox] = [:]
    /// [namespace] cgroup_parent: every sandbox's cgroup is <cgroupRoot>/<id>.
    public var cgroupRoot = "kuasar"
    let logger: Logger

    public init(root: String, engine: ContainerEngine, logger: Logger) {
        self.root = root
        self.engine = engine
        self.logger = logger
    }

    /// The sandbox `id`, made (state directory 0700) when it does not exist yet.
    /// `save`: write its state now (the Controller writes it once it has set it up).
    public func register(id: String, namespace: String, eventsAddress: String, sharedNamespaces: Bool = false,
                         netnsPath: String = "", save saveNow: Bool = true) throws -> (Sandbox, created: Bool) {
        try Identifier.validate(id, what: "sandbox")
        if let s = sandboxes[id] {
            guard s.namespace == namespace || namespace.isEmpty else {
                throw ContainerError(.alreadyExists, "sandbox \(id) exists in namespace \(s.namespace), not \(namespace)")
            }
            if !eventsAddress.isEmpty { s.eventsAddress = eventsAddress }
            return (s, false)
        }
        let dir = root + "/" + id
        try makeDirectories(dir, mode: 0o700)
        let s = Sandbox(id: id, namespace: namespace, stateDir: dir, eventsAddress: eventsAddress)
        s.cgroupRoot = cgroupRoot
        if sharedNamespaces {
            do {
                s.pinned = try PinnedNamespaces.create(in: dir, types: netnsPath.isEmpty ? PinnedNamespaces.types : ["ipc", "uts"])
                // containerd (CNI) made the network namespace: joined, never ours to release.
                if !netnsPath.isEmpty { s.pinned["network"] = netnsPath }
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
        for c in sandbox.containers.values { c.destroy() }
        PinnedNamespaces.release(sandbox.pinned, ownedUnder: sandbox.stateDir)
        sandbox.pinned = [:]
        // The sandbox's cgroup parent, now that its containers' cgroups are gone.
        if let host = engine.cgroups {
            for dir in host.existing(sandbox.cgroupParent).dirs.values { _ = rmdir(dir) }
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

    /// Creates the namespaces and returns type → pinned file.
    public static func create(in dir: String, types: [String] = types) throws -> [String: String] {
        var pinned: [String: String] = [:]
        var flags: UInt64 = 0
        for type in types {
            let file = dir + "/" + NamespaceFlag.procName(type)
            try Files.write(file, "", create: true, mode: 0o600)
            pinned[type] = file
            flags |= NamespaceFlag.flag(type)
        }
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
