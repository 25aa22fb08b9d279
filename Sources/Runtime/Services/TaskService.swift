#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import SwiftProtobuf

/// containerd's Task API (`containerd.task.v2.Task` and `containerd.task.v3.Task`, one
/// wire format) served on each sandbox's socket by the daemon itself: no shim process.
///
/// Events follow the shim protocol's order: TaskCreate after Create answered, TaskStart
/// after Start, TaskExit once the process's output is in its FIFOs, TaskDelete after
/// Delete; ExecAdded/ExecStarted, Paused/Resumed likewise.
public final class TaskService {
    public static let services = ["containerd.task.v2.Task", "containerd.task.v3.Task"]
    let registry: SandboxRegistry
    let reactor: Reactor
    let logger: Logger
    private var servers: [String: TTRPCServer] = [:]
    private var publishers: [String: EventPublisher] = [:]
    /// Runs after a sandbox lost its last container and its socket closed.
    public var onSandboxRemoved: ((String) -> Void)?

    public init(registry: SandboxRegistry, reactor: Reactor, logger: Logger) {
        self.registry = registry
        self.reactor = reactor
        self.logger = logger
    }

    var engine: ContainerEngine { registry.engine }

    /// Starts serving the Task API on the sandbox's socket (0600).
    public func serve(_ sandbox: Sandbox) throws {
        guard servers[sandbox.id] == nil else { return }
        let server = TTRPCServer(reactor: reactor, logger: logger)
        for service in Self.services { register(server, service: service, sandbox: sandbox) }
        try server.listen(path: sandbox.taskSocket)
        servers[sandbox.id] = server
    }

    public var openConnections: Int { servers.values.reduce(0) { $0 + $1.connectionCount } }

    /// Stops every server and publisher (daemon shutdown).
    public func close() {
        for s in servers.values { s.close() }
        servers.removeAll()
        for p in publishers.values { p.close() }
        publishers.removeAll()
    }

    func publisher(for sandbox: Sandbox) -> EventPublisher? {
        guard !sandbox.eventsAddress.isEmpty else { return nil }
        if let p = publishers[sandbox.eventsAddress] { return p }
        let p = EventPublisher(reactor: reactor, address: sandbox.eventsAddress, logger: logger)
        publishers[sandbox.eventsAddress] = p
        return p
    }

    func publish<M: SwiftProtobuf.Message>(_ sandbox: Sandbox, _ topic: String, _ event: M) {
        publisher(for: sandbox)?.publish(namespace: sandbox.namespace, topic: topic, event)
    }


    // MARK: registration

    private func register(_ server: TTRPCServer, service: String, sandbox: Sandbox) {
        func unary<Req: SwiftProtobuf.Message>(_ method: String, _ body: @escaping (TTRPCServerCall, Req) throws -> Void) {
            server.registerUnary(service: service, method: method, body)
        }
        unary("Create") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_CreateTaskRequest) in try self.create(call, r, sandbox) }
        unary("Start") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_StartRequest) in try self.start(call, r, sandbox) }
        unary("Delete") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_DeleteRequest) in try self.delete(call, r, sandbox) }
        unary("State") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_StateRequest) in try self.state(call, r, sandbox) }
        unary("Pids") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_PidsRequest) in
            let c = try self.container(r.id, sandbox)
            var resp = Containerd_Task_V2_PidsResponse()
            resp.processes = c.pids().map { var p = Containerd_V1_Types_ProcessInfo(); p.pid = UInt32($0); return p }
            call.respond(resp)
        }
        unary("Pause") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_PauseRequest) in
            try self.container(r.id, sandbox).pause()
            self.registry.save(sandbox)
            call.respond(Google_Protobuf_Empty())
            var e = Containerd_Events_TaskPaused(); e.containerID = r.id
            self.publish(sandbox, "/tasks/paused", e)
        }
        unary("Resume") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_ResumeRequest) in
            try self.container(r.id, sandbox).resume()
            self.registry.save(sandbox)
            call.respond(Google_Protobuf_Empty())
            var e = Containerd_Events_TaskResumed(); e.containerID = r.id
            self.publish(sandbox, "/tasks/resumed", e)
        }
        unary("Kill") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_KillRequest) in
            let c = try self.container(r.id, sandbox)
            if r.execID.isEmpty {
                try c.kill(signal: Int32(bitPattern: r.signal), all: r.all)
            } else {
                try self.process(c, r.execID).signal(Int32(bitPattern: r.signal))
            }
            call.respond(Google_Protobuf_Empty())
        }
        unary("Exec") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_ExecProcessRequest) in try self.exec(call, r, sandbox) }
        unary("ResizePty") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_ResizePtyRequest) in
            let p = try self.process(try self.container(r.id, sandbox), r.execID)
            try p.io.resize(width: r.width, height: r.height)
            call.respond(Google_Protobuf_Empty())
        }
        unary("CloseIO") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_CloseIORequest) in
            let p = try self.process(try self.container(r.id, sandbox), r.execID)
            if r.stdin { p.io.closeStdin() }
            call.respond(Google_Protobuf_Empty())
        }
        unary("Update") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_UpdateTaskRequest) in
            let c = try self.container(r.id, sandbox)
            let res: OCISpec.Resources
            do { res = try JSONDecoder().decode(OCISpec.Resources.self, from: r.resources.value) } catch {
                throw RPCError(.invalidArgument, "update \(r.id): resources are not OCI LinuxResources JSON: \(error)")
            }
            try c.update(res)
            call.respond(Google_Protobuf_Empty())
        }
        unary("Wait") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_WaitRequest) in
            let p = try self.process(try self.container(r.id, sandbox), r.execID)
            let token = p.wait { status, at in
                var resp = Containerd_Task_V2_WaitResponse()
                resp.exitStatus = UInt32(bitPattern: status.code)
                resp.exitedAt = Google_Protobuf_Timestamp(at)
                call.respond(resp)
            }
            // A client that disconnects (or whose deadline passes) stops waiting.
            if let token { call.onCancel = { [weak p] _ in p?.cancelWait(token) } }
        }
        unary("Stats") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_StatsRequest) in
            let c = try self.container(r.id, sandbox)
            guard let cg = c.cgroup else { throw RPCError(.failedPrecondition, "container \(r.id) has no cgroup to read stats from") }
            var resp = Containerd_Task_V2_StatsResponse()
            resp.stats = try CgroupMetrics.any(cg)
            call.respond(resp)
        }
        unary("Connect") { [unowned self] (call: TTRPCServerCall, r: Containerd_Task_V2_ConnectRequest) in
            var resp = Containerd_Task_V2_ConnectResponse()
            resp.shimPid = UInt32(getpid())
            if let c = sandbox.containers[r.id] { resp.taskPid = UInt32(c.initProcess.pid) }
            resp.version = KuasarVersion.string
            _ = self
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
    func removeSandboxIfDone(_ sandbox: Sandbox) {
        if sandbox.containers.isEmpty && !sandbox.isPod { removeSandbox(sandbox) }
    }

    func removeSandbox(_ sandbox: Sandbox) {
        guard registry.sandboxes[sandbox.id] === sandbox else { return }
        if let server = servers.removeValue(forKey: sandbox.id) {
            // Answers already queued go out before the connections close.
            reactor.schedule(afterNS: 0) { server.close() }
        }
        registry.remove(sandbox)
        onSandboxRemoved?(sandbox.id)
    }

    // MARK: helpers

    func container(_ id: String, _ sandbox: Sandbox) throws -> Container {
        guard let c = sandbox.containers[id] else { throw RPCError(.notFound, "container \(id) not found in sandbox \(sandbox.id)") }
        return c
    }

    func process(_ c: Container, _ execID: String) throws -> ContainerProcess {
        if execID.isEmpty { return c.initProcess }
        guard let p = c.execs[execID] else { throw RPCError(.notFound, "exec \(execID) not found in container \(c.id)") }
        return p
    }



    // MARK: Create

    private func create(_ call: TTRPCServerCall, _ r: Containerd_Task_V2_CreateTaskRequest, _ sandbox: Sandbox) throws {
        try Identifier.validate(r.id, what: "container")
        guard registry.container(r.id, namespace: sandbox.namespace) == nil, !sandbox.pendingCreates.contains(r.id) else {
            throw RPCError(.alreadyExists, "container \(r.id) already exists")
        }
        if !r.checkpoint.isEmpty { throw RPCError(.unimplemented, "restore from a checkpoint is not supported by kuasar") }
        guard r.bundle.hasPrefix("/") else { throw RPCError(.invalidArgument, "bundle \"\(r.bundle)\" must be an absolute path") }
        let tRead = MonotonicClock.nanoseconds()
        let spec = try sandbox.adapt(try OCISpec.decode(try Files.read(r.bundle + "/config.json")))
        if logger.logLevel <= .trace { logger.trace("create \(r.id): config.json read and decoded in \(Double(MonotonicClock.nanoseconds() - tRead) / 1e6) ms") }
        // Container.create validates everything; the rootfs path is needed first.
        guard let rootPath = spec.root?.path, !rootPath.isEmpty else { throw SpecError("root.path", "required") }
        let rootfs = rootPath.hasPrefix("/") ? rootPath : r.bundle + "/" + rootPath
        // The rootfs containerd prepared as mounts (overlay snapshots, binds): ours to mount and unmount.
        // All or nothing: a later mount that fails takes the earlier ones (and a bind whose
        // read-only remount failed) with it.
        var mounted: [String] = []
        for (i, m) in r.rootfs.enumerated() {
            do { try RootfsMounts.mount(m.type, source: m.source, options: m.options, at: rootfs) } catch {
                // Each earlier one is stacked on the rootfs: one unmount each, newest first.
                for _ in 0..<i { try? Mounts.unmount(rootfs, lazy: true) }
                if let e = error as? RPCError { throw e }
                throw RPCError(.invalidArgument, "rootfs mount \(i + 1) of \(r.rootfs.count) (\(m.type) \(m.source)): \(error)")
            }
            mounted.append(rootfs)
        }
        var stdio = StdioPaths(stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, terminal: r.terminal)
        stdio.namespace = sandbox.namespace
        sandbox.pendingCreates.insert(r.id)
        Container.create(id: r.id, bundle: r.bundle, spec: spec, rootfs: rootfs, stdio: stdio,
                         cgroupPath: sandbox.cgroupPath(for: r.id), engine: engine) { [weak self] result in
            sandbox.pendingCreates.remove(r.id)
            guard let self else { return }
            switch result {
            case .failure(let e):
                for m in mounted.reversed() { Mounts.unmountAll(under: m) }
                call.fail(RPCError.from(e))
            case .success(let c):
                c.ownedMounts = mounted
                sandbox.add(c)
                self.watch(c, in: sandbox)
                let tSave = MonotonicClock.nanoseconds()
                self.registry.save(sandbox)
                if self.logger.logLevel <= .trace { self.logger.trace("create \(r.id): state saved in \(Double(MonotonicClock.nanoseconds() - tSave) / 1e6) ms") }
                var resp = Containerd_Task_V2_CreateTaskResponse()
                resp.pid = UInt32(c.initProcess.pid)
                call.respond(resp)
                var e = Containerd_Events_TaskCreate()
                e.containerID = r.id
                e.bundle = r.bundle
                e.rootfs = r.rootfs
                e.io.stdin = r.stdin
                e.io.stdout = r.stdout
                e.io.stderr = r.stderr
                e.io.terminal = r.terminal
                e.pid = UInt32(c.initProcess.pid)
                self.publish(sandbox, "/tasks/create", e)
            }
        }
    }


    /// Exit and OOM reports of a container (made here, or recovered after a restart).
    public func watch(_ c: Container, in sandbox: Sandbox) {
        c.onProcessExit = { [weak self] c, p in self?.processExited(sandbox, c, p) }
        c.onOOM = { [weak self] c in
            var e = Containerd_Events_TaskOOM()
            e.containerID = c.id
            self?.publish(sandbox, "/tasks/oom", e)
        }
    }

    private func processExited(_ sandbox: Sandbox, _ c: Container, _ p: ContainerProcess) {
        guard p.state == .stopped, let status = p.exitStatus else { return }
        c.pollOOM()
        var e = Containerd_Events_TaskExit()
        e.containerID = c.id
        e.id = p.isInit ? c.id : p.execID
        e.pid = UInt32(p.pid)
        e.exitStatus = UInt32(bitPattern: status.code)
        e.exitedAt = Google_Protobuf_Timestamp(p.exitedAt)
        publish(sandbox, "/tasks/exit", e)
        // Recorded before anything else can happen: a restart must not report it again.
        registry.save(sandbox)
        if p.isInit {
            // The init is gone: so is every other process of the container.
            for ex in c.execs.values where ex.state == .running { try? ex.signal(SIGKILL) }
        }
    }

    // MARK: Start

    private func start(_ call: TTRPCServerCall, _ r: Containerd_Task_V2_StartRequest, _ sandbox: Sandbox) throws {
        let c = try container(r.id, sandbox)
        // Answer, then the event: TaskStart for the init, TaskExecStarted for an exec.
        let answer = { [weak self] (result: Result<pid_t, ContainerError>) in
            switch result {
            case .failure(let e): call.fail(RPCError.from(e))
            case .success(let pid):
                var resp = Containerd_Task_V2_StartResponse()
                resp.pid = UInt32(pid)
                self?.registry.save(sandbox)
                call.respond(resp)
                if r.execID.isEmpty {
                    var e = Containerd_Events_TaskStart()
                    e.containerID = r.id
                    e.pid = UInt32(pid)
                    self?.publish(sandbox, "/tasks/start", e)
                } else {
                    var e = Containerd_Events_TaskExecStarted()
                    e.containerID = r.id
                    e.execID = r.execID
                    e.pid = UInt32(pid)
                    self?.publish(sandbox, "/tasks/exec-started", e)
                }
            }
        }
        if r.execID.isEmpty { c.start(answer) } else { c.startExec(try process(c, r.execID), answer) }
    }

    // MARK: Exec

    private func exec(_ call: TTRPCServerCall, _ r: Containerd_Task_V2_ExecProcessRequest, _ sandbox: Sandbox) throws {
        let c = try container(r.id, sandbox)
        try Identifier.validate(r.execID, what: "exec")
        let process: OCISpec.Process
        do { process = try JSONDecoder().decode(OCISpec.Process.self, from: r.spec.value) } catch {
            throw RPCError(.invalidArgument, "exec \(r.execID): spec is not an OCI process JSON: \(error)")
        }
        var stdio = StdioPaths(stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, terminal: r.terminal)
        stdio.namespace = sandbox.namespace
        _ = try c.exec(id: r.execID, process: process, stdio: stdio)
        call.respond(Google_Protobuf_Empty())
        var e = Containerd_Events_TaskExecAdded()
        e.containerID = r.id
        e.execID = r.execID
        publish(sandbox, "/tasks/exec-added", e)
    }

    // MARK: Delete and State

    private func delete(_ call: TTRPCServerCall, _ r: Containerd_Task_V2_DeleteRequest, _ sandbox: Sandbox) throws {
        let c = try container(r.id, sandbox)
        var resp = Containerd_Task_V2_DeleteResponse()
        if !r.execID.isEmpty {
            let p = try process(c, r.execID)
            guard p.state == .stopped || p.pid == 0 else {
                throw RPCError(.failedPrecondition, "exec \(r.execID) of \(r.id) is still running")
            }
            _ = c.removeExec(r.execID)
            p.io.close()
            registry.save(sandbox)
            resp.pid = UInt32(p.pid)
            resp.exitStatus = UInt32(bitPattern: p.exitStatus?.code ?? 0)
            resp.exitedAt = Google_Protobuf_Timestamp(p.exitedAt)
            call.respond(resp)
            return
        }
        switch c.state {
        case .running, .paused:
            throw RPCError(.failedPrecondition, "container \(r.id) is \(c.state.rawValue): kill it before delete")
        case .creating:
            throw RPCError(.failedPrecondition, "container \(r.id) is still being created")
        case .created, .stopped:
            break
        }
        let p = c.initProcess
        let wasCreated = c.state == .created
        c.destroy()
        sandbox.remove(r.id)
        registry.save(sandbox)
        let finish = { [weak self] (status: ExitStatus?, at: WallTime?) in
            resp.pid = UInt32(p.pid)
            resp.exitStatus = UInt32(bitPattern: status?.code ?? 0)
            resp.exitedAt = Google_Protobuf_Timestamp(at)
            call.respond(resp)
            self?.publishDelete(sandbox, container: r.id, pid: resp.pid, exitStatus: resp.exitStatus, exitedAt: resp.exitedAt)
        }
        // A created init is killed by destroy(): answer with its real status once reaped.
        if wasCreated { p.wait { s, t in finish(s, t) } } else { finish(p.exitStatus, p.exitedAt) }
    }

    /// TaskDelete of a container's init: after Delete, and after the admin ForceDelete.
    func publishDelete(_ sandbox: Sandbox, container id: String, pid: UInt32, exitStatus: UInt32, exitedAt: Google_Protobuf_Timestamp) {
        var e = Containerd_Events_TaskDelete()
        e.containerID = id
        e.id = id
        e.pid = pid
        e.exitStatus = exitStatus
        e.exitedAt = exitedAt
        publish(sandbox, "/tasks/delete", e)
    }

    private func state(_ call: TTRPCServerCall, _ r: Containerd_Task_V2_StateRequest, _ sandbox: Sandbox) throws {
        let c = try container(r.id, sandbox)
        let p = try process(c, r.execID)
        var resp = Containerd_Task_V2_StateResponse()
        resp.id = r.execID.isEmpty ? c.id : r.execID
        resp.execID = r.execID
        resp.bundle = c.bundle
        resp.pid = UInt32(p.pid)
        switch p.isInit ? c.state : (p.state == .running ? .running : p.state == .stopped ? .stopped : .created) {
        case .creating, .created: resp.status = .created
        case .running: resp.status = .running
        case .paused: resp.status = .paused
        case .stopped: resp.status = .stopped
        }
        resp.stdin = p.stdio.stdin
        resp.stdout = p.stdio.stdout
        resp.stderr = p.stdio.stderr
        resp.terminal = p.stdio.terminal
        resp.exitStatus = UInt32(bitPattern: p.exitStatus?.code ?? 0)
        resp.exitedAt = Google_Protobuf_Timestamp(p.exitedAt)
        call.respond(resp)
    }
}

/// The mounts containerd passes with Create (the container's rootfs).
public enum RootfsMounts {
    public static func mount(_ type: String, source: String, options: [String], at target: String) throws {
        var flags: UInt = 0, clear: UInt = 0
        var data: [String] = []
        for o in options {
            if let f = MountOptions.flag(o) { flags |= f.set; clear |= f.clear } else { data.append(o) }
        }
        flags &= ~clear
        let isBind = type == "bind" || flags & MountOptions.BIND != 0
        guard isBind || ["overlay", "tmpfs", "ext4", "xfs", "btrfs", "erofs"].contains(type) else {
            throw RPCError(.invalidArgument, "rootfs mount type \"\(type)\" is not supported")
        }
        try Mounts.mount(source: source, target: target, type: isBind ? nil : type,
                         flags: isBind ? (MountOptions.BIND | (flags & MountOptions.REC)) : flags,
                         data: isBind ? nil : data.joined(separator: ","))
        if isBind && flags & MountOptions.RDONLY != 0 {
            do { try Mounts.mount(source: nil, target: target, type: nil, flags: MountOptions.BIND | MountOptions.REMOUNT | MountOptions.RDONLY) } catch {
                try? Mounts.unmount(target, lazy: true)
                throw error
            }
        }
    }
}

extension Google_Protobuf_Timestamp {
    /// A protobuf time from ours; nil is the zero time containerd reads as "not yet".
    init(_ t: WallTime?) {
        self.init()
        if let t { seconds = t.seconds; nanos = t.nanos }
    }
}
