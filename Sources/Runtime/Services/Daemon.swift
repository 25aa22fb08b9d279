#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarGRPC
import KuasarContainer
import KuasarSandbox
import KuasarSandboxKinds
import KuasarTasks

/// The daemon process: one reactor, the API socket (gRPC: the sandbox Controller and
/// health), the admin socket (ttrpc), and the children it supervises.
public final class Daemon {
    let options: KuasarConfig
    let logger: Logger
    private(set) var reactor: Reactor?
    private var listener: Listener?
    private var supervisor: ProcessSupervisor?
    private var registry: SandboxRegistry?
    private var tasks: TaskService?
    private var admin: AdminService?
    private var grpc: GRPCServer?
    private var controller: ControllerService?
    private var health: HealthService?
    /// Accepted connections whose first bytes have not said yet what they speak.
    private struct Sniffing {
        var registration: Reactor.Registration
        var deadline: TimerID
        var peer: pid_t
    }
    private var sniffing: [Int32: Sniffing] = [:]
    /// A connection that sends nothing is closed after this; one peer (by its pid) may
    /// hold at most `maxSilentPerPeer` such connections, everyone `maxSilent`.
    static let handshakeTimeoutNS: UInt64 = 5_000_000_000
    static let maxSilentPerPeer = 256
    static let maxSilent = 1024
    private var ownsAdminPath = false
    /// Only a path we bound is ours to remove: a failed start must not delete another
    /// daemon's socket, or a file that merely sits where the socket should be.
    private var ownsSocketPath = false
    private var fdsAtStart = 0

    /// The sandbox kinds it serves; only the executable knows them all.
    let makeBackends: BackendFactory

    public init(options: KuasarConfig, logger: Logger, backends: @escaping BackendFactory) {
        self.options = options
        self.logger = logger
        makeBackends = backends
    }

    /// Signals the daemon handles on its loop. Blocked before anything else runs so
    /// no thread (ours or a library's) takes them with the default action.
    public static let handledSignals: [Int32] = [SIGTERM, SIGINT, SIGCHLD]

    /// Runs until SIGTERM or SIGINT, then closes every descriptor it opened.
    public func run() throws(SystemError) {
        fdsAtStart = openFDCount()
        try Signals.block(Self.handledSignals)
        Signals.ignoreSIGPIPE()
        let reactor = try Reactor(backend: options.reactor, logger: logger)
        self.reactor = reactor
        defer { shutdown() }

        let supervisor = ProcessSupervisor(reactor: reactor)
        self.supervisor = supervisor
        try supervisor.enableSIGCHLDFallback()
        try reactor.onSignals([SIGTERM, SIGINT]) { [unowned self] sig in
            self.logger.info("signal \(sig == SIGTERM ? "SIGTERM" : "SIGINT"): shutting down")
            // Watchers hear NOT_SERVING while the loop still writes.
            self.health?.shutdown()
            self.reactor?.stop()
        }

        let root = options.effectiveRoot
        try makeDirectories(root, mode: 0o700)
        let engine = try ContainerEngine(reactor: reactor, supervisor: supervisor, logger: logger)
        // Terminals and stdin pipes go to our keeper as they are made.
        engine.keeperStore = KeeperStore.fromKeeper
        let registry = SandboxRegistry(root: root, engine: engine, logger: logger)
        registry.cgroupRoot = options.cgroupParent
        self.registry = registry
        let tasks = TaskService(registry: registry, reactor: reactor, logger: logger)
        self.tasks = tasks
        let admin = AdminService(registry: registry, tasks: tasks, reactor: reactor, logger: logger)
        self.admin = admin
        try admin.listen(path: options.adminSocketPath)
        ownsAdminPath = true
        let grpc = GRPCServer(reactor: reactor, logger: logger)
        let backends = makeBackends(BackendContext(registry: registry, containers: tasks.containers, reactor: reactor, logger: logger))
        let controller = ControllerService(registry: registry, tasks: tasks, reactor: reactor, logger: logger, backends: backends)
        controller.sandboxers = options.sandboxers
        controller.eventsAddress = options.containerdAddress
        controller.register(on: grpc)
        self.controller = controller
        admin.shimTasks = { [unowned controller] name in try controller.shimTasks(forSandboxer: name) }
        let health = HealthService(services: [ControllerService.service])
        health.register(on: grpc)
        self.health = health
        self.grpc = grpc

        let fd = try Socket.listenUnix(path: options.socket)
        ownsSocketPath = true
        // After the binds: a live daemon on this root refuses them, so only a dead
        // daemon's pid file is replaced and its sandboxes taken over.
        try Files.writeAtomically(pidFile, Array("\(getpid())\n".utf8), mode: 0o644)
        try recover(registry: registry, tasks: tasks, controller: controller)
        listener = try Listener(reactor: reactor, fd: fd) { [unowned self] conn in self.accept(conn) }
        logger.info("kuasar \(KuasarVersion.string) listening on \(options.socket) (reactor: \(reactor.backendKind))")
        notifySystemd(reactor)
        try reactor.run()
    }

    /// The API socket speaks gRPC over h2c (containerd's sandbox Controller and the
    /// health service): a connection must open with the HTTP/2 preface "PRI * HTTP/2.0"
    /// within the handshake deadline, peeked here without consuming it.
    private func accept(_ fd: consuming OwnedFD) {
        guard let reactor else { fd.close(); return }
        let raw = fd.take()
        let peer = Socket.peerPid(raw)
        guard sniffing.count < Self.maxSilent,
              sniffing.values.lazy.filter({ $0.peer == peer }).count < Self.maxSilentPerPeer else {
            logger.warning("api socket: closing a connection from pid \(peer): too many connections that have sent nothing yet")
            _ = close(raw)
            return
        }
        do {
            let reg = try reactor.register(fd: raw, interest: .readable) { [unowned self] _ in self.sniff(raw) }
            let deadline = reactor.schedule(afterNS: Self.handshakeTimeoutNS) { [unowned self] in
                guard let s = self.sniffing.removeValue(forKey: raw) else { return }
                self.reactor?.deregister(s.registration)
                _ = close(raw)
                self.logger.info("api socket: closed a connection from pid \(peer) that sent nothing for \(Self.handshakeTimeoutNS / 1_000_000_000) s")
            }
            sniffing[raw] = Sniffing(registration: reg, deadline: deadline, peer: peer)
        } catch {
            logger.error("cannot serve a connection: \(error)")
            _ = close(raw)
        }
    }

    private func sniff(_ raw: Int32) {
        var head = [UInt8](repeating: 0, count: 4)
        let n = recv(raw, &head, 4, Int32(MSG_PEEK | MSG_DONTWAIT))
        if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
        let preface = Array("PRI ".utf8)
        // Wait for four bytes while they could still be the preface.
        if n > 0 && n < 4 && Array(head[..<n]) == Array(preface[..<n]) { return }
        if let s = sniffing.removeValue(forKey: raw) {
            reactor?.deregister(s.registration)
            reactor?.cancel(s.deadline)
        }
        if n == 4 && head == preface, let grpc {
            grpc.serve(OwnedFD(adopting: raw))
        } else {
            // gRPC only (health is grpc.health.v1 on it): anything else is closed.
            if n > 0 { logger.info("api socket: closed a connection from pid \(Socket.peerPid(raw)) that does not speak gRPC (h2c)") }
            _ = close(raw)
        }
    }

    /// Under systemd (Type=notify): READY once every socket listens and every sandbox is
    /// recovered; MAINPID is this process (the keeper, our parent, is what systemd
    /// started); WATCHDOG pings from the loop itself at half the unit's interval, so a
    /// loop that hangs stops pinging and systemd restarts the daemon.
    private func notifySystemd(_ reactor: Reactor) {
        guard let notify = SystemdNotify(environment: currentEnvironmentDictionary()) else { return }
        let count = registry?.sandboxes.count ?? 0
        do {
            try notify.send("READY=1\nMAINPID=\(getpid())\nSTATUS=serving \(count) sandboxes on \(options.socket)")
        } catch {
            logger.warning("sd_notify READY: \(error)")
        }
        if let usec = notify.watchdogUSec {
            let every = max(usec / 2, 1000) * 1000
            reactor.schedule(afterNS: every, repeatingNS: every) { [logger] in
                do { try notify.send("WATCHDOG=1") } catch { logger.warning("sd_notify WATCHDOG: \(error)") }
            }
        }
    }

    /// The exit records the keeper writes for containers that end while no daemon runs.
    var exits: ExitRecords { ExitRecords(dir: options.effectiveRoot + "/exits") }
    var pidFile: String { Daemon.pidFile(root: options.effectiveRoot) }

    /// Where a daemon writes its pid (the process to signal: the keeper is its parent).
    public static func pidFile(root: String) -> String { root + "/daemon.pid" }

    /// The pid a daemon on `root` wrote, if any.
    public static func pid(root: String) -> pid_t? {
        (try? Files.readString(pidFile(root: root))).flatMap { pid_t($0.trimmingWhitespace) }
    }

    /// Takes over what the previous daemon left: every recorded sandbox is rebuilt, its
    /// Task API served again, its containers watched through new pidfds; an exit that
    /// happened in between is reported once (event, Wait, State) with the status the
    /// keeper recorded.
    private func recover(registry: SandboxRegistry, tasks: TaskService, controller: ControllerService) throws(SystemError) {
        let exits = self.exits
        try makeDirectories(exits.dir, mode: 0o700)
        // Terminals and stdin pipes that earlier keepers kept for their dead daemons.
        registry.engine.handedOver = KeeperStore.takeOver(root: options.effectiveRoot, except: Keeper.pid)
        defer {
            // Nobody claimed these: their processes are gone.
            for fd in registry.engine.handedOver.values { _ = close(fd) }
            registry.engine.handedOver = [:]
        }
        let (sandboxes, containers) = registry.recover()
        guard !sandboxes.isEmpty else {
            exits.removeAll(except: [])
            return
        }
        // Records of processes that were not containers (helpers, execs) are dropped;
        // those of recovered containers are taken as they are found.
        let holders = sandboxes.compactMap { $0.holder.map { ExitRecords.name(pid: $0.pid, startTime: $0.startTime) } }
        exits.removeAll(except: Set(containers.flatMap(\.exitRecordNames) + holders + sandboxes.flatMap { controller.exitRecordNames($0) }))
        for r in containers { tasks.containers.watch(r.container, in: r.sandbox) }
        for r in containers { registry.resume(r, exits: exits) }
        // Each kind re-attaches to what it runs (a pod's holder, a VM), then the Task API
        // is served again where this daemon serves it.
        for s in sandboxes { controller.recover(s, exits: exits) }
        for s in sandboxes where s.state != .created && s.taskAddressOverride == nil {
            do { try tasks.serve(s) } catch { logger.error("sandbox \(s.id): Task API not served again: \(error)") }
        }
        for s in sandboxes { registry.save(s) }
        logger.info("recovered \(sandboxes.count) sandboxes, \(containers.count) containers")
    }

    private func shutdown() {
        for (raw, s) in sniffing {
            reactor?.deregister(s.registration)
            reactor?.cancel(s.deadline)
            _ = close(raw)
        }
        sniffing.removeAll()
        health?.shutdown()
        health = nil
        grpc?.close()
        grpc = nil
        let controller = self.controller
        self.controller = nil
        controller?.daemonExiting()
        // on_exit = "stop": containers go with the daemon, and so do their cgroups,
        // mounts and state. "keep": they run on, recorded for the next daemon, and the
        // keeper reaps them if they end before it comes.
        if let registry {
            if options.onExit == .stop {
                for sandbox in registry.sandboxes.values {
                    // What the kind runs beyond our containers goes too (a task server, a VMM).
                    controller?.releaseForExit(sandbox)
                    for c in sandbox.containers.values { try? c.kill(signal: SIGKILL, all: true) }
                    registry.remove(sandbox)
                }
            } else {
                for sandbox in registry.sandboxes.values { registry.save(sandbox) }
            }
            if registry.sandboxes.isEmpty || options.onExit == .stop {
                // Nothing to recover: neither exit records nor a store to hand over.
                _ = rmdir(exits.dir)
                if let keeper = Keeper.pid { _ = unlink(KeeperStore.socketPath(root: options.effectiveRoot, keeper: keeper)) }
                _ = rmdir(options.effectiveRoot + "/keepers")
            }
        }
        if ownsSocketPath { _ = unlink(pidFile) }
        tasks?.close()
        tasks = nil
        registry?.engine.close()
        admin?.close()
        admin = nil
        registry = nil
        if ownsAdminPath { _ = unlink(options.adminSocketPath) }
        listener?.close()
        listener = nil
        supervisor?.close()
        supervisor = nil
        reactor?.close()
        reactor = nil
        if ownsSocketPath && unlink(options.socket) != 0 && Errno.current != .ENOENT {
            logger.warning("could not remove \(options.socket): \(Errno.current)")
        }
        // Every descriptor opened since start must be closed by now.
        logger.info("stopped; descriptors open: \(openFDCount()) (at start: \(fdsAtStart))")
    }
}
