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

/// Linux containers behind the Task API: the OCI engine (Container) for every call.
/// The namespace kind serves its pods with it; wasm sandboxes and the guest agent use it
/// too. It keeps the sandbox's state file current (each change saved before it is
/// answered) and reports exits once the process's output is in its FIFOs.
public final class ContainerTaskBackend: TaskBackend {
    let registry: SandboxRegistry
    let logger: Logger
    public weak var events: TaskEventSink?
    /// A kind's own program for some processes (the wasm kind runs modules so).
    let programs: ProcessPrograms?

    public init(registry: SandboxRegistry, logger: Logger, programs: ProcessPrograms? = nil) {
        self.registry = registry
        self.logger = logger
        self.programs = programs
    }

    var engine: ContainerEngine { registry.engine }

    func container(_ id: String, _ sandbox: Sandbox) throws -> Container {
        guard let c = sandbox.containers[id] else { throw RPCError(.notFound, "container \(id) not found in sandbox \(sandbox.id)") }
        return c
    }

    func process(_ c: Container, _ execID: String) throws -> ContainerProcess {
        if execID.isEmpty { return c.initProcess }
        guard let p = c.execs[execID] else { throw RPCError(.notFound, "exec \(execID) not found in container \(c.id)") }
        return p
    }

    public func isEmpty(_ sandbox: Sandbox) -> Bool { sandbox.containers.isEmpty }

    public func taskPid(_ id: String, in sandbox: Sandbox) -> UInt32 {
        sandbox.containers[id].map { UInt32($0.initProcess.pid) } ?? 0
    }

    // MARK: Create

    public func create(_ r: Containerd_Task_V2_CreateTaskRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_CreateTaskResponse>) throws {
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
        // The rootfs containerd prepared as mounts: ours to mount and unmount.
        let mounted = Array(repeating: rootfs, count: try RootfsMounts.mountAll(r.rootfs, at: rootfs))
        var stdio = StdioPaths(stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, terminal: r.terminal)
        stdio.namespace = sandbox.namespace
        var program: HostProgram?
        do {
            // Without a process Container.create names the missing field.
            if let programs, let process = spec.process, process.args?.isEmpty == false {
                program = try programs.program(for: process, of: spec, rootfs: rootfs, containerID: r.id, execID: "")
            }
        } catch {
            for m in mounted.reversed() { Mounts.unmountAll(under: m) }
            throw error
        }
        sandbox.pendingCreates.insert(r.id)
        Container.create(id: r.id, bundle: r.bundle, spec: spec, rootfs: rootfs, stdio: stdio,
                         cgroupPath: sandbox.cgroupPath(for: r.id), engine: engine, program: program) { [weak self] result in
            sandbox.pendingCreates.remove(r.id)
            guard let self else { return }
            switch result {
            case .failure(let e):
                for m in mounted.reversed() { Mounts.unmountAll(under: m) }
                if program != nil { self.programs?.forget(containerID: r.id) }
                reply(.failure(RPCError.from(e)))
            case .success(let c):
                c.ownedMounts = mounted
                sandbox.add(c)
                self.watch(c, in: sandbox)
                let tSave = MonotonicClock.nanoseconds()
                self.registry.save(sandbox)
                if self.logger.logLevel <= .trace { self.logger.trace("create \(r.id): state saved in \(Double(MonotonicClock.nanoseconds() - tSave) / 1e6) ms") }
                var resp = Containerd_Task_V2_CreateTaskResponse()
                resp.pid = UInt32(c.initProcess.pid)
                reply(.success(resp))
            }
        }
    }

    /// Exit and OOM reports of a container (made here, or recovered after a restart).
    public func watch(_ c: Container, in sandbox: Sandbox) {
        c.onProcessExit = { [weak self] c, p in self?.processExited(sandbox, c, p) }
        c.onOOM = { [weak self] c in self?.events?.taskOOM(sandbox, containerID: c.id) }
    }

    private func processExited(_ sandbox: Sandbox, _ c: Container, _ p: ContainerProcess) {
        guard p.state == .stopped, let status = p.exitStatus else { return }
        c.pollOOM()
        events?.taskExited(sandbox, containerID: c.id, execID: p.isInit ? "" : p.execID, pid: UInt32(p.pid), status: status, at: p.exitedAt)
        if p.hostProgram != nil { programs?.ended(containerID: c.id, execID: p.isInit ? "" : p.execID, status: status) }
        // Recorded before anything else can happen: a restart must not report it again.
        registry.save(sandbox)
        if p.isInit {
            // The init is gone: so is every other process of the container.
            for ex in c.execs.values where ex.state == .running { try? ex.signal(SIGKILL) }
        }
    }

    // MARK: Start, Exec

    public func start(_ r: Containerd_Task_V2_StartRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StartResponse>) throws {
        let c = try container(r.id, sandbox)
        let answer = { [weak self] (result: Result<pid_t, ContainerError>) in
            switch result {
            case .failure(let e): reply(.failure(RPCError.from(e)))
            case .success(let pid):
                var resp = Containerd_Task_V2_StartResponse()
                resp.pid = UInt32(pid)
                self?.registry.save(sandbox)
                reply(.success(resp))
            }
        }
        if r.execID.isEmpty { c.start(answer) } else { c.startExec(try process(c, r.execID), answer) }
    }

    public func exec(_ r: Containerd_Task_V2_ExecProcessRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws {
        let c = try container(r.id, sandbox)
        try Identifier.validate(r.execID, what: "exec")
        let process = try TaskPayloads.process(r)
        var stdio = StdioPaths(stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, terminal: r.terminal)
        stdio.namespace = sandbox.namespace
        let program = try programs?.program(for: process, of: c.spec, rootfs: c.rootfs, containerID: c.id, execID: r.execID)
        let p: ContainerProcess
        do { p = try c.exec(id: r.execID, process: process, stdio: stdio) } catch {
            if program != nil { programs?.ended(containerID: c.id, execID: r.execID, status: nil) }
            throw error
        }
        p.hostProgram = program
        reply(.success(()))
    }

    // MARK: Delete and State

    public func delete(_ r: Containerd_Task_V2_DeleteRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_DeleteResponse>) throws {
        let c = try container(r.id, sandbox)
        var resp = Containerd_Task_V2_DeleteResponse()
        if !r.execID.isEmpty {
            let p = try process(c, r.execID)
            guard p.state == .stopped || p.pid == 0 else {
                throw RPCError(.failedPrecondition, "exec \(r.execID) of \(r.id) is still running")
            }
            _ = c.removeExec(r.execID)
            p.io.close()
            if p.hostProgram != nil { programs?.ended(containerID: r.id, execID: r.execID, status: nil) }
            registry.save(sandbox)
            resp.pid = UInt32(p.pid)
            resp.exitStatus = UInt32(bitPattern: p.exitStatus?.code ?? 0)
            resp.exitedAt = Google_Protobuf_Timestamp(p.exitedAt)
            reply(.success(resp))
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
        programs?.forget(containerID: r.id)
        registry.save(sandbox)
        let finish = { (status: ExitStatus?, at: WallTime?) in
            resp.pid = UInt32(p.pid)
            resp.exitStatus = UInt32(bitPattern: status?.code ?? 0)
            resp.exitedAt = Google_Protobuf_Timestamp(at)
            reply(.success(resp))
        }
        // A created init is killed by destroy(): answer with its real status once reaped.
        if wasCreated { p.wait { s, t in finish(s, t) } } else { finish(p.exitStatus, p.exitedAt) }
    }

    public func state(_ r: Containerd_Task_V2_StateRequest, in sandbox: Sandbox) throws -> Containerd_Task_V2_StateResponse {
        let c = try container(r.id, sandbox)
        let p = try process(c, r.execID)
        let status: Containerd_V1_Types_Status
        switch p.isInit ? c.state : (p.state == .running ? .running : p.state == .stopped ? .stopped : .created) {
        case .creating, .created: status = .created
        case .running: status = .running
        case .paused: status = .paused
        case .stopped: status = .stopped
        }
        return Containerd_Task_V2_StateResponse(r, bundle: c.bundle, pid: p.pid, status: status, stdio: p.stdio, exit: p.exitStatus, exitedAt: p.exitedAt)
    }

    // MARK: the rest

    public func pids(_ r: Containerd_Task_V2_PidsRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_PidsResponse>) throws {
        let c = try container(r.id, sandbox)
        var resp = Containerd_Task_V2_PidsResponse()
        resp.processes = c.pids().map { var p = Containerd_V1_Types_ProcessInfo(); p.pid = UInt32($0); return p }
        reply(.success(resp))
    }

    public func pause(_ r: Containerd_Task_V2_PauseRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws {
        try container(r.id, sandbox).pause()
        registry.save(sandbox)
        reply(.success(()))
    }

    public func resume(_ r: Containerd_Task_V2_ResumeRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws {
        try container(r.id, sandbox).resume()
        registry.save(sandbox)
        reply(.success(()))
    }

    public func kill(_ r: Containerd_Task_V2_KillRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws {
        let c = try container(r.id, sandbox)
        if r.execID.isEmpty {
            try c.kill(signal: Int32(bitPattern: r.signal), all: r.all)
        } else {
            try process(c, r.execID).signal(Int32(bitPattern: r.signal))
        }
        reply(.success(()))
    }

    public func resizePty(_ r: Containerd_Task_V2_ResizePtyRequest, in sandbox: Sandbox) throws {
        try process(try container(r.id, sandbox), r.execID).io.resize(width: r.width, height: r.height)
    }

    public func closeIO(_ r: Containerd_Task_V2_CloseIORequest, in sandbox: Sandbox) throws {
        let p = try process(try container(r.id, sandbox), r.execID)
        if r.stdin { p.io.closeStdin() }
    }

    public func update(_ r: Containerd_Task_V2_UpdateTaskRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws {
        let c = try container(r.id, sandbox)
        try c.update(try TaskPayloads.resources(r))
        reply(.success(()))
    }

    public func wait(_ r: Containerd_Task_V2_WaitRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_WaitResponse>) throws -> (() -> Void)? {
        let p = try process(try container(r.id, sandbox), r.execID)
        let token = p.wait { status, at in reply(.success(Containerd_Task_V2_WaitResponse(status, at: at))) }
        guard let token else { return nil }
        return { [weak p] in p?.cancelWait(token) }
    }

    public func stats(_ r: Containerd_Task_V2_StatsRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StatsResponse>) throws {
        let c = try container(r.id, sandbox)
        guard let cg = c.cgroup else { throw RPCError(.failedPrecondition, "container \(r.id) has no cgroup to read stats from") }
        var resp = Containerd_Task_V2_StatsResponse()
        resp.stats = try CgroupMetrics.any(cg)
        reply(.success(resp))
    }

    public func stopAll(in s: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void) {
        let running = s.containers.values.filter { $0.state == .running || $0.state == .paused || $0.state == .created }
        for c in running where c.state == .paused { try? c.resume() }
        stopGroup(Array(running), timeoutSecs: timeoutSecs, reactor: engine.reactor,
                  signal: { c, sig in try? c.kill(signal: sig, all: sig == SIGKILL && timeoutSecs > 0) },
                  isGone: { $0.state == .stopped }, whenGone: { c, gone in c.initProcess.wait { _, _ in gone() } }, done: done)
    }

    public func killAll(in s: Sandbox) {
        for c in s.containers.values where c.state == .running || c.state == .paused || c.state == .created {
            try? c.kill(signal: SIGKILL, all: true)
        }
    }

    public func release(_ s: Sandbox) {
        for c in s.containers.values { c.destroy() }
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
    package init(_ t: WallTime?) {
        self.init()
        if let t { seconds = t.seconds; nanos = t.nanos }
    }
}

extension RootfsMounts {
    /// containerd's rootfs mounts (overlay snapshots, binds), stacked on `rootfs`, all or
    /// nothing: a later one that fails takes the earlier ones (and a bind whose read-only
    /// remount failed) with it. Returns how many are mounted: `unmount(count:)` undoes them.
    public static func mountAll(_ mounts: [Containerd_Types_Mount], at rootfs: String) throws -> Int {
        for (i, m) in mounts.enumerated() {
            do { try mount(m.type, source: m.source, options: m.options, at: rootfs) } catch {
                unmount(count: i, at: rootfs)
                if let e = error as? RPCError { throw e }
                throw RPCError(.invalidArgument, "rootfs mount \(i + 1) of \(mounts.count) (\(m.type) \(m.source)): \(error)")
            }
        }
        return mounts.count
    }

    /// Each mount is stacked on the rootfs: one unmount each, newest first.
    public static func unmount(count: Int, at rootfs: String) {
        for _ in 0..<count { try? Mounts.unmount(rootfs, lazy: true) }
    }
}

/// The Task API payloads every container backend decodes, refused with the same errors.
package enum TaskPayloads {
    package static func process(_ r: Containerd_Task_V2_ExecProcessRequest) throws -> OCISpec.Process {
        do { return try JSONDecoder().decode(OCISpec.Process.self, from: r.spec.value) } catch {
            throw RPCError(.invalidArgument, "exec \(r.execID): spec is not an OCI process JSON: \(error)")
        }
    }

    package static func resources(_ r: Containerd_Task_V2_UpdateTaskRequest) throws -> OCISpec.Resources {
        do { return try JSONDecoder().decode(OCISpec.Resources.self, from: r.resources.value) } catch {
            throw RPCError(.invalidArgument, "update \(r.id): resources are not OCI LinuxResources JSON: \(error)")
        }
    }
}

extension Containerd_Task_V2_WaitResponse {
    package init(_ status: ExitStatus, at: WallTime?) {
        self.init()
        exitStatus = UInt32(bitPattern: status.code)
        exitedAt = Google_Protobuf_Timestamp(at)
    }
}

extension Containerd_Task_V2_StateResponse {
    /// A process's state as every backend answers it.
    package init(_ r: Containerd_Task_V2_StateRequest, bundle: String, pid: pid_t, status: Containerd_V1_Types_Status,
                 stdio: StdioPaths, exit: ExitStatus?, exitedAt: WallTime?) {
        self.init()
        id = r.execID.isEmpty ? r.id : r.execID
        execID = r.execID
        self.bundle = bundle
        self.pid = UInt32(pid)
        self.status = status
        stdin = stdio.stdin
        stdout = stdio.stdout
        stderr = stdio.stderr
        terminal = stdio.terminal
        exitStatus = UInt32(bitPattern: exit?.code ?? 0)
        self.exitedAt = Google_Protobuf_Timestamp(exitedAt)
    }
}

/// Controller.Stop of a pod's containers, whoever runs them: each gets SIGTERM (SIGKILL
/// when `timeoutSecs` is 0) and, if still there after `timeoutSecs`, SIGKILL; `done` once
/// every one is gone.
package func stopGroup<Member>(_ members: [Member], timeoutSecs: UInt32, reactor: Reactor,
                               signal: @escaping (Member, Int32) -> Void, isGone: @escaping (Member) -> Bool,
                               whenGone: (Member, @escaping () -> Void) -> Void, done: @escaping () -> Void) {
    guard !members.isEmpty else { done(); return }
    for m in members { signal(m, timeoutSecs == 0 ? SIGKILL : SIGTERM) }
    var remaining = members.count
    var timer: TimerID?
    for m in members {
        whenGone(m) {
            remaining -= 1
            guard remaining == 0 else { return }
            if let timer { reactor.cancel(timer) }
            done()
        }
    }
    if timeoutSecs > 0 {
        timer = reactor.schedule(afterNS: UInt64(timeoutSecs) * 1_000_000_000) {
            for m in members where !isGone(m) { signal(m, SIGKILL) }
        }
    }
}

/// How a kind runs some processes of its containers with a program of its own instead
/// of the rootfs binary OCI names (the wasm kind: the module's runner). Asked at Create
/// (the rootfs is mounted) and at Exec; a refusal is the call's error.
public protocol ProcessPrograms: AnyObject {
    /// nil: the process runs as its spec says. `execID` is "" for the container's init.
    func program(for process: OCISpec.Process, of spec: OCISpec, rootfs: String, containerID: String, execID: String) throws -> HostProgram?
    /// A process that ran a program of ours exited (`status`), or will never run (nil).
    func ended(containerID: String, execID: String, status: ExitStatus?)
    /// The container is gone: whatever is still kept for its processes.
    func forget(containerID: String)
}
