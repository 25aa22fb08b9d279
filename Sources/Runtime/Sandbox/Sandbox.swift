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
    public enum State: String, Sendable { case ready, stopped }

    public let id: String
    public let namespace: String
    public let stateDir: String
    public let createdAt = WallTime.now()
    public var eventsAddress: String
    public private(set) var containers: [String: Container] = [:]
    /// Order of creation, for listings.
    public private(set) var containerOrder: [String] = []
    public var state: State = .ready
    /// Container ids whose Create is in flight (so an id cannot be taken twice).
    public var pendingCreates = Set<String>()

    public var taskSocket: String { stateDir + "/task.sock" }
    public var taskAddress: String { "unix://" + taskSocket }
    /// The cgroup path a container of this sandbox gets (below the daemon's own cgroup).
    public func cgroupPath(for containerID: String) -> String { "kuasar/\(id)/\(containerID)" }

    init(id: String, namespace: String, stateDir: String, eventsAddress: String) {
        self.id = id
        self.namespace = namespace
        self.stateDir = stateDir
        self.eventsAddress = eventsAddress
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
    public private(set) var sandboxes: [String: Sandbox] = [:]
    let logger: Logger

    public init(root: String, engine: ContainerEngine, logger: Logger) {
        self.root = root
        self.engine = engine
        self.logger = logger
    }

    /// The sandbox `id`, made (state directory 0700) when it does not exist yet.
    public func register(id: String, namespace: String, eventsAddress: String) throws -> (Sandbox, created: Bool) {
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
        sandboxes[id] = s
        return (s, true)
    }

    /// Forgets a sandbox with no containers left and removes its state directory.
    public func remove(_ sandbox: Sandbox) {
        for c in sandbox.containers.values { c.destroy() }
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
