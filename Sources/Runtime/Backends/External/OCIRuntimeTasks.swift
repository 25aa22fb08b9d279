#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer
import KuasarSandbox

/// The Task API of pods whose containers an external OCI runtime runs (`oci:<runtime>`
/// sandboxers): `create --bundle --pid-file`, `start`, `exec --detach --pid-file`,
/// `kill`, `pause`/`resume`, `update --resources`, `delete --force`. The daemon is the
/// runtime's child subreaper, so each container's init (and each detached exec) becomes
/// its child once the runtime exits: watched by pidfd, reaped here, its output written by
/// the container straight into containerd's FIFOs, its exit reported after that output.
///
/// Each container gets a bundle of its own under the pod's state directory: containerd's
/// spec as the pod adapts it (the pod's namespaces by their pinned files, its hostname,
/// hosts and resolv.conf), with an absolute root path.
public final class OCIRuntimeTasks: TaskBackend {
    public weak var events: TaskEventSink?
    let runtime: OCIRuntime
    let registry: SandboxRegistry
    let logger: Logger
    var reactor: Reactor { runtime.reactor }

    /// A process the runtime started: a container's init or one of its execs.
    final class Process {
        let execID: String
        var pid: pid_t = 0
        var pidfd: Int32 = -1
        var exited: (ExitStatus, WallTime)?
        var startTime: UInt64 = 0
        /// A terminal's size, for an exec whose runtime sends its master.
        var consoleSize: OCISpec.ConsoleSize?
        var waiters = WaiterList<(ExitStatus, WallTime)>()
        /// nil for a process recovered after a restart: it writes into its FIFOs itself.
        let io: ProcessIO?
        let stdio: StdioPaths
        var started = false
        init(execID: String, io: ProcessIO?, stdio: StdioPaths) { self.execID = execID; self.io = io; self.stdio = stdio }
    }

    final class Task {
        let id: String
        let bundle: String
        let ownBundle: String
        let rootfs: String
        var mounted = 0
        let initProcess: Process
        var execs: [String: Process] = [:]
        var paused = false
        init(id: String, bundle: String, ownBundle: String, rootfs: String, initProcess: Process) {
            self.id = id; self.bundle = bundle; self.ownBundle = ownBundle; self.rootfs = rootfs; self.initProcess = initProcess
        }
    }

    /// The unix socket a runtime sends a terminal's master to (`--console-socket`): read
    /// once the runtime's call has returned — by then it has connected and sent it.
    final class ConsoleSocket {
        let path: String
        private var listener: Int32
        init(path: String) throws {
            self.path = path
            unlink(path)
            listener = try Socket.listenUnix(path: path, mode: 0o600, backlog: 1).take()
        }
        /// The master the runtime sent, if it did.
        func receive() -> Int32? {
            guard listener >= 0, let conn = try? Socket.accept(listener) else { return nil }
            let fd = conn.take()
            defer { _ = Glibc.close(fd) }
            var buf = [UInt8](repeating: 0, count: 256)
            var passed: Int32 = -1
            _ = buf.withUnsafeMutableBytes { Socket.receiveWithFD(fd, $0.baseAddress!, $0.count, &passed) }
            return passed >= 0 ? passed : nil
        }
        func close() {
            if listener >= 0 { _ = Glibc.close(listener) }
            listener = -1
            unlink(path)
        }
        deinit { close() }
    }
    private var consoles = 0
    func consoleSocket() throws -> ConsoleSocket {
        consoles += 1
        // Short: a sockaddr_un holds 107 bytes, and ids may be long.
        try makeDirectories(runtime.workDir, mode: 0o700)
        return try ConsoleSocket(path: runtime.workDir + "/console-\(consoles).sock")
    }

    /// sandbox id → container id → task.
    private var tasks: [String: [String: Task]] = [:]
    private var pending: [String: Set<String>] = [:]

    public init(runtime: OCIRuntime, registry: SandboxRegistry, logger: Logger) {
        self.runtime = runtime
        self.registry = registry
        self.logger = logger
    }

    func task(_ id: String, _ s: Sandbox) throws -> Task {
        guard let t = tasks[s.id]?[id] else { throw RPCError(.notFound, "container \(id) not found in sandbox \(s.id)") }
        return t
    }

    func process(_ t: Task, _ execID: String) throws -> Process {
        if execID.isEmpty { return t.initProcess }
        guard let p = t.execs[execID] else { throw RPCError(.notFound, "exec \(execID) not found in container \(t.id)") }
        return p
    }

    public func isEmpty(_ s: Sandbox) -> Bool { (tasks[s.id] ?? [:]).isEmpty }
    public func taskPid(_ id: String, in s: Sandbox) -> UInt32 { tasks[s.id]?[id].map { UInt32($0.initProcess.pid) } ?? 0 }

    // MARK: Create, Start

    public func create(_ r: Containerd_Task_V2_CreateTaskRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_CreateTaskResponse>) throws {
        guard runtime.specVersion != nil else {
            // First, once: which spec versions the runtime takes.
            try Identifier.validate(r.id, what: "container")
            runtime.withSpecVersion { [weak self] _ in
                guard let self else { return }
                do { try self.create(r, in: s, reply: reply) } catch { reply(.failure(RPCError.from(error))) }
            }
            return
        }
        try Identifier.validate(r.id, what: "container")
        guard tasks[s.id]?[r.id] == nil, !(pending[s.id]?.contains(r.id) ?? false) else {
            throw RPCError(.alreadyExists, "container \(r.id) already exists")
        }
        guard r.bundle.hasPrefix("/") else { throw RPCError(.invalidArgument, "bundle \"\(r.bundle)\" must be an absolute path") }
        var spec = try s.adapt(try OCISpec.decode(try Files.read(r.bundle + "/config.json")))
        guard let rootPath = spec.root?.path, !rootPath.isEmpty else { throw SpecError("root.path", "required") }
        let rootfs = rootPath.hasPrefix("/") ? rootPath : r.bundle + "/" + rootPath
        spec.root?.path = rootfs
        try spec.validate()
        if let max = runtime.specVersion ?? nil {
            let v = OCIRuntime.version(spec.ociVersion, within: max)
            if v != spec.ociVersion {
                logger.debug("container \(r.id): spec \(spec.ociVersion) written as \(v), the newest \(runtime.name) takes")
                spec.ociVersion = v
            }
        }
        let ownBundle = s.stateDir + "/" + r.id
        try makeDirectories(ownBundle, mode: 0o700)
        do {
            try Files.writeAtomically(ownBundle + "/config.json", Array(try JSONEncoder().encode(spec)), mode: 0o600)
        } catch {
            Files.removeTree(ownBundle)
            throw RPCError(.internal, "container \(r.id): its bundle: \(error)")
        }
        let mounted: Int
        do { mounted = try RootfsMounts.mountAll(r.rootfs, at: rootfs) } catch {
            Files.removeTree(ownBundle)
            throw error
        }
        var stdio = StdioPaths(stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, terminal: r.terminal)
        stdio.containerID = r.id
        stdio.namespace = s.namespace
        let io: ProcessIO
        let console: ConsoleSocket?
        do {
            io = try ProcessIO(reactor: reactor, paths: stdio, supervisor: runtime.supervisor)
            console = r.terminal ? try consoleSocket() : nil
        } catch {
            RootfsMounts.unmount(count: mounted, at: rootfs)
            Files.removeTree(ownBundle)
            throw error
        }
        let t = Task(id: r.id, bundle: r.bundle, ownBundle: ownBundle, rootfs: rootfs, initProcess: Process(execID: "", io: io, stdio: stdio))
        t.mounted = mounted
        pending[s.id, default: []].insert(r.id)
        let pidFile = ownBundle + "/init.pid"
        let consoleArgs = console.map { ["--console-socket", $0.path] } ?? []
        runtime.run(["create", "--bundle", ownBundle, "--pid-file", pidFile] + consoleArgs + [r.id], root: runtime.root(of: s.id), stdio: console == nil ? io.stdioMap : nil,
                    context: "create \(r.id)") { [weak self] result in
            defer { console?.close() }
            guard let self else { return }
            self.pending[s.id]?.remove(r.id)
            let failed = { (e: RPCError) in
                io.close()
                self.undo(t)
                reply(.failure(e))
            }
            switch result {
            case .failure(let e): failed(e)
            case .success:
                do {
                    if let console {
                        guard let master = console.receive() else { throw RPCError(.internal, "\(self.runtime.name) sent no terminal to its --console-socket") }
                        io.attachConsole(OwnedFD(adopting: master), size: spec.process?.consoleSize)
                    }
                    try self.adopt(t.initProcess, pidFile: pidFile, in: t, s)
                    try io.start()
                } catch {
                    // The runtime made it: it must unmake it.
                    self.runtime.run(["delete", "--force", r.id], root: self.runtime.root(of: s.id)) { _ in }
                    failed(RPCError(.internal, "create \(r.id): \(error)"))
                    return
                }
                self.tasks[s.id, default: [:]][r.id] = t
                self.registry.save(s)
                var resp = Containerd_Task_V2_CreateTaskResponse()
                resp.pid = UInt32(t.initProcess.pid)
                reply(.success(resp))
            }
        }
    }

    /// Reads the runtime's pid file and watches that process (our child: we are its
    /// subreaper). A pid file that does not name a live child of ours is refused.
    private func adopt(_ p: Process, pidFile: String, in t: Task, _ s: Sandbox) throws {
        let text = (try? Files.readString(pidFile))?.trimmingWhitespace ?? ""
        guard let pid = pid_t(text), pid > 1 else {
            throw RPCError(.internal, "\(runtime.name) wrote \"\(text.prefix(40))\" to its pid file \(pidFile), not a pid")
        }
        guard let fd = openPidfd(pid) else { throw RPCError(.internal, "pid \(pid) from \(pidFile) is gone") }
        guard ExitRecords.parent(of: pid) == getpid() else {
            _ = close(fd)
            throw RPCError(.internal, "pid \(pid) from \(pidFile) is not a child of the daemon (is it the runtime's subreaper?)")
        }
        p.pid = pid
        p.pidfd = fd
        p.startTime = ExitRecords.startTime(of: pid)
        _ = try runtime.supervisor.adopt(SpawnedProcess(pid: pid, pidfd: OwnedFD(adopting: fd))) { [weak self, weak p, weak t] status in
            guard let self, let p, let t else { return }
            p.pidfd = -1
            self.exited(p, status, in: t, s)
        }
    }

    private func exited(_ p: Process, _ status: ExitStatus, in t: Task, _ s: Sandbox, at: WallTime? = nil) {
        let report = { [weak self] in
            let at = at ?? WallTime.now()
            p.exited = (status, at)
            self?.events?.taskExited(s, containerID: t.id, execID: p.execID, pid: UInt32(p.pid), status: status, at: at)
            // Recorded before anything else: a restart must not report it again.
            self?.registry.save(s)
            p.waiters.fire((status, at))
            if p.execID.isEmpty {
                for ex in t.execs.values where ex.exited == nil && ex.pidfd >= 0 { try? sendSignal(pidfd: ex.pidfd, SIGKILL) }
            }
        }
        if let io = p.io { io.drain(report) } else { report() }
    }

    private func undo(_ t: Task) {
        RootfsMounts.unmount(count: t.mounted, at: t.rootfs)
        t.mounted = 0
        Files.removeTree(t.ownBundle)
    }

    public func start(_ r: Containerd_Task_V2_StartRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StartResponse>) throws {
        let t = try task(r.id, s)
        let p = try process(t, r.execID)
        guard !p.started else { throw RPCError(.failedPrecondition, "\(r.execID.isEmpty ? "container \(r.id)" : "exec \(r.execID)") was already started") }
        if r.execID.isEmpty {
            runtime.run(["start", r.id], root: runtime.root(of: s.id), context: "start \(r.id)") { [self] result in
                switch result {
                case .failure(let e): reply(.failure(e))
                case .success:
                    p.started = true
                    self.registry.save(s)
                    var resp = Containerd_Task_V2_StartResponse()
                    resp.pid = UInt32(p.pid)
                    reply(.success(resp))
                }
            }
            return
        }
        guard t.initProcess.exited == nil, t.initProcess.started else { throw RPCError(.failedPrecondition, "container \(r.id) is not running") }
        let dir = t.ownBundle + "/exec-" + r.execID
        let pidFile = dir + "/pid"
        // Detached execs can exit before their pid file is read: strays wait until then.
        runtime.supervisor.holdStrays()
        guard let io = p.io else { throw RPCError(.failedPrecondition, "exec \(r.execID) was recovered: it cannot be started again") }
        let console = p.stdio.terminal ? try consoleSocket() : nil
        let consoleArgs = console.map { ["--console-socket", $0.path] } ?? []
        runtime.run(["exec", "--process", dir + "/process.json", "--detach", "--pid-file", pidFile] + consoleArgs + [r.id], root: runtime.root(of: s.id), stdio: console == nil ? io.stdioMap : nil,
                    context: "exec \(r.execID) in \(r.id)") { [weak self] result in
            defer { console?.close() }
            guard let self else { return }
            defer { self.runtime.supervisor.releaseStrays() }
            switch result {
            case .failure(let e): reply(.failure(e))
            case .success:
                do {
                    if let console {
                        guard let master = console.receive() else { throw RPCError(.internal, "\(self.runtime.name) sent no terminal to its --console-socket") }
                        io.attachConsole(OwnedFD(adopting: master), size: p.consoleSize)
                    }
                    try self.adopt(p, pidFile: pidFile, in: t, s)
                    try io.start()
                } catch {
                    reply(.failure(RPCError.from(error)))
                    return
                }
                p.started = true
                self.registry.save(s)
                var resp = Containerd_Task_V2_StartResponse()
                resp.pid = UInt32(p.pid)
                reply(.success(resp))
            }
        }
    }

    public func exec(_ r: Containerd_Task_V2_ExecProcessRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let t = try task(r.id, s)
        try Identifier.validate(r.execID, what: "exec")
        guard t.execs[r.execID] == nil else { throw RPCError(.alreadyExists, "exec \(r.execID) already exists in \(r.id)") }
        let process = try TaskPayloads.process(r)
        try OCISpec.validate(process: process, field: "process")
        let dir = t.ownBundle + "/exec-" + r.execID
        try makeDirectories(dir, mode: 0o700)
        try Files.writeAtomically(dir + "/process.json", Array(r.spec.value), mode: 0o600)
        var stdio = StdioPaths(stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, terminal: r.terminal)
        stdio.containerID = r.id
        stdio.namespace = s.namespace
        let io = try ProcessIO(reactor: reactor, paths: stdio, supervisor: runtime.supervisor)
        let p = Process(execID: r.execID, io: io, stdio: stdio)
        p.consoleSize = process.consoleSize
        t.execs[r.execID] = p
        reply(.success(()))
    }

    // MARK: Delete, State

    public func delete(_ r: Containerd_Task_V2_DeleteRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_DeleteResponse>) throws {
        let t = try task(r.id, s)
        var resp = Containerd_Task_V2_DeleteResponse()
        if !r.execID.isEmpty {
            let p = try process(t, r.execID)
            guard p.exited != nil || !p.started else { throw RPCError(.failedPrecondition, "exec \(r.execID) of \(r.id) is still running") }
            t.execs[r.execID] = nil
            p.io?.close()
            registry.save(s)
            Files.removeTree(t.ownBundle + "/exec-" + r.execID)
            resp.pid = UInt32(p.pid)
            resp.exitStatus = UInt32(bitPattern: p.exited?.0.code ?? 0)
            resp.exitedAt = Google_Protobuf_Timestamp(p.exited?.1)
            reply(.success(resp))
            return
        }
        let p = t.initProcess
        guard p.exited != nil || !p.started else {
            throw RPCError(.failedPrecondition, "container \(r.id) is \(t.paused ? "paused" : "running"): kill it before delete")
        }
        let finish = { [weak self] in
            self?.remove(t, from: s)
            resp.pid = UInt32(p.pid)
            resp.exitStatus = UInt32(bitPattern: p.exited?.0.code ?? 0)
            resp.exitedAt = Google_Protobuf_Timestamp(p.exited?.1)
            reply(.success(resp))
        }
        runtime.run(["delete", "--force", r.id], root: runtime.root(of: s.id), deadlineNS: 10_000_000_000) { [weak self] result in
            if case .failure(let e) = result { self?.logger.warning("container \(r.id): \(e.message)") }
            // A created init is killed by delete --force: answer with its status once reaped.
            if p.exited == nil && p.pidfd >= 0 { _ = p.waiters.add { _ in finish() } } else { finish() }
        }
    }

    private func remove(_ t: Task, from s: Sandbox) {
        tasks[s.id]?[t.id] = nil
        if tasks[s.id]?.isEmpty == true { tasks[s.id] = nil }
        for p in [t.initProcess] + Array(t.execs.values) { p.io?.close() }
        undo(t)
        registry.save(s)
    }

    public func state(_ r: Containerd_Task_V2_StateRequest, in s: Sandbox) throws -> Containerd_Task_V2_StateResponse {
        let t = try task(r.id, s)
        let p = try process(t, r.execID)
        let status: Containerd_V1_Types_Status = p.exited != nil ? .stopped : !p.started ? .created : t.paused && p.execID.isEmpty ? .paused : .running
        return Containerd_Task_V2_StateResponse(r, bundle: t.bundle, pid: p.pid, status: status, stdio: p.stdio, exit: p.exited?.0, exitedAt: p.exited?.1)
    }

    // MARK: Signals, freezing, resources

    public func kill(_ r: Containerd_Task_V2_KillRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let t = try task(r.id, s)
        let p = try process(t, r.execID)
        let signal = Int32(bitPattern: r.signal)
        if r.all && r.execID.isEmpty {
            runtime.run(["kill", "--all", r.id, String(signal)], root: runtime.root(of: s.id), context: "kill \(r.id)") { reply($0.map { _ in () }) }
            return
        }
        guard p.exited == nil, p.pidfd >= 0 else { throw RPCError(.notFound, "process \(p.pid) has already exited") }
        // Its pidfd: no runtime call, and no pid that could have been reused.
        try sendSignal(pidfd: p.pidfd, signal)
        reply(.success(()))
    }

    public func pause(_ r: Containerd_Task_V2_PauseRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let t = try task(r.id, s)
        runtime.run(["pause", r.id], root: runtime.root(of: s.id), context: "pause \(r.id)") { [self] result in
            if case .success = result { t.paused = true; self.registry.save(s) }
            reply(result.map { _ in () })
        }
    }

    public func resume(_ r: Containerd_Task_V2_ResumeRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let t = try task(r.id, s)
        runtime.run(["resume", r.id], root: runtime.root(of: s.id), context: "resume \(r.id)") { [self] result in
            if case .success = result { t.paused = false; self.registry.save(s) }
            reply(result.map { _ in () })
        }
    }

    public func update(_ r: Containerd_Task_V2_UpdateTaskRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let t = try task(r.id, s)
        _ = try TaskPayloads.resources(r)
        let file = t.ownBundle + "/resources.json"
        try Files.writeAtomically(file, Array(r.resources.value), mode: 0o600)
        runtime.run(["update", "--resources", file, r.id], root: runtime.root(of: s.id), context: "update \(r.id)") { reply($0.map { _ in () }) }
    }

    public func pids(_ r: Containerd_Task_V2_PidsRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_PidsResponse>) throws {
        _ = try task(r.id, s)
        runtime.run(["ps", "--format", "json", r.id], root: runtime.root(of: s.id), context: "ps \(r.id)") { result in
            switch result {
            case .failure(let e): reply(.failure(e))
            case .success(let out):
                guard let pids = (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [Int] else {
                    reply(.failure(RPCError(.internal, "ps \(r.id): not a JSON list of pids: \(out.prefix(100))")))
                    return
                }
                var resp = Containerd_Task_V2_PidsResponse()
                resp.processes = pids.map { var p = Containerd_V1_Types_ProcessInfo(); p.pid = UInt32($0); return p }
                reply(.success(resp))
            }
        }
    }

    public func stats(_ r: Containerd_Task_V2_StatsRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StatsResponse>) throws {
        let t = try task(r.id, s)
        // The cgroup the runtime put the container in, read as for our own containers.
        guard t.initProcess.exited == nil, let host = registry.engine.cgroups, let cg = host.cgroup(of: t.initProcess.pid) else {
            throw RPCError(.failedPrecondition, "container \(r.id) is not running: no cgroup to read stats from")
        }
        var resp = Containerd_Task_V2_StatsResponse()
        resp.stats = try CgroupMetrics.any(cg)
        reply(.success(resp))
    }

    public func resizePty(_ r: Containerd_Task_V2_ResizePtyRequest, in s: Sandbox) throws {
        let p = try process(try task(r.id, s), r.execID)
        guard let io = p.io, p.stdio.terminal else { throw RPCError(.failedPrecondition, "\(r.execID.isEmpty ? r.id : r.execID) has no terminal") }
        try io.resize(width: r.width, height: r.height)
    }

    public func closeIO(_ r: Containerd_Task_V2_CloseIORequest, in s: Sandbox) throws {
        let p = try process(try task(r.id, s), r.execID)
        if r.stdin { p.io?.closeStdin() }
    }

    public func wait(_ r: Containerd_Task_V2_WaitRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_WaitResponse>) throws -> (() -> Void)? {
        let p = try process(try task(r.id, s), r.execID)
        let answer = { (status: ExitStatus, at: WallTime) in reply(.success(Containerd_Task_V2_WaitResponse(status, at: at))) }
        if let (status, at) = p.exited { answer(status, at); return nil }
        let token = p.waiters.add(answer)
        return { [weak p] in p?.waiters.remove(token) }
    }

    // MARK: the pod's end

    public func stopAll(in s: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void) {
        let live = (tasks[s.id] ?? [:]).values.filter { $0.initProcess.exited == nil && $0.initProcess.pidfd >= 0 }
        for t in live where t.paused { runtime.run(["resume", t.id], root: runtime.root(of: s.id)) { _ in } }
        stopGroup(Array(live), timeoutSecs: timeoutSecs, reactor: reactor,
                  signal: { t, sig in if t.initProcess.pidfd >= 0 { try? sendSignal(pidfd: t.initProcess.pidfd, sig) } },
                  isGone: { $0.initProcess.exited != nil }, whenGone: { t, gone in _ = t.initProcess.waiters.add { _ in gone() } }, done: done)
    }

    public func killAll(in s: Sandbox) {
        for t in (tasks[s.id] ?? [:]).values {
            for p in [t.initProcess] + Array(t.execs.values) where p.exited == nil && p.pidfd >= 0 { try? sendSignal(pidfd: p.pidfd, SIGKILL) }
        }
    }

    public func release(_ s: Sandbox) {
        let all = Array((tasks[s.id] ?? [:]).values)
        tasks[s.id] = nil
        let podRoot = runtime.root(of: s.id)
        var remaining = all.count
        // The pod's runtime root goes once the runtime has deleted its containers.
        let oneDone = { remaining -= 1; if remaining <= 0 { Files.removeTree(podRoot) } }
        if all.isEmpty { Files.removeTree(podRoot) }
        for t in all {
            for p in [t.initProcess] + Array(t.execs.values) where p.exited == nil && p.pidfd >= 0 { try? sendSignal(pidfd: p.pidfd, SIGKILL) }
            runtime.run(["delete", "--force", t.id], root: podRoot, deadlineNS: 10_000_000_000) { [logger] result in
                if case .failure(let e) = result { logger.warning("container \(t.id): \(e.message)") }
                oneDone()
            }
            for p in [t.initProcess] + Array(t.execs.values) { p.io?.close() }
            RootfsMounts.unmount(count: t.mounted, at: t.rootfs)
            t.mounted = 0
        }
    }

    // MARK: state across restarts

    /// What the state file keeps of a task (key "oci.<id>" of the sandbox's backend state).
    struct TaskRecord: Codable {
        var id: String
        var bundle: String
        var rootfs: String
        var mounted: Int
        var paused: Bool
        var processes: [ProcessRecord]
    }
    struct ProcessRecord: Codable {
        var execID: String
        var pid: Int32
        var startTime: UInt64
        var started: Bool
        var stdin: String, stdout: String, stderr: String
        var exitCode: Int32?
        var exitStatus: Int32?
        var exitedAt: WallTime?
    }
    static let keyPrefix = "oci."

    public func persistentState(_ s: Sandbox) -> [String: String] {
        var out: [String: String] = [:]
        for t in (tasks[s.id] ?? [:]).values {
            let procs = ([t.initProcess] + t.execs.values.sorted { $0.execID < $1.execID }).filter { $0.pid > 0 }.map { p in
                let x = p.exited?.0.siginfo
                return ProcessRecord(execID: p.execID, pid: p.pid, startTime: p.startTime, started: p.started,
                                     stdin: p.stdio.stdin, stdout: p.stdio.stdout, stderr: p.stdio.stderr,
                                     exitCode: x?.code, exitStatus: x?.status, exitedAt: p.exited?.1)
            }
            let record = TaskRecord(id: t.id, bundle: t.bundle, rootfs: t.rootfs, mounted: t.mounted, paused: t.paused, processes: procs)
            if let json = try? JSONEncoder().encode(record) { out[Self.keyPrefix + t.id] = String(decoding: json, as: UTF8.self) }
        }
        return out
    }

    static func records(_ state: [String: String]) -> [TaskRecord] {
        state.filter { $0.key.hasPrefix(keyPrefix) }.sorted { $0.key < $1.key }.compactMap {
            try? JSONDecoder().decode(TaskRecord.self, from: Data($0.value.utf8))
        }
    }

    public func exitRecordNames(_ s: Sandbox, state: [String: String]) -> [String] {
        Self.records(state).flatMap { $0.processes.map { ExitRecords.name(pid: $0.pid, startTime: $0.startTime) } }
    }

    /// Rebuilds the tasks and watches their processes again (now the keeper's children:
    /// it records their exits); one that ended while no daemon ran is reported now, once.
    public func recover(_ s: Sandbox, state: [String: String], exits: ExitRecords) {
        for r in Self.records(state) {
            var initProcess: Process?
            var execs: [String: Process] = [:]
            for pr in r.processes {
                var stdio = StdioPaths(stdin: pr.stdin, stdout: pr.stdout, stderr: pr.stderr, terminal: false)
                stdio.containerID = r.id
                stdio.namespace = s.namespace
                let p = Process(execID: pr.execID, io: nil, stdio: stdio)
                p.pid = pr.pid
                p.startTime = pr.startTime
                p.started = pr.started
                if let code = pr.exitCode, let status = pr.exitStatus { p.exited = (ExitStatus(siginfoCode: code, status: status), pr.exitedAt ?? WallTime.now()) }
                if pr.execID.isEmpty { initProcess = p } else { execs[pr.execID] = p }
            }
            guard let initProcess else { continue }
            let t = Task(id: r.id, bundle: r.bundle, ownBundle: s.stateDir + "/" + r.id, rootfs: r.rootfs, initProcess: initProcess)
            t.mounted = r.mounted
            t.paused = r.paused
            t.execs = execs
            tasks[s.id, default: [:]][r.id] = t
            for p in [initProcess] + Array(execs.values) where p.exited == nil {
                let fd = runtime.supervisor.watchForeign(pid: p.pid, startTime: p.startTime, exits: exits) { [weak self, weak p, weak t] status in
                    guard let self, let p, let t else { return }
                    p.pidfd = -1
                    self.exited(p, status ?? .exited(255), in: t, s)
                }
                if let fd {
                    p.pidfd = fd
                } else {
                    exited(p, exits.take(pid: p.pid, startTime: p.startTime) ?? .exited(255), in: t, s)
                }
            }
        }
    }
}
