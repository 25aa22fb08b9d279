#if canImport(Glibc)
import Glibc
#endif
import Logging
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarHostWire
import KuasarContainer
import KuasarSandbox
import KuasarTasks

/// The daemon's own control service on `<root>/admin.sock` (ttrpc, 0600): how the shim
/// binary registers sandboxes and how the CLI lists and cleans up.
public final class AdminService {
    public static let service = "kuasar.admin.v1.Admin"
    let registry: SandboxRegistry
    let tasks: TaskService
    /// The kind and TaskBackend of a named sandboxer (the Controller's dispatch), for
    /// shim binaries named after one.
    public var shimTasks: ((String) throws -> (kind: String, tasks: TaskBackend))?
    let server: TTRPCServer
    let startedAt = MonotonicClock.nanoseconds()

    public init(registry: SandboxRegistry, tasks: TaskService, reactor: Reactor, logger: Logger) {
        self.registry = registry
        self.tasks = tasks
        server = TTRPCServer(reactor: reactor, logger: logger)
        server.registerUnary(service: Self.service, method: "RegisterSandbox") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Admin_V1_RegisterSandboxRequest) in
            // The shim binary's name picks the sandboxer; none is the namespace kind.
            let chosen = r.sandboxer.isEmpty ? nil : try self.shimTasks?(r.sandboxer)
            if let existing = self.registry.sandboxes[r.sandboxID], existing.kind != (chosen?.kind ?? "namespace") {
                throw RPCError(.alreadyExists, "sandbox \(r.sandboxID) exists with kind \(existing.kind), not \(chosen?.kind ?? "namespace")")
            }
            let (sandbox, created) = try self.registry.register(id: r.sandboxID, namespace: r.namespace, eventsAddress: r.eventsAddress,
                                                                 sharedNamespaces: r.sharedNamespaces)
            if created, let chosen {
                sandbox.kind = chosen.kind
                sandbox.taskBackend = chosen.tasks
            }
            do { try self.tasks.serve(sandbox) } catch {
                if created { self.registry.remove(sandbox) }
                throw error
            }
            var resp = Kuasar_Admin_V1_RegisterSandboxResponse()
            resp.taskAddress = sandbox.taskAddress
            resp.created = created
            call.respond(resp)
        }
        server.registerUnary(service: Self.service, method: "ListSandboxes") { [unowned self] (call: TTRPCServerCall, _: Kuasar_Admin_V1_ListSandboxesRequest) in
            var resp = Kuasar_Admin_V1_ListSandboxesResponse()
            for s in self.registry.sandboxes.values.sorted(by: { $0.id < $1.id }) {
                var info = Kuasar_Admin_V1_SandboxInfo()
                info.id = s.id
                info.namespace = s.namespace
                info.taskAddress = s.taskAddress
                for id in s.containerOrder {
                    guard let c = s.containers[id] else { continue }
                    var ci = Kuasar_Admin_V1_ContainerInfo()
                    ci.id = c.id
                    ci.pid = UInt32(c.initProcess.pid)
                    ci.status = c.state.rawValue
                    ci.bundle = c.bundle
                    ci.execs = c.execs.keys.sorted()
                    info.containers.append(ci)
                }
                resp.sandboxes.append(info)
            }
            call.respond(resp)
        }
        server.registerUnary(service: Self.service, method: "ForceDelete") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Admin_V1_ForceDeleteRequest) in
            try Identifier.validate(r.containerID, what: "container")
            guard let (sandbox, c) = self.registry.container(r.containerID, namespace: r.namespace.isEmpty ? nil : r.namespace) else {
                call.respond(Kuasar_Admin_V1_ForceDeleteResponse())
                return
            }
            try? c.kill(signal: SIGKILL, all: true)
            let finish = { [weak self] in
                c.destroy()
                sandbox.remove(c.id)
                var resp = Kuasar_Admin_V1_ForceDeleteResponse()
                resp.found = true
                resp.pid = UInt32(c.initProcess.pid)
                resp.exitStatus = UInt32(bitPattern: c.initProcess.exitStatus?.code ?? 137)
                call.respond(resp)
                // As a Task Delete would: the state file forgets it, containerd hears of it.
                self?.registry.save(sandbox)
                self?.tasks.publishDelete(sandbox, container: c.id, pid: resp.pid, exitStatus: resp.exitStatus,
                                          exitedAt: Google_Protobuf_Timestamp(c.initProcess.exitedAt ?? WallTime.now()))
                self?.tasks.removeSandboxIfDone(sandbox)
            }
            if c.initProcess.pid == 0 || c.initProcess.state == .stopped { finish() } else { c.initProcess.wait { _, _ in finish() } }
        }
        server.registerUnary(service: Self.service, method: "Health") { [unowned self] (call: TTRPCServerCall, _: Kuasar_Admin_V1_HealthRequest) in
            var resp = Kuasar_Admin_V1_HealthResponse()
            resp.version = KuasarVersion.string
            resp.reactor = reactor.backendKind.rawValue
            resp.uptimeMs = (MonotonicClock.nanoseconds() - self.startedAt) / 1_000_000
            resp.sandboxes = UInt32(self.registry.sandboxes.count)
            resp.containers = UInt32(self.registry.containerCount)
            resp.pid = getpid()
            call.respond(resp)
        }
    }

    public func listen(path: String) throws(SystemError) {
        try server.listen(path: path)
    }

    public func close() {
        server.close()
    }
}
