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
import KuasarSandbox
import KuasarSandboxKinds

/// A task-serving sandbox program, as the config names it (`[servers.<name>]`).
public struct TaskServerProgram: Sendable {
    public var name: String
    public var path: String
    /// With {id}, {state_dir}, {namespace}, {events} replaced per pod.
    public var args: [String]
    /// `unix:///path` (templated like args); empty: the first line the program prints.
    public var address: String
    public var restartOnFailure: Bool
    public var maxRestarts: UInt32
    public var readyTimeoutNS: UInt64

    public init(name: String, path: String, args: [String], address: String, restartOnFailure: Bool, maxRestarts: UInt32, readyTimeoutNS: UInt64) {
        self.name = name
        self.path = path
        self.args = args
        self.address = address
        self.restartOnFailure = restartOnFailure
        self.maxRestarts = maxRestarts
        self.readyTimeoutNS = readyTimeoutNS
    }

    func expand(_ s: String, _ sandbox: Sandbox) -> String {
        var out = s
        for (key, value) in [("{id}", sandbox.id), ("{state_dir}", sandbox.stateDir), ("{namespace}", sandbox.namespace), ("{events}", sandbox.eventsAddress)] {
            out = out.split(separator: key, omittingEmptySubsequences: false).joined(separator: value)
        }
        return out
    }
}

/// The task-server kind (`server:<name>`): the pod is made as the namespace kind makes
/// it (holder, pinned namespaces, hostname/DNS files, cgroup parent); then one program per
/// pod is launched in the pod's network, IPC and UTS namespaces and its cgroup, with its
/// output in `<state dir>/sandbox.log`. It serves the Task API at its own address, which
/// Controller.Start returns once the program answers a ttrpc call, so containerd talks
/// to it directly. Supervised by pidfd: its exit stops the pod (Controller.Wait answers)
/// unless `restart = "on-failure"` brings it back after a failure.
public final class TaskServerBackend: SandboxBackend {
    public let kind: String
    public var unavailableReason: String? {
        access(program.path, X_OK) == 0 ? nil : "task server \(program.name): \(program.path) is not an executable file"
    }
    public var onSandboxExit: ((Sandbox, ExitStatus?) -> Void)? {
        get { pods.onSandboxExit }
        set { pods.onSandboxExit = newValue }
    }

    let program: TaskServerProgram
    /// The pod itself: the namespace kind's, handed in by the wiring (its containers
    /// are the program's, not ours).
    let pods: SandboxBackend
    let registry: SandboxRegistry
    let reactor: Reactor
    let logger: Logger
    private var servers: [String: Server] = [:]

    /// One pod's program.
    final class Server {
        var pid: pid_t = 0
        var startTime: UInt64 = 0
        /// Watched by the supervisor (our child, or found again after a restart) until it exits.
        var supervised = false
        var address = ""
        var restarts: UInt32 = 0
        var stopping = false
        var exited: ExitStatus?
        var stdout: Connection?
        var log: Int32 = -1
        var exitWaiters: [() -> Void] = []
        deinit { if log >= 0 { _ = close(log) } }
    }

    /// `pods` makes and ends the pods (the namespace kind, named as this kind).
    public init(program: TaskServerProgram, pods: SandboxBackend, registry: SandboxRegistry, reactor: Reactor, logger: Logger) {
        self.program = program
        kind = pods.kind
        self.pods = pods
        self.registry = registry
        self.reactor = reactor
        self.logger = logger
    }

    public func create(_ s: Sandbox, _ request: SandboxCreateRequest, done: @escaping (Result<Void, RPCError>) -> Void) {
        pods.create(s, request, done: done)
    }

    public func start(_ s: Sandbox, done: @escaping (Result<SandboxStarted, RPCError>) -> Void) {
        let server = Server()
        servers[s.id] = server
        launch(s, server) { [weak self, weak s] result in
            guard let self, let s else { return }
            switch result {
            case .failure(let e):
                self.kill(server)
                self.servers[s.id] = nil
                done(.failure(e))
            case .success:
                // The Controller saves the pod once Start has answered.
                done(.success(.address("ttrpc+unix://" + server.address, version: 3)))
            }
        }
    }

    /// Spawns the program in the pod, then waits for its address and its first answer.
    private func launch(_ s: Sandbox, _ server: Server, ready: @escaping (Result<Void, RPCError>) -> Void) {
        let deadline = MonotonicClock.nanoseconds() + program.readyTimeoutNS
        let logPath = s.stateDir + "/sandbox.log"
        do {
            if server.log < 0 {
                server.log = try sys("open", logPath) { open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600) }
            }
            let out = try makePipe()
            let outR = out.first.take(), outW = out.second.take()
            let null = try sys("open", "/dev/null") { open("/dev/null", O_RDONLY | O_CLOEXEC) }
            defer { _ = close(null) }
            var closeW = true
            defer { if closeW { _ = close(outW) } }
            let stdout = Connection(reactor: reactor, fd: OwnedFD(adopting: outR))
            var spec = ProcessSpec(executable: program.path, arguments: [program.path] + program.args.map { program.expand($0, s) },
                                   fdMap: [(null, 0), (outW, 1), (server.log, 2)])
            spec.workingDirectory = s.stateDir
            spec.joinNamespaces = ["network", "ipc", "uts"].compactMap { s.pinned[$0] }
            let started = try registry.engine.supervisor.spawn(spec) { [weak self, weak s, weak server] status in
                guard let self, let s, let server else { return }
                self.exited(s, server, status)
            }
            _ = close(outW)
            closeW = false
            server.pid = started
            server.startTime = ExitRecords.startTime(of: started)
            server.supervised = true
            server.exited = nil
            if let host = registry.engine.cgroups {
                do { try host.create(s.cgroupParent).add(pid: started) } catch { logger.warning("sandbox \(s.id): task server into its cgroup: \(error)") }
            }
            logger.info("sandbox \(s.id): task server \(program.name) started, pid \(started), log \(logPath)")
            server.stdout = stdout
            var line: [UInt8] = []
            var addressKnown = !program.address.isEmpty
            if addressKnown { server.address = Self.path(of: program.expand(program.address, s)) }
            stdout.onRead = { [weak server] (_: Connection, bytes: UnsafeRawBufferPointer) in
                guard let server else { return }
                // Everything goes to the log; before the address is known, its first line is it.
                _ = write(server.log, bytes.baseAddress, bytes.count)
                guard !addressKnown else { return }
                line.append(contentsOf: bytes)
                if let nl = line.firstIndex(of: 10) {
                    server.address = Self.path(of: String(decoding: line[..<nl], as: UTF8.self))
                    addressKnown = true
                }
            }
            stdout.onReadEOF = { (c: Connection) in c.close() }
            try stdout.start()
            awaitAnswer(s, server, deadline: deadline, ready)
        } catch {
            ready(.failure(RPCError(.internal, "sandbox \(s.id): start task server \(program.name) (\(program.path)): \(error)")))
        }
    }

    static func path(of address: String) -> String {
        var a = address.filter { $0 != "\r" && $0 != "\n" }
        for prefix in ["ttrpc+unix://", "unix://"] where a.hasPrefix(prefix) { a = String(a.dropFirst(prefix.count)) }
        return a
    }

    /// Polls (every 10 ms) until the address accepts and answers Connect, the program
    /// exits, or the deadline passes.
    private func awaitAnswer(_ s: Sandbox, _ server: Server, deadline: UInt64, _ ready: @escaping (Result<Void, RPCError>) -> Void) {
        func retry() {
            if let status = server.exited {
                ready(.failure(RPCError(.internal, "sandbox \(s.id): task server \(program.name) exited (\(status)) before it served; its log: \(logTail(s))")))
                return
            }
            if MonotonicClock.nanoseconds() >= deadline {
                ready(.failure(RPCError(.deadlineExceeded, "sandbox \(s.id): task server \(program.name) did not answer at \(server.address.isEmpty ? "(no address printed)" : server.address) within \(program.readyTimeoutNS / 1_000_000_000) s; its log: \(logTail(s))")))
                return
            }
            reactor.schedule(afterNS: 10_000_000) { [weak self] in self?.awaitAnswer(s, server, deadline: deadline, ready) }
        }
        guard server.exited == nil, !server.address.isEmpty, access(server.address, F_OK) == 0,
              let client = try? TTRPCClient.connect(reactor: reactor, path: server.address) else { retry(); return }
        var req = Containerd_Task_V2_ConnectRequest()
        req.id = ""
        client.unary(service: "containerd.task.v3.Task", method: "Connect", req, as: Containerd_Task_V2_ConnectResponse.self,
                     timeoutNS: 2_000_000_000) { [reactor] result in
            // Closed once this callback has returned: the client is still on the stack.
            reactor.schedule(afterNS: 0) { client.close() }
            switch result {
            case .success: ready(.success(()))
            // It answered: an error status is still a ttrpc server at that address.
            case .failure(let e) where e.code != .unavailable && e.code != .deadlineExceeded && e.code != .cancelled: ready(.success(()))
            case .failure: retry()
            }
        }
    }

    private func logTail(_ s: Sandbox) -> String {
        let bytes = (try? Files.read(s.stateDir + "/sandbox.log", limit: 1 << 20)) ?? []
        let tail = String(decoding: bytes.suffix(400), as: UTF8.self).split(separator: "\n").suffix(3).joined(separator: " | ")
        return tail.isEmpty ? "(empty)" : tail
    }

    private func exited(_ s: Sandbox, _ server: Server, _ status: ExitStatus?) {
        server.exited = status ?? .exited(255)
        server.supervised = false
        let waiters = server.exitWaiters
        server.exitWaiters.removeAll()
        for w in waiters { w() }
        guard registry.sandboxes[s.id] === s, servers[s.id] === server, s.state == .ready, !server.stopping else { return }
        let failed = status.map { $0.code != 0 } ?? true
        if program.restartOnFailure && failed && server.restarts < program.maxRestarts {
            server.restarts += 1
            let backoff = UInt64(100_000_000) << UInt64(min(server.restarts - 1, 5))
            logger.warning("sandbox \(s.id): task server \(program.name) exited (\(status.map { "\($0)" } ?? "status unknown")); restart \(server.restarts) of \(program.maxRestarts) in \(backoff / 1_000_000) ms")
            reactor.schedule(afterNS: backoff) { [weak self, weak s] in
                guard let self, let s, self.servers[s.id] === server, !server.stopping else { return }
                self.launch(s, server) { [weak self, weak s] result in
                    guard let self, let s else { return }
                    if case .failure(let e) = result {
                        self.logger.error("\(e.message)")
                        self.kill(server)
                        self.pods.onSandboxExit?(s, server.exited)
                    } else {
                        self.registry.save(s)
                    }
                }
            }
            return
        }
        logger.warning("sandbox \(s.id): task server \(program.name) pid \(server.pid) exited (\(status.map { "\($0)" } ?? "status unknown")); the pod is not ready")
        pods.onSandboxExit?(s, status ?? .exited(255))
    }

    /// Through the supervisor's pidfd (our child, or one recovered after a restart).
    private func signal(_ server: Server, _ sig: Int32) {
        guard server.supervised else { return }
        try? registry.engine.supervisor.signal(server.pid, sig)
    }

    private func kill(_ server: Server) {
        server.stopping = true
        signal(server, SIGKILL)
    }

    /// SIGTERM to the program (it stops its containers), SIGKILL after the timeout; then
    /// the pod's holder.
    public func stop(_ s: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void) {
        guard let server = servers[s.id], server.supervised else {
            pods.stop(s, timeoutSecs: 0, done: done)
            return
        }
        server.stopping = true
        var finished = false
        let timer = reactor.schedule(afterNS: UInt64(max(timeoutSecs, 0)) * 1_000_000_000 + 1) { [weak self, weak server] in
            guard let self, let server else { return }
            self.signal(server, SIGKILL)
        }
        server.exitWaiters.append { [weak self, weak s] in
            guard !finished else { return }
            finished = true
            guard let self, let s else { done(); return }
            self.reactor.cancel(timer)
            self.pods.stop(s, timeoutSecs: 0, done: done)
        }
        signal(server, timeoutSecs == 0 ? SIGKILL : SIGTERM)
    }

    public func shutdown(_ s: Sandbox) {
        if let server = servers.removeValue(forKey: s.id) {
            kill(server)
            server.stdout?.close()
        }
        pods.shutdown(s)
    }

    public func update(_ s: Sandbox, resources: OCISpec.Resources) throws { try pods.update(s, resources: resources) }
    public func metrics(_ s: Sandbox, done: @escaping (Result<Google_Protobuf_Any, RPCError>) -> Void) { pods.metrics(s, done: done) }

    /// The program's pid: containerd's CRI points the containers' namespaces at it, and
    /// the program runs in the pod's.
    public func pid(_ s: Sandbox) -> UInt32 { servers[s.id].map { UInt32($0.pid) } ?? pods.pid(s) }

    public func statusInfo(_ s: Sandbox) -> [String: Any] {
        var info = pods.statusInfo(s)
        if let server = servers[s.id] {
            info["taskServer"] = ["program": program.path, "pid": Int(server.pid), "address": server.address,
                                  "restarts": Int(server.restarts), "log": s.stateDir + "/sandbox.log",
                                  "running": server.exited == nil] as [String: Any]
        }
        return info
    }

    public func persistentState(_ s: Sandbox) -> [String: String] {
        guard let server = servers[s.id] else { return [:] }
        return ["serverPid": String(server.pid), "serverStart": String(server.startTime), "serverAddress": server.address, "serverRestarts": String(server.restarts)]
    }

    /// The program outlives a daemon restart (re-parented to the keeper): watched again,
    /// or, if it ended meanwhile, the pod stops with the status the keeper recorded.
    public func recover(_ s: Sandbox, state: [String: String], exits: ExitRecords) {
        pods.recover(s, state: state, exits: exits)
        guard let pid = state["serverPid"].flatMap({ pid_t($0) }), pid > 0, let start = state["serverStart"].flatMap({ UInt64($0) }) else { return }
        let server = Server()
        server.pid = pid
        server.startTime = start
        server.address = state["serverAddress"] ?? ""
        server.restarts = state["serverRestarts"].flatMap { UInt32($0) } ?? 0
        server.log = open(s.stateDir + "/sandbox.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        servers[s.id] = server
        guard s.state == .ready else { return }
        let fd = registry.engine.supervisor.watchForeign(pid: pid, startTime: start, exits: exits) { [weak self, weak s, weak server] status in
            guard let self, let s, let server else { return }
            self.exited(s, server, status)
        }
        if fd != nil {
            server.supervised = true
        } else {
            exited(s, server, exits.take(pid: pid, startTime: start))
        }
    }

    public func exitRecordNames(_ s: Sandbox, state: [String: String]) -> [String] {
        var names = pods.exitRecordNames(s, state: state)
        if let pid = state["serverPid"].flatMap({ pid_t($0) }), let start = state["serverStart"].flatMap({ UInt64($0) }) { names.append(ExitRecords.name(pid: pid, startTime: start)) }
        return names
    }
}
