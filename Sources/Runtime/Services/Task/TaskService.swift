#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer
import KuasarSandbox

/// containerd's Task API (`containerd.task.v2.Task` and `containerd.task.v3.Task`, one
/// wire format) served on each sandbox's socket by the daemon itself: no shim process.
/// What is common to every kind lives here — both versions' registration, decoding,
/// error mapping, event order and publishing; the sandbox's TaskBackend does the work.
///
/// Events follow the shim protocol's order: TaskCreate after Create answered, TaskStart
/// after Start, TaskExit once the process's output is in its FIFOs, TaskDelete after
/// Delete; ExecAdded/ExecStarted, Paused/Resumed likewise.
public final class TaskService: TaskEventSink {
    public static let services = ["containerd.task.v2.Task", "containerd.task.v3.Task"]
    let registry: SandboxRegistry
    let reactor: Reactor
    let logger: Logger
    private var servers: [String: TTRPCServer] = [:]
    private var publishers: [String: EventPublisher] = [:]
    /// Runs after a sandbox lost its last container and its socket closed.
    public var onSandboxRemoved: ((String) -> Void)?
    /// Sees every event as it is published, wrapped as containerd's Envelope (the guest
    /// agent queues them for its host); containerd's publisher gets them as well when the
    /// sandbox names an events address.
    public var eventTap: ((Sandbox, Containerd_Services_Events_Ttrpc_V1_Envelope) -> Void)?

    /// Linux containers: the backend of shim-path sandboxes and of every kind that runs
    /// its containers with the OCI engine.
    public let containers: ContainerTaskBackend

    public init(registry: SandboxRegistry, reactor: Reactor, logger: Logger) {
        self.registry = registry
        self.reactor = reactor
        self.logger = logger
        containers = ContainerTaskBackend(registry: registry, logger: logger)
        containers.events = self
    }

    /// Starts serving the Task API on the sandbox's socket (0600), with the backend its
    /// kind chose (Linux containers when none).
    public func serve(_ sandbox: Sandbox, backend: TaskBackend? = nil) throws {
        guard servers[sandbox.id] == nil else { return }
        let backend = backend ?? sandbox.taskBackend ?? containers
        if backend.events == nil { backend.events = self }
        sandbox.taskBackend = backend
        let server = TTRPCServer(reactor: reactor, logger: logger)
        register(on: server, sandbox: sandbox, backend: backend)
        try server.listen(path: sandbox.taskSocket)
        servers[sandbox.id] = server
    }

    /// Registers both Task API versions for `sandbox` on a server its owner listens with
    /// (the guest agent's channels).
    public func register(on server: TTRPCServer, sandbox: Sandbox, backend: TaskBackend) {
        if backend.events == nil { backend.events = self }
        sandbox.taskBackend = backend
        for service in Self.services { register(server, service: service, sandbox: sandbox, backend: backend) }
    }

    public var openConnections: Int { servers.values.reduce(0) { $0 + $1.connectionCount } }

    /// Stops every server and publisher (daemon shutdown).
    public func close() {
        for s in servers.values { s.close() }
        servers.removeAll()
        for p in publishers.values { p.close() }
        publishers.removeAll()
    }

    package func publisher(for sandbox: Sandbox) -> EventPublisher? {
        guard !sandbox.eventsAddress.isEmpty else { return nil }
        if let p = publishers[sandbox.eventsAddress] { return p }
        let p = EventPublisher(reactor: reactor, address: sandbox.eventsAddress, logger: logger)
        publishers[sandbox.eventsAddress] = p
        return p
    }

    package func publish<M: SwiftProtobuf.Message>(_ sandbox: Sandbox, _ topic: String, _ event: M) {
        let publisher = publisher(for: sandbox)
        guard eventTap != nil || publisher != nil else { return }
        // Made (and the event serialized) once for both.
        let envelope = EventPublisher.envelope(namespace: sandbox.namespace, topic: topic, event)
        eventTap?(sandbox, envelope)
        publisher?.publish(envelope)
    }


    // MARK: events

    public func taskExited(_ sandbox: Sandbox, containerID: String, execID: String, pid: UInt32, status: ExitStatus, at: WallTime?) {
        var e = Containerd_Events_TaskExit()
        e.containerID = containerID
        e.id = execID.isEmpty ? containerID : execID
        e.pid = pid
        e.exitStatus = UInt32(bitPattern: status.code)
        e.exitedAt = Google_Protobuf_Timestamp(at)
        publish(sandbox, "/tasks/exit", e)
    }

    public func taskOOM(_ sandbox: Sandbox, containerID: String) {
        var e = Containerd_Events_TaskOOM()
        e.containerID = containerID
        publish(sandbox, "/tasks/oom", e)
    }

    /// TaskDelete of a container's init: after Delete, and after the admin ForceDelete.
    package func publishDelete(_ sandbox: Sandbox, container id: String, pid: UInt32, exitStatus: UInt32, exitedAt: Google_Protobuf_Timestamp) {
        var e = Containerd_Events_TaskDelete()
        e.containerID = id
        e.id = id
        e.pid = pid
        e.exitStatus = exitStatus
        e.exitedAt = exitedAt
        publish(sandbox, "/tasks/delete", e)
    }

    // MARK: registration

    private func register(_ server: TTRPCServer, service: String, sandbox: Sandbox, backend b: TaskBackend) {
        func unary<Req: SwiftProtobuf.Message>(_ method: String, _ body: @escaping (TTRPCServerCall, Req) throws -> Void) {
            server.registerUnary(service: service, method: method, body)
        }
        /// A completion's result, answered on the call.
        func answer<M: SwiftProtobuf.Message>(_ call: TTRPCServerCall, then after: @escaping (M) -> Void = { _ in }) -> (Result<M, RPCError>) -> Void {
            { result in
                switch result {
                case .failure(let e): call.fail(e)
                case .success(let m): call.respond(m); after(m)
                }
            }
        }
        unary("Create") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_CreateTaskRequest) in
            try b.create(r, in: sandbox, reply: answer(call) { resp in
                var e = Containerd_Events_TaskCreate()
                e.containerID = r.id
                e.bundle = r.bundle
                e.rootfs = r.rootfs
                e.io.stdin = r.stdin
                e.io.stdout = r.stdout
                e.io.stderr = r.stderr
                e.io.terminal = r.terminal
                e.pid = resp.pid
                self.publish(sandbox, "/tasks/create", e)
            })
        }
        unary("Start") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_StartRequest) in
            // Answer, then the event: TaskStart for the init, TaskExecStarted for an exec.
            try b.start(r, in: sandbox, reply: answer(call) { resp in
                if r.execID.isEmpty {
                    var e = Containerd_Events_TaskStart()
                    e.containerID = r.id
                    e.pid = resp.pid
                    self.publish(sandbox, "/tasks/start", e)
                } else {
                    var e = Containerd_Events_TaskExecStarted()
                    e.containerID = r.id
                    e.execID = r.execID
                    e.pid = resp.pid
                    self.publish(sandbox, "/tasks/exec-started", e)
                }
            })
        }
        unary("Delete") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_DeleteRequest) in
            try b.delete(r, in: sandbox, reply: answer(call) { resp in
                guard r.execID.isEmpty else { return }
                self.publishDelete(sandbox, container: r.id, pid: resp.pid, exitStatus: resp.exitStatus, exitedAt: resp.exitedAt)
            })
        }
        unary("State") { (call: TTRPCServerCall, r: Containerd_Task_V2_StateRequest) in call.respond(try b.state(r, in: sandbox)) }
        /// A call answered with Empty once the backend is done.
        func empty(_ call: TTRPCServerCall, then after: @escaping () -> Void = {}) -> (Result<Void, RPCError>) -> Void {
            { result in
                switch result {
                case .failure(let e): call.fail(e)
                case .success: call.respond(Google_Protobuf_Empty()); after()
                }
            }
        }
        unary("Pids") { (call: TTRPCServerCall, r: Containerd_Task_V2_PidsRequest) in try b.pids(r, in: sandbox, reply: answer(call)) }
        unary("Pause") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_PauseRequest) in
            try b.pause(r, in: sandbox, reply: empty(call) {
                var e = Containerd_Events_TaskPaused(); e.containerID = r.id
                self.publish(sandbox, "/tasks/paused", e)
            })
        }
        unary("Resume") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_ResumeRequest) in
            try b.resume(r, in: sandbox, reply: empty(call) {
                var e = Containerd_Events_TaskResumed(); e.containerID = r.id
                self.publish(sandbox, "/tasks/resumed", e)
            })
        }
        unary("Kill") { (call: TTRPCServerCall, r: Containerd_Task_V2_KillRequest) in try b.kill(r, in: sandbox, reply: empty(call)) }
        unary("Exec") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_ExecProcessRequest) in
            try b.exec(r, in: sandbox, reply: empty(call) {
                var e = Containerd_Events_TaskExecAdded()
                e.containerID = r.id
                e.execID = r.execID
                self.publish(sandbox, "/tasks/exec-added", e)
            })
        }
        unary("ResizePty") { (call: TTRPCServerCall, r: Containerd_Task_V2_ResizePtyRequest) in
            try b.resizePty(r, in: sandbox)
            call.respond(Google_Protobuf_Empty())
        }
        unary("CloseIO") { (call: TTRPCServerCall, r: Containerd_Task_V2_CloseIORequest) in
            try b.closeIO(r, in: sandbox)
            call.respond(Google_Protobuf_Empty())
        }
        unary("Update") { (call: TTRPCServerCall, r: Containerd_Task_V2_UpdateTaskRequest) in try b.update(r, in: sandbox, reply: empty(call)) }
        unary("Wait") { (call: TTRPCServerCall, r: Containerd_Task_V2_WaitRequest) in
            // A client that disconnects (or whose deadline passes) stops waiting.
            if let cancel = try b.wait(r, in: sandbox, reply: answer(call)) { call.onCancel = { _ in cancel() } }
        }
        unary("Stats") { (call: TTRPCServerCall, r: Containerd_Task_V2_StatsRequest) in try b.stats(r, in: sandbox, reply: answer(call)) }
        unary("Connect") { (call: TTRPCServerCall, r: Containerd_Task_V2_ConnectRequest) in
            var resp = Containerd_Task_V2_ConnectResponse()
            resp.shimPid = UInt32(getpid())
            resp.taskPid = b.taskPid(r.id, in: sandbox)
            resp.version = KuasarVersion.string
            call.respond(resp)
        }
        unary("Shutdown") { [unowned self] (call: TTRPCServerCall, _: Containerd_Task_V2_ShutdownRequest) in
            call.respond(Google_Protobuf_Empty())
            // containerd waits for this connection to close after Shutdown.
            call.closeConnectionAfterFlush()
            self.removeSandboxIfDone(sandbox)
        }
        unary("Checkpoint") { (_: TTRPCServerCall, _: Containerd_Task_V2_CheckpointTaskRequest) in
            throw RPCError(.unimplemented, "checkpoint is not supported by kuasar: it has no CRIU integration")
        }
    }

    /// A shim-path sandbox goes with its last container (Task Shutdown, ForceDelete); a pod
    /// made by the Controller is the Controller's to remove (its Shutdown).
    package func removeSandboxIfDone(_ sandbox: Sandbox) {
        if (sandbox.taskBackend ?? containers).isEmpty(sandbox) && sandbox.sandboxer == nil { removeSandbox(sandbox) }
    }

    package func removeSandbox(_ sandbox: Sandbox) {
        guard registry.sandboxes[sandbox.id] === sandbox else { return }
        if let server = servers.removeValue(forKey: sandbox.id) {
            // Answers already queued go out before the connections close.
            reactor.schedule(afterNS: 0) { server.close() }
        }
        registry.remove(sandbox)
        onSandboxRemoved?(sandbox.id)
    }
}
