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
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer
import KuasarSandbox
import KuasarTasks

/// Where the agent serves: each a ttrpc channel carrying the Task API and the Agent service.
public enum AgentChannel: Equatable, CustomStringConvertible, Sendable {
    /// A unix socket (0600): `kuasar agent --listen` on a host, the task-server kind.
    case unix(String)
    /// AF_VSOCK on this port, any CID (a guest on a host with vhost-vsock).
    case vsock(UInt32)
    /// The virtio-serial port of this name (`/dev/vport*` whose sysfs name matches).
    case serial(String)

    public static let defaultVsockPort: UInt32 = 1024

    public init(_ address: String) throws(AgentError) {
        if address.hasPrefix("unix://") {
            let path = String(address.dropFirst(7))
            guard path.hasPrefix("/") else { throw AgentError("channel \(address): a unix path must be absolute") }
            self = .unix(path)
        } else if address.hasPrefix("vsock://") {
            let port = address.dropFirst(8)
            guard let p = UInt32(port.isEmpty ? "\(Self.defaultVsockPort)" : String(port)) else { throw AgentError("channel \(address): the vsock port must be a number") }
            self = .vsock(p)
        } else if address.hasPrefix("serial://") {
            let name = String(address.dropFirst(9))
            guard !name.isEmpty, !name.contains("/") else { throw AgentError("channel \(address): a virtio-serial port name, like serial://agent") }
            self = .serial(name)
        } else if address.hasPrefix("/") {
            self = .unix(address)
        } else {
            throw AgentError("channel \"\(address)\": expected unix:///path, vsock://port or serial://name")
        }
    }

    public var description: String {
        switch self {
        case .unix(let p): "unix://\(p)"
        case .vsock(let p): "vsock://\(p)"
        case .serial(let n): "serial://\(n)"
        }
    }
}

public struct AgentError: Error, CustomStringConvertible {
    public let description: String
    public init(_ message: String) { description = message }
}

public struct AgentOptions: Sendable {
    public var channels: [AgentChannel] = []
    /// The agent's state: stdio FIFOs, the sandbox's files.
    public var root = "/run/kuasar-agent"
    /// The sandbox id the containers belong to until the host's SetupSandbox names it.
    public var sandboxID = "sandbox"
    /// containerd's namespace for events (the host may rewrap them in its own).
    public var namespace = "k8s.io"
    /// containerd's ttrpc events address (TTRPC_ADDRESS), when the agent talks to
    /// containerd directly (the task-server kind); events are also queued for NextEvents.
    public var eventsAddress = ""
    /// Bundles must lie below this directory (the host's share in a VM); nil: anywhere.
    public var bundleRoot: String?
    /// Cgroup parent of the containers (relative to the agent's own cgroup).
    public var cgroupParent = "kuasar"
    /// Guest-side timings of the boot, for Check (PID 1 fills it in).
    public var bootMS: [String: Double] = [:]
    public var debug = false
    /// PID 1's kernel command-line settings (nil: not a guest's init).
    public var guest: GuestSettings?
    /// The boot's kernel work (modules, cgroups, loopback) while the agent starts (PID 1
    /// only): waited for before the container engine looks at the cgroups.
    public var boot: GuestInit.PendingBoot?
    public init() {}
}

/// The guest agent: the Task API (v2 and v3) on the container engine, and the Agent
/// service (`kuasar.agent.v1.Agent`: Check, SetupSandbox, SyncClock, events, stdio
/// streams), on every channel it listens on. One sandbox: the VM (or the process's
/// own namespaces with `--listen`) is the pod. Single-threaded on one reactor, like the
/// daemon; as PID 1 it also reaps every orphan of the guest.
public final class Agent {
    public static let service = "kuasar.agent.v1.Agent"
    public static let maxQueuedEvents = 10_000
    let options: AgentOptions
    let logger: Logger
    let startedNS = MonotonicClock.nanoseconds()
    private(set) var reactor: Reactor?
    private var server: TTRPCServer?
    private var listeners: [Listener] = []
    private var supervisor: ProcessSupervisor?
    private var tasks: TaskService?
    private var streams: StdioStreams?
    private var registry: SandboxRegistry?
    private(set) var sandbox: Sandbox?
    private var events: [Kuasar_Agent_V1_Event] = []
    private var nextSeq: UInt64 = 1
    private var eventWaiters: [(call: TTRPCServerCall, after: UInt64, max: Int)] = []
    private var stopping = false
    /// Events dropped because no host took them (the oldest go first).
    public private(set) var droppedEvents = 0
    public var isPID1: Bool { getpid() == 1 }

    public init(options: AgentOptions, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    /// Serves until SIGTERM/SIGINT (never returns as PID 1 unless the loop fails).
    public func run() throws {
        // The agent's own start in steps, for Check's boot breakdown (a guest's PID 1 only).
        let guestInit = isPID1 && options.guest != nil
        // CLOCK_BOOTTIME (ms) when the init ended: its steps follow the kernel's.
        let initEndMS = ["kernel", "runtime", "main", "init"].reduce(0) { $0 + (bootMS[$1] ?? 0) }
        // From the init's end to here: the agent's main (its settings and channels).
        if guestInit { bootMS["handoff"] = GuestInit.bootMS() - initEndMS }
        var lapNS = MonotonicClock.nanoseconds()
        func lap(_ key: String) {
            let now = MonotonicClock.nanoseconds()
            if guestInit { bootMS[key] = Double(now - lapNS) / 1e6 }
            lapNS = now
        }
        try Signals.block([SIGTERM, SIGINT, SIGCHLD])
        Signals.ignoreSIGPIPE()
        // A guest's PID 1 takes epoll unless KUASAR_REACTOR (a kernel command-line word)
        // asks otherwise: setting up an io_uring costs ~16 ms of the boot under TCG
        // (measured: reactor 25 vs 9 ms), and the agent's loop watches a handful of fds —
        // its channel, the containers' stdio, pidfds — which epoll serves as well.
        let reactor = try Reactor(backend: guestInit && getenv("KUASAR_REACTOR") == nil ? .epoll : nil, logger: logger)
        self.reactor = reactor
        defer { shutdown() }
        let supervisor = ProcessSupervisor(reactor: reactor)
        if isPID1 { supervisor.strayLogLevel = .debug }
        self.supervisor = supervisor
        // As PID 1 every orphan of the guest is ours to reap; otherwise our own strays.
        try supervisor.enableSIGCHLDFallback()
        try reactor.onSignals([SIGTERM, SIGINT]) { [unowned self] sig in
            if self.isPID1 {
                self.logger.info("signal \(sig) ignored: PID 1 serves until the VM powers off")
                return
            }
            self.logger.info("signal \(sig == SIGTERM ? "SIGTERM" : "SIGINT"): shutting down")
            self.reactor?.stop()
        }
        try makeDirectories(options.root, mode: 0o700)
        try makeDirectories(options.root + "/io", mode: 0o700)
        lap("reactor")
        if let boot = options.boot {
            bootMS.merge(boot.finish(logger: logger)) { $1 }
            lapNS = MonotonicClock.nanoseconds()
        }
        let engine = try ContainerEngine(reactor: reactor, supervisor: supervisor, cgroups: options.boot?.cgroups, logger: logger)
        lap("engine")
        let registry = SandboxRegistry(root: options.root + "/sandboxes", engine: engine, logger: logger)
        registry.cgroupRoot = options.cgroupParent
        try makeDirectories(options.root + "/sandboxes", mode: 0o700)
        self.registry = registry
        let (sandbox, _) = try registry.register(id: options.sandboxID, namespace: options.namespace, eventsAddress: options.eventsAddress, save: false)
        sandbox.isPod = true
        sandbox.namespacesAreServers = true
        try writePodFiles(sandbox, hostname: PodFiles.hostname(), dns: nil, hosts: [])
        self.sandbox = sandbox
        let streams = StdioStreams(reactor: reactor, dir: options.root + "/io")
        self.streams = streams
        let tasks = TaskService(registry: registry, reactor: reactor, logger: logger)
        tasks.eventTap = { [unowned self] _, envelope in self.queue(envelope) }
        self.tasks = tasks
        let backend = AgentTasks(inner: tasks.containers, streams: streams, bundleRoot: options.bundleRoot)
        backend.beforeBundle = { [unowned self] in self.finishBoot() }
        let server = TTRPCServer(reactor: reactor, logger: logger)
        tasks.register(on: server, sandbox: sandbox, backend: backend)
        register(on: server)
        self.server = server
        lap("services")
        for channel in options.channels { try open(channel) }
        lap("channels")
        if options.debug && isPID1 { openDebugShell(attempt: 0) }
        // The share once the host lets the agent be (or at once when a call needs it).
        armFinishBoot(idleMS: 100)
        // (A template's clones have no free page reporting: it would punch holes in the
        // template's memory file, which every clone maps.)
        if isPID1 && options.guest?.template != true {
            _ = reactor.schedule(afterNS: 1_500_000_000) { [logger] in GuestInit.loadDeferredModules(logger: logger) }
        }
        lap("timers")
        if guestInit {
            // The agent's own start, after the init: its engine, its services, its channels.
            servingAtMS = GuestInit.bootMS()
            bootMS["serve"] = servingAtMS - initEndMS
        }
        let channels = options.channels
        logBoot("kuasar agent \(KuasarVersion.string) serving \(channels.map(\.description).joined(separator: ", ")) (pid \(getpid()), reactor: \(reactor.backendKind))")
        if guestInit {
            // After the first answer (Check), or after a second without a host.
            _ = reactor.schedule(afterNS: 1_000_000_000) { [unowned self] in self.flushBootLog() }
        } else {
            flushBootLog()
        }
        try reactor.run()
    }

    /// PID 1's boot lines until they are logged (`flushBootLog`), shortly after its first
    /// answer: each line on the serial console costs milliseconds under TCG, and its
    /// formatting code is translated afresh, which must not come before that answer (a
    /// fixed delay after serving did on a slow boot). Elsewhere they are logged at once.
    /// Kept as closures: the lines are formatted when they are logged, not on the way.
    private var bootLog: [() -> String]? = []

    private func logBoot(_ line: @autoclosure @escaping () -> String) {
        if bootLog != nil { bootLog?.append(line) } else { logger.info("\(line())") }
    }

    private func flushBootLog() {
        guard let pending = bootLog else { return }
        bootLog = nil
        var lines = pending.map { $0() }
        if isPID1, options.guest != nil {
            // Formatted here, not before the first answer: number formatting is code PID 1
            // would otherwise run (and TCG translate) first on its way to the answer.
            let ms = { (key: String) in Int(self.bootMS[key] ?? 0) }
            lines.insert("init: kernel \(GuestInit.kernelRelease()) up at \(ms("kernel")) ms; runtime and main \(ms("runtime") + ms("main")) ms, init \(ms("init")) ms, the agent's start \(ms("serve")) ms (the boot thread's modules, cgroups and lo \(ms("bootThread")) ms beside them)", at: 0)
        }
        for l in lines { logger.info("\(l)") }
    }

    /// Everything goes with the agent: its containers (SIGKILL), their cgroups (the
    /// engine's reaper retries busy ones before it closes), the streams, the sockets.
    private func shutdown() {
        stopping = true
        for l in listeners { l.close() }
        listeners.removeAll()
        server?.close()
        server = nil
        if let sandbox, let registry, registry.sandboxes[sandbox.id] === sandbox {
            tasks?.containers.killAll(in: sandbox)
            registry.remove(sandbox)
            if let host = registry.engine.cgroups {
                registry.engine.cgroupReaper.remove(host.existing(registry.cgroupRoot), owner: "the agent", kill: false)
            }
        }
        streams?.closeAll()
        streams = nil
        tasks?.close()
        tasks = nil
        registry?.engine.close()
        registry = nil
        sandbox = nil
        supervisor?.close()
        supervisor = nil
        for case .unix(let path) in options.channels { _ = unlink(path) }
        reactor?.close()
        reactor = nil
    }

    // MARK: channels

    private func open(_ channel: AgentChannel) throws {
        guard let server, let reactor else { return }
        switch channel {
        case .unix(let path):
            try server.listen(path: path)
        case .vsock(let port):
            let fd = try Socket.listenVsock(port: port)
            listeners.append(try Listener(reactor: reactor, fd: fd) { [unowned server] conn in server.serve(conn) })
        case .serial(let name):
            openSerial(name, attempt: 0)
        }
    }

    /// A virtio-serial port reads EOF while no host end is connected, and drops what is
    /// written while the guest has it closed: served again as soon as it closes.
    private func openSerial(_ name: String, attempt: Int) {
        guard !stopping, let server, let reactor else { return }
        guard let dev = VirtioPorts.device(named: name) else {
            if attempt == 0 || attempt % 100 == 0 { logger.warning("channel serial://\(name): no virtio-serial port of that name yet; retrying") }
            _ = reactor.schedule(afterNS: 20_000_000) { [weak self] in self?.openSerial(name, attempt: attempt + 1) }
            return
        }
        let fd = Glibc.open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY)
        guard fd >= 0 else {
            logger.warning("channel serial://\(name): open \(dev): \(Errno(rawValue: errno))")
            _ = reactor.schedule(afterNS: 20_000_000) { [weak self] in self?.openSerial(name, attempt: attempt + 1) }
            return
        }
        if attempt == 0 { logBoot("channel serial://\(name) is \(dev)") } else { logger.debug("channel serial://\(name): \(dev) opened again") }
        server.serve(OwnedFD(adopting: fd), closeOnOversized: true) { [weak self] in
            // The host closed (or was never there): open again shortly.
            guard let self, !self.stopping, let reactor = self.reactor else { return }
            _ = reactor.schedule(afterNS: 5_000_000) { [weak self] in self?.openSerial(name, attempt: attempt + 1) }
        }
    }

    /// kuasar.debug=1: a shell on the virtio-serial port named `debug` (the debug image
    /// has busybox; the default image has no shell, and says so). Started again whenever
    /// it exits (the host end going away ends it).
    private func openDebugShell(attempt: Int) {
        guard !stopping, let reactor, let supervisor else { return }
        guard access("/bin/sh", X_OK) == 0 else {
            logger.warning("kuasar.debug=1: this image has no /bin/sh (guest/build.py --debug makes one that has)")
            return
        }
        guard let dev = VirtioPorts.device(named: "debug") else {
            if attempt == 0 { logger.warning("kuasar.debug=1: no virtio-serial port named debug yet; retrying") }
            if attempt < 600 { _ = reactor.schedule(afterNS: 100_000_000) { [weak self] in self?.openDebugShell(attempt: attempt + 1) } }
            return
        }
        let fd = Glibc.open(dev, O_RDWR | O_CLOEXEC | O_NOCTTY)
        guard fd >= 0 else { logger.error("kuasar.debug=1: open \(dev): \(Errno(rawValue: errno))"); return }
        defer { _ = Glibc.close(fd) }
        let started = MonotonicClock.nanoseconds()
        var spec = ProcessSpec(executable: "/bin/sh", arguments: ["sh"], environment: ["PATH=/bin:/sbin", "HOME=/", "TERM=dumb", "PS1=kuasar-guest# "],
                               workingDirectory: "/", fdMap: [(fd, 0), (fd, 1), (fd, 2)])
        spec.newSession = true
        do {
            let pid = try supervisor.spawn(spec) { [weak self] _ in
                guard let self, let reactor = self.reactor else { return }
                // A shell that ends at once (no host on the port): wait a little longer.
                let quick = MonotonicClock.nanoseconds() - started < 1_000_000_000
                _ = reactor.schedule(afterNS: quick ? 1_000_000_000 : 100_000_000) { [weak self] in self?.openDebugShell(attempt: 1) }
            }
            if attempt == 0 { logger.info("kuasar.debug=1: a shell (pid \(pid)) on \(dev)") }
        } catch {
            logger.error("kuasar.debug=1: shell: \(error)")
        }
    }

    // MARK: events

    private func queue(_ envelope: Containerd_Services_Events_Ttrpc_V1_Envelope) {
        var e = Kuasar_Agent_V1_Event()
        e.seq = nextSeq
        nextSeq += 1
        e.envelope = envelope
        if events.count >= Self.maxQueuedEvents {
            events.removeFirst()
            droppedEvents += 1
            if droppedEvents == 1 || droppedEvents % 1000 == 0 { logger.warning("events: no host takes them; \(droppedEvents) dropped so far") }
        }
        events.append(e)
        let waiters = eventWaiters
        eventWaiters.removeAll()
        for w in waiters { answerEvents(w.call, after: w.after, max: w.max) }
    }

    /// Answers with the events after `after` (acknowledging those up to it), or parks.
    private func answerEvents(_ call: TTRPCServerCall, after: UInt64, max: Int) {
        events.removeAll { $0.seq <= after }
        guard !events.isEmpty else {
            eventWaiters.append((call, after, max))
            call.onCancel = { [weak self, weak call] _ in self?.eventWaiters.removeAll { $0.call === call } }
            return
        }
        var resp = Kuasar_Agent_V1_NextEventsResponse()
        resp.events = Array(events.prefix(max))
        call.onCancel = nil
        call.respond(resp)
    }

    // MARK: the Agent service

    private func register(on server: TTRPCServer) {
        func unary<Req: SwiftProtobuf.Message>(_ method: String, _ body: @escaping (TTRPCServerCall, Req) throws -> Void) {
            server.registerUnary(service: Self.service, method: method, body)
        }
        unary("Check") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Agent_V1_CheckRequest) in
            if r.session != 0 && r.session != call.session {
                // A new host on a channel that stayed open (a restarted daemon reached the
                // port before the guest saw the old one go): the old host's calls end here.
                if call.session != 0 {
                    let n = call.cancelOtherCalls(RPCError(.cancelled, "a new host session took over the channel"))
                    self.logger.info("a new host session on this channel: \(n) call(s) of the previous one dropped")
                }
                call.session = r.session
            }
            var resp = Kuasar_Agent_V1_CheckResponse()
            resp.version = KuasarVersion.string
            resp.pid = UInt32(getpid())
            resp.uptimeNs = MonotonicClock.nanoseconds() - self.startedNS
            resp.sandboxID = self.sandboxName ?? self.sandbox?.id ?? ""
            resp.kernel = GuestInit.kernelRelease()
            resp.channels = self.options.channels.map(\.description)
            if self.servingAtMS > 0 && self.bootMS["firstCall"] == nil {
                // Serving to the first Check read: the port's open reaching the host, its call.
                self.bootMS["firstCall"] = GuestInit.bootMS() - self.servingAtMS
            }
            resp.bootMs = self.bootMS
            call.respond(resp)
            if self.bootLog != nil { _ = self.reactor?.schedule(afterNS: 50_000_000) { [weak self] in self?.flushBootLog() } }
            self.armFinishBoot(idleMS: 50)
        }
        unary("SetupSandbox") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Agent_V1_SetupSandboxRequest) in
            try self.setup(r)
            call.respond(Google_Protobuf_Empty())
            self.armFinishBoot(idleMS: 50)
        }
        unary("SyncClock") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Agent_V1_SyncClockRequest) in
            guard self.isPID1 else {
                throw RPCError(.failedPrecondition, "the agent is not PID 1 of a guest (pid \(getpid())): it does not set this host's clock")
            }
            var resp = Kuasar_Agent_V1_SyncClockResponse()
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            resp.previousUnixNs = Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec)
            var ts = timespec(tv_sec: Int(r.hostUnixNs / 1_000_000_000), tv_nsec: Int(r.hostUnixNs % 1_000_000_000))
            guard r.hostUnixNs > 0, clock_settime(CLOCK_REALTIME, &ts) == 0 else {
                throw RPCError(.invalidArgument, "cannot set the clock to \(r.hostUnixNs) ns: \(Errno(rawValue: errno))")
            }
            call.respond(resp)
        }
        unary("Metrics") { [unowned self] (call: TTRPCServerCall, _: Kuasar_Agent_V1_MetricsRequest) in
            guard let sandbox = self.sandbox, let host = self.registry?.engine.cgroups else {
                throw RPCError(.failedPrecondition, "no cgroups in this guest: its kernel mounts none")
            }
            // Made only when missing (before the first container): its counters are real zeros then.
            var cg = host.existing(sandbox.cgroupParent)
            if !cg.dirs.values.allSatisfy(Files.isDirectory) {
                do { cg = try host.create(sandbox.cgroupParent) } catch { throw RPCError(.internal, "cgroup \(sandbox.cgroupParent): \(error)") }
            }
            var resp = Kuasar_Agent_V1_MetricsResponse()
            resp.data = try CgroupMetrics.any(cg)
            call.respond(resp)
        }
        unary("Restored") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Agent_V1_RestoredRequest) in
            call.respond(try self.restored(r))
        }
        unary("NextEvents") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Agent_V1_NextEventsRequest) in
            self.answerEvents(call, after: r.after, max: r.max == 0 ? 64 : Int(min(r.max, 1024)))
        }
        unary("ReadStdio") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Agent_V1_ReadStdioRequest) in
            guard let s = self.streams?.output(r.containerID, r.execID, r.stream) else {
                throw RPCError(.notFound, "no \(r.stream == .stderr ? "stderr" : "stdout") stream for container \(r.containerID)\(r.execID.isEmpty ? "" : " exec \(r.execID)") (Create and Exec make one for a `stream:` path)")
            }
            s.read(call, max: r.maxBytes == 0 ? 1 << 20 : Int(min(r.maxBytes, 4 << 20)), offset: r.resume ? nil : r.offset)
        }
        unary("WriteStdin") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Agent_V1_WriteStdinRequest) in
            guard let s = self.streams?.input(r.containerID, r.execID) else {
                throw RPCError(.notFound, "no stdin stream for container \(r.containerID)\(r.execID.isEmpty ? "" : " exec \(r.execID)")")
            }
            s.write([UInt8](r.data), call: call)
        }
        unary("CloseStdin") { [unowned self] (call: TTRPCServerCall, r: Kuasar_Agent_V1_CloseStdinRequest) in
            guard let s = self.streams?.input(r.containerID, r.execID), let sandbox = self.sandbox else {
                throw RPCError(.notFound, "no stdin stream for container \(r.containerID)\(r.execID.isEmpty ? "" : " exec \(r.execID)")")
            }
            s.whenDrained {
                guard let backend = sandbox.taskBackend else { return }
                var close = Containerd_Task_V2_CloseIORequest()
                close.id = r.containerID
                close.execID = r.execID
                close.stdin = true
                do {
                    try backend.closeIO(close, in: sandbox)
                    call.respond(Google_Protobuf_Empty())
                } catch {
                    call.fail(RPCError.from(error))
                }
            }
        }
    }

    /// A clone's first call: its own random state, then its pod's share.
    private func restored(_ r: Kuasar_Agent_V1_RestoredRequest) throws -> Kuasar_Agent_V1_RestoredResponse {
        guard isPID1, let guest = options.guest else {
            throw RPCError(.failedPrecondition, "the agent is not PID 1 of a guest (pid \(getpid())): there is no restored VM to set up")
        }
        guard r.seed.count >= 16, r.seed.count <= 512 else {
            throw RPCError(.invalidArgument, "a seed of \(r.seed.count) bytes: 16 to 512 are needed")
        }
        finishBoot()  // (nothing left in a template's clone; a booted guest's share first)
        var resp = Kuasar_Agent_V1_RestoredResponse()
        var t = MonotonicClock.nanoseconds()
        func lap(_ key: String) {
            let now = MonotonicClock.nanoseconds()
            resp.stepsMs[key] = Double(now - t) / 1e6
            t = now
        }
        do {
            try KernelRandom.reseed([UInt8](r.seed))
        } catch {
            throw RPCError(.internal, "re-seed the guest's random state: \(error)")
        }
        lap("reseed")
        if !shareMounted {
            do { try GuestInit.mountShare(guest) } catch {
                throw RPCError(.failedPrecondition, "mount the pod's share (\(guest.shareType) \(guest.shareTag)): \(error)")
            }
            shareMounted = true
        }
        lap("share")
        logger.info("restored from a template: reseeded, share mounted (\(resp.stepsMs.sorted { $0.key < $1.key }.map { "\($0.key) \(Double(Int($0.value * 10)) / 10) ms" }.joined(separator: ", ")))")
        return resp
    }

    /// A template's guest mounts the share only when restored (`Restored`); others once
    /// the boot is finished.
    private var shareMounted = false

    /// The boot's steps so far (Check reports them): PID 1's init, then `finishBoot`'s.
    private lazy var bootMS = options.bootMS

    /// A guest's PID 1 (not a template's) has the share to mount once it serves.
    private lazy var bootPending = isPID1 && options.guest.map { !$0.template } == true

    private var finishBootTimer: TimerID?
    /// CLOCK_BOOTTIME (ms) when PID 1 began serving (0: not a guest's init).
    private var servingAtMS = 0.0

    /// Runs `finishBoot` once the channel has been quiet for `idleMS` (each answer of the
    /// host's start-up calls — Check, SetupSandbox — pushes it back): a booting pod's
    /// host sends those back to back, then prepares the containers' rootfs, and the
    /// share's ~70 ms under TCG go into that pause instead of before the answers.
    private func armFinishBoot(idleMS: UInt64) {
        guard bootPending, let reactor else { return }
        if let t = finishBootTimer { reactor.cancel(t) }
        finishBootTimer = reactor.schedule(afterNS: idleMS * 1_000_000) { [weak self] in
            self?.finishBootTimer = nil
            self?.finishBoot()
        }
    }

    /// The boot's last steps (`GuestInit.finishBoot`), once: when the channel went quiet
    /// after the host's start-up calls, or before the first call that needs a bundle
    /// (Create, Restored), whichever comes first.
    func finishBoot() {
        guard bootPending, let guest = options.guest else { return }
        bootPending = false
        if let t = finishBootTimer, let reactor { reactor.cancel(t) }
        finishBootTimer = nil
        let (steps, mounted) = GuestInit.finishBoot(guest, logger: logger)
        bootMS.merge(steps) { $1 }
        shareMounted = mounted
        logger.info("init: share \(guest.shareType) \(guest.shareTag) \(shareMounted ? "mounted" : "NOT mounted") while serving (\(steps.sorted { $0.key < $1.key }.map { "\($0.key) \(Double(Int($0.value * 10)) / 10) ms" }.joined(separator: ", ")))")
    }

    /// SetupSandbox: the pod's files always (its containers bind them); the guest's own
    /// hostname and sysctls only as PID 1 — never a host's.
    private func setup(_ r: Kuasar_Agent_V1_SetupSandboxRequest) throws {
        guard let sandbox else { throw RPCError(.unavailable, "the agent is not serving yet") }
        if (!r.interfaces.isEmpty || !r.routes.isEmpty) && !isPID1 {
            throw RPCError(.failedPrecondition, "the agent is not PID 1 of a guest: it does not configure this host's interfaces or routes")
        }
        if !r.sandboxID.isEmpty {
            try Identifier.validate(r.sandboxID, what: "sandbox")
        }
        for key in r.sysctls.keys {
            guard !key.isEmpty, !key.contains(".."), !key.hasPrefix("/"), key.allSatisfy({ $0.isLetter || $0.isNumber || "._-/".contains($0) }) else {
                throw RPCError(.invalidArgument, "sysctl \"\(key)\" is not a sysctl name")
            }
        }
        if isPID1 {
            if !r.hostname.isEmpty {
                guard sethostname(r.hostname, r.hostname.utf8.count) == 0 else {
                    throw RPCError(.invalidArgument, "hostname \"\(r.hostname)\": \(Errno(rawValue: errno))")
                }
            }
            for (key, value) in r.sysctls.sorted(by: { $0.key < $1.key }) {
                let path = "/proc/sys/" + String(key.map { $0 == "." ? "/" : $0 })
                do { try Files.write(path, value) } catch { throw RPCError(.invalidArgument, "sysctl \(key)=\(value): \(error)") }
            }
        } else if !r.sysctls.isEmpty {
            throw RPCError(.failedPrecondition, "the agent is not PID 1 of a guest: it does not set this host's sysctls")
        }
        // Interfaces, then routes (a gateway must be reachable on a configured interface).
        for i in r.interfaces {
            guard !i.name.isEmpty, i.name.count < 16, !i.name.contains("/") else { throw RPCError(.invalidArgument, "interface name \"\(i.name)\"") }
            do {
                if !i.guestMac.isEmpty && i.guestMac != i.mac {
                    // A clone's NIC has the template's MAC: it takes the pod's, and its name.
                    let current = try Network.interface(withMAC: i.guestMac)
                    try Network.setUp(current, up: false)
                    try Network.setMAC(current, i.mac)
                    if current != i.name { try Network.rename(current, to: i.name) }
                } else if !i.mac.isEmpty {
                    // The NIC the host gave this MAC takes the name the pod knows it by.
                    let current = try Network.interface(withMAC: i.mac)
                    if current != i.name {
                        try Network.setUp(current, up: false)
                        try Network.rename(current, to: i.name)
                    }
                }
                if i.mtu > 0 { try Network.setMTU(i.name, Int32(i.mtu)) }
                // Up first: an interface going down drops its IPv6 addresses.
                try Network.setUp(i.name)
                for a in i.addresses { try Network.setAddress(i.name, a) }
            } catch {
                throw RPCError(error.errno == .EINVAL ? .invalidArgument : .failedPrecondition, "interface \(i.name): \(error)")
            }
        }
        for route in r.routes {
            do { try Network.addRoute(route.destination, gateway: route.gateway, device: route.device) } catch {
                throw RPCError(error.errno == .EINVAL ? .invalidArgument : .failedPrecondition, "route \(route.destination.isEmpty ? "default" : route.destination): \(error)")
            }
        }
        let dns = (r.dnsServers.isEmpty && r.dnsSearches.isEmpty && r.dnsOptions.isEmpty) ? nil : (r.dnsServers, r.dnsSearches, r.dnsOptions)
        try writePodFiles(sandbox, hostname: r.hostname.isEmpty ? PodFiles.hostname() : r.hostname, dns: dns, hosts: r.hosts)
        if !r.sandboxID.isEmpty { sandboxName = r.sandboxID }
        logger.info("sandbox \(r.sandboxID.isEmpty ? sandbox.id : r.sandboxID) set up: hostname \(r.hostname.isEmpty ? "(kept)" : r.hostname), \(r.dnsServers.count) DNS servers, \(r.sysctls.count) sysctls, \(r.interfaces.count) interfaces, \(r.routes.count) routes")
    }

    /// The id the host gave the sandbox (Check reports it).
    private var sandboxName: String?

    /// /etc/hostname, /etc/hosts and /etc/resolv.conf of the pod, bound into its containers.
    private func writePodFiles(_ sandbox: Sandbox, hostname: String, dns: ([String], [String], [String])?, hosts: [Kuasar_Agent_V1_HostEntry]) throws {
        var h = PodFiles.defaultHosts
        if !hostname.isEmpty { h += "127.0.1.1\t\(hostname)\n" }
        for e in hosts where !e.ip.isEmpty && !e.names.isEmpty { h += "\(e.ip)\t\(e.names.joined(separator: " "))\n" }
        // No DNS config: the guest's own, once; a later SetupSandbox without one keeps it.
        let resolv = dns.map { PodFiles.resolvConf(servers: $0.0, searches: $0.1, options: $0.2) }
            ?? (Files.exists(sandbox.resolvConfFile) ? nil : PodFiles.nodeResolvConf())
        try PodFiles.write(sandbox, hostname: hostname, hosts: h, resolvConf: resolv)
    }
}

/// virtio-serial ports by name (`/sys/class/virtio-ports/vportNpM/name`).
public enum VirtioPorts {
    public static func device(named name: String) -> String? {
        for port in Files.list("/sys/class/virtio-ports").sorted() {
            guard let n = try? Files.readString("/sys/class/virtio-ports/\(port)/name") else { continue }
            if n.trimmingWhitespace == name { return "/dev/" + port }
        }
        return nil
    }
}
