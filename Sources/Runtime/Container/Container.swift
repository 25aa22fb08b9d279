#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarOCI
import KuasarSystem
import KuasarReactor

/// Wall-clock time of an event (exit, creation), as protobuf Timestamps want it.
public struct WallTime: Sendable, Equatable, Codable {
    public var seconds: Int64
    public var nanos: Int32
    public init(seconds: Int64, nanos: Int32) {
        self.seconds = seconds
        self.nanos = nanos
    }
    public static func now() -> WallTime {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return WallTime(seconds: Int64(ts.tv_sec), nanos: Int32(ts.tv_nsec))
    }
}

/// An error a container operation reports to its caller, already worded for people.
public struct ContainerError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable { case notFound, alreadyExists, invalid, failedPrecondition, failed }
    public let kind: Kind
    public let message: String
    /// The system call's errno behind a failure, kept for its wire status.
    public let errno: Errno?
    public init(_ kind: Kind, _ message: String, errno: Errno? = nil) { self.kind = kind; self.message = message; self.errno = errno }
    /// A failure caused by `cause`: its errno (a SystemError's, or a ContainerError's own) goes along.
    public init(_ message: String, cause: any Error) {
        kind = .failed
        self.message = message
        errno = (cause as? SystemError)?.errno ?? (cause as? ContainerError)?.errno
    }
    public var description: String { message }
}

/// The daemon-wide parts every container uses: the reactor, exit supervision, the
/// cgroup layout and our own pid namespace (to return to after cloning into another).
public final class ContainerEngine {
    public let reactor: Reactor
    public let supervisor: ProcessSupervisor
    public let cgroups: CgroupHost?
    /// The keeper's descriptor store (nil when not started by a keeper), and what an
    /// earlier keeper handed over at recovery, by key, until processes claim it.
    public var keeperStore: KeeperStore?
    public var handedOver: [String: Int32] = [:]
    public let logger: Logger
    let selfPidNamespace: Int32
    /// Removes container cgroups once the kernel lets go of them, off the request path.
    public let cgroupReaper: CgroupReaper

    /// `cgroups`: the layout when the caller knows it (a guest's PID 1 that mounted it);
    /// nil: read from /proc/self.
    public init(reactor: Reactor, supervisor: ProcessSupervisor, cgroups known: CgroupHost? = nil, logger: Logger = Logger(label: "kuasar.container")) throws(SystemError) {
        self.reactor = reactor
        self.supervisor = supervisor
        self.logger = logger
        cgroupReaper = CgroupReaper(reactor: reactor, logger: logger)
        cgroups = known ?? (try? CgroupHost.detect())
        selfPidNamespace = try sys("open", "/proc/self/ns/pid") { open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC) }
    }

    private var closed = false

    /// Releases the engine's own descriptors (daemon shutdown).
    public func close() {
        guard !closed else { return }
        closed = true
        cgroupReaper.close()
        PodHolderSpawner.releaseImage()
        _ = Glibc.close(selfPidNamespace)
    }

    deinit { close() }
}

/// One process of a container — its init or an exec — from clone to reaped exit.
public final class ContainerProcess {
    public enum State: Equatable, Sendable {
        /// Cloned, setting itself up (init) or about to exec.
        case creating
        /// Init only: set up and waiting for Start.
        case created
        case running
        case stopped
    }

    public let execID: String
    public private(set) var state: State = .creating
    public private(set) var pid: pid_t = 0
    /// The process's start time (/proc/<pid>/stat), which tells it from a recycled pid
    /// after a daemon restart.
    public private(set) var startTime: UInt64 = 0
    public private(set) var exitStatus: ExitStatus?
    public private(set) var exitedAt: WallTime?
    public let stdio: StdioPaths
    public let io: ProcessIO
    /// The spec of this process (exec: the request's; init: the container's).
    public let spec: OCISpec.Process
    var pidfdRaw: Int32 = -1
    private var syncBuffer: [UInt8] = []
    private var pendingReady: ((Result<pid_t, ContainerError>) -> Void)?
    private var pendingStart: ((Result<pid_t, ContainerError>) -> Void)?
    private var waiters = WaiterList<(ExitStatus, WallTime)>()
    /// Its container, told of the exit (`onProcessExit`) once the output is drained.
    weak var container: Container?
    /// What the child executes instead of `spec.args[0]` (a wasm module's runner); set
    /// before the process is launched.
    public var hostProgram: HostProgram?

    init(execID: String, spec: OCISpec.Process, stdio: StdioPaths, io: ProcessIO) {
        self.execID = execID
        self.spec = spec
        self.stdio = stdio
        self.io = io
    }

    public var isInit: Bool { execID.isEmpty }

    /// Calls `body` once this process has exited (at once if it already has). The
    /// token cancels the wait (a Wait whose client went away must not pile up).
    @discardableResult
    public func wait(_ body: @escaping (ExitStatus, WallTime) -> Void) -> Int? {
        if let s = exitStatus, let t = exitedAt { body(s, t); return nil }
        return waiters.add { body($0.0, $0.1) }
    }

    public func cancelWait(_ token: Int) { waiters.remove(token) }

    public var waiterCount: Int { waiters.count }

    public func signal(_ sig: Int32) throws(ContainerError) {
        guard state == .running || state == .created || state == .creating, pidfdRaw >= 0 else {
            throw ContainerError(.notFound, "process \(pid) has already exited")
        }
        do { try sendSignal(pidfd: pidfdRaw, sig) } catch {
            if error.errno == .ESRCH { throw ContainerError(.notFound, "process \(pid) has already exited") }
            throw ContainerError("\(error)", cause: error)
        }
    }

    /// A process that outlived the previous daemon (recorded `state`, `pid` and
    /// `startTime`): watched again through a new pidfd, its exit status coming from the
    /// keeper. A process already gone is reported as exited now — once, since the state
    /// written after this report says stopped.
    /// With `exit`, the process was recorded as stopped and only takes that status back.
    func recover(pid: pid_t, startTime: UInt64, state: State, exit: (ExitStatus, WallTime)?, engine: ContainerEngine, exits: ExitRecords) {
        self.pid = pid
        self.startTime = startTime
        if let exit {
            exitStatus = exit.0
            exitedAt = exit.1
            self.state = .stopped
            return
        }
        self.state = state
        reactor = engine.reactor
        let report = { [weak self] (status: ExitStatus?) in
            // Unknown (no keeper recorded it): 255, as containerd reports a lost status.
            self?.exited(status ?? .exited(255))
        }
        if let fd = engine.supervisor.watchForeign(pid: pid, startTime: startTime, exits: exits, onExit: { [weak self] st in
            self?.pidfdRaw = -1
            report(st)
        }) {
            pidfdRaw = fd
            return
        }
        let recorded = exits.take(pid: pid, startTime: startTime)
        if recorded == nil { engine.logger.error("pid \(pid) ended while the daemon was down and no keeper recorded its status") }
        // Reported from the loop, once the caller has wired its exit handlers.
        engine.reactor.schedule(afterNS: 0) { report(recorded) }
    }

    // MARK: sync socket

    func attach(_ child: consuming LaunchedChild, engine: ContainerEngine) throws(SystemError) {
        pid = child.pid
        pidfdRaw = child.pidfd.rawValue
        startTime = ExitRecords.startTime(of: child.pid)
        reactor = engine.reactor
        let syncFD = child.sync.take()
        syncFDRaw = syncFD
        syncRegistration = try engine.reactor.register(fd: syncFD, interest: .readable) { [weak self] _ in self?.readSync() }
        let process = SpawnedProcess(pid: child.pid, pidfd: child.pidfd.take().adopted())
        try engine.supervisor.adopt(process) { [weak self] status in self?.exited(status) }
    }

    private var reactor: Reactor?
    private var syncFDRaw: Int32 = -1
    private var syncRegistration: Reactor.Registration?

    /// The sync socket carries reports and, in terminal mode, the console's master fd:
    /// read with recvmsg so the descriptor is not lost.
    private func readSync() {
        guard let reactor else { return }
        // The reactor's one read buffer: reports are read and copied out at once.
        let buf = reactor.sharedReadBuffer
        while syncFDRaw >= 0 {
            var passed: Int32 = -1
            let n = Socket.receiveWithFD(syncFDRaw, buf.baseAddress!, buf.count, &passed)
            if passed >= 0 { io.attachConsole(OwnedFD(adopting: passed), size: spec.consoleSize) }
            if n > 0 {
                syncBuffer.append(contentsOf: UnsafeRawBufferPointer(rebasing: buf[..<Int(n)]))
                consumeReports()
                continue
            }
            if n == -Int(Errno.EAGAIN.rawValue) { return }
            closeSync()
            syncClosed()
            return
        }
    }

    private func closeSync() {
        if let reg = syncRegistration { reactor?.deregister(reg) }
        syncRegistration = nil
        if syncFDRaw >= 0 { _ = Glibc.close(syncFDRaw) }
        syncFDRaw = -1
    }

    private func writeSync(_ byte: UInt8) {
        guard syncFDRaw >= 0 else { return }
        var b = byte
        _ = Glibc.send(syncFDRaw, &b, 1, Int32(MSG_NOSIGNAL))
    }

    func go() {
        writeSync(UInt8(ascii: "G"))
    }

    /// 'G' once the process is in its cgroups: v2 and no cgroup need nothing more
    /// (CLONE_INTO_CGROUP); v1 is joined by a joiner process, off the loop.
    func joinThenGo(_ cgroup: Cgroup?, engine: ContainerEngine) throws(SystemError) {
        guard let cgroup, cgroup.mode == .v1 else { go(); return }
        let join = try cgroup.startJoin(pid: pid)
        try engine.supervisor.adopt(join.takeProcess()) { [weak self] status in
            join.release()
            guard let self else { return }
            if status == .exited(0) {
                self.go()
            } else {
                let errno: Errno? = if case .exited(let e) = status { Errno(rawValue: e) } else { nil }
                self.setupFailed(ContainerError(.failed, "join cgroup \(cgroup.path): \(errno.map { "\($0)" } ?? "\(status)")"))
            }
        }
    }

    /// Set-up failed outside the child: the pending Create (or exec Start) fails with
    /// `e`, and the child is killed before it ran anything.
    func setupFailed(_ e: ContainerError) {
        failed(e)
        abandon()
    }

    func whenReady(_ body: @escaping (Result<pid_t, ContainerError>) -> Void) { pendingReady = body }

    func start(_ body: @escaping (Result<pid_t, ContainerError>) -> Void) {
        pendingStart = body
        writeSync(UInt8(ascii: "S"))
    }

    private static let reportSize = ContainerLauncher.childReportSize

    private func consumeReports() {
        while syncBuffer.count >= Self.reportSize {
            let kind = syncBuffer.withUnsafeBytes { $0.load(fromByteOffset: 0, as: Int32.self) }
            let err = syncBuffer.withUnsafeBytes { $0.load(fromByteOffset: 4, as: Int32.self) }
            let textBytes = syncBuffer[8..<Self.reportSize].prefix { $0 != 0 }
            let what = String(decoding: textBytes, as: UTF8.self)
            syncBuffer.removeFirst(Self.reportSize)
            if kind == 2 { continue }  // the console's fd, taken by readSync
            if kind == 0 {
                state = .created
                let r = pendingReady
                pendingReady = nil
                r?(.success(pid))
            } else {
                let e = ContainerError(.failed, "\(what): \(Errno(rawValue: err))", errno: Errno(rawValue: err))
                failed(e)
            }
        }
    }

    private var failure: ContainerError?

    private func failed(_ e: ContainerError) {
        failure = e
        if let r = pendingReady { pendingReady = nil; r(.failure(e)) }
        if let s = pendingStart { pendingStart = nil; s(.failure(e)) }
    }

    private func syncClosed() {
        // End of file after 'S' is the exec: the close-on-exec socket went away.
        if let s = pendingStart, failure == nil {
            pendingStart = nil
            state = .running
            s(.success(pid))
        }
        if let r = pendingReady {
            pendingReady = nil
            r(.failure(failure ?? ContainerError(.failed, "the container process exited while it was being set up")))
        }
    }

    /// Exec children run at once: no 'S' step; EOF on the sync socket means exec'd.
    func expectExec(_ body: @escaping (Result<pid_t, ContainerError>) -> Void) {
        pendingStart = body
    }

    /// Abandons a process that was never started (Delete after Create).
    func abandon() {
        closeSync()
        if pidfdRaw >= 0 { try? sendSignal(pidfd: pidfdRaw, SIGKILL) }
    }

    private func exited(_ status: ExitStatus) {
        let wasRunning = state
        pidfdRaw = -1
        if syncFDRaw >= 0 {
            readSync()  // a last report (an exec error) may sit unread
            closeSync()
            syncClosed()
        }
        let at = WallTime.now()
        // Output first: the exit is reported only once the FIFOs hold everything.
        io.drain { [self] in
            exitStatus = status
            exitedAt = at
            state = .stopped
            if wasRunning != .running { failed(failure ?? ContainerError(.failed, "the container process \(status) before it ran")) }
            waiters.fire((status, at))
            if let container { container.onProcessExit?(container, self) }
        }
    }
}

/// A container: its bundle, spec, cgroup, init process and execs.
public final class Container {
    public enum State: String, Sendable {
        case creating, created, running, paused, stopped
    }

    public let id: String
    public let bundle: String
    public let spec: OCISpec
    public let rootfs: String
    public let cgroup: Cgroup?
    public let initProcess: ContainerProcess
    public private(set) var execs: [String: ContainerProcess] = [:]
    public private(set) var paused = false
    /// Mounts the runtime made for this container (containerd's rootfs), unmounted on delete.
    public var ownedMounts: [String] = []
    let engine: ContainerEngine
    /// Namespaces an exec joins (those the container did not share with the host).
    let execNamespaces: UInt64
    public var onProcessExit: ((Container, ContainerProcess) -> Void)?
    /// The kernel OOM-killed a process of this container (TaskOOM).
    public var onOOM: ((Container) -> Void)? {
        didSet { if onOOM != nil { watchOOM() } }
    }
    private var oomFD: Int32 = -1
    private var oomRegistration: Reactor.Registration?
    private var oomKills: UInt64 = 0

    private func watchOOM() {
        guard oomFD < 0, let cgroup else { return }
        do {
            let fd = try cgroup.oomNotifier()
            oomFD = fd.take()
            oomKills = cgroup.oomKillCount
            oomRegistration = try engine.reactor.register(fd: oomFD, interest: .readable) { [weak self] _ in self?.oomEvent() }
        } catch {
            engine.logger.notice("container \(id): no OOM notifications: \(error)")
            stopWatchingOOM()
        }
    }

    /// Checks for an OOM kill now (before an exit is reported, so TaskOOM comes first).
    public func pollOOM() { oomEvent() }

    private func oomEvent() {
        guard oomFD >= 0, let cgroup else { return }
        var buf = [UInt8](repeating: 0, count: 4096)
        while Glibc.read(oomFD, &buf, buf.count) > 0 {}
        // v1's eventfd also fires when the cgroup goes away; count kills to be sure.
        let kills = cgroup.oomKillCount
        if kills > oomKills {
            oomKills = kills
            onOOM?(self)
        }
    }

    private func stopWatchingOOM() {
        if let r = oomRegistration { engine.reactor.deregister(r) }
        oomRegistration = nil
        if oomFD >= 0 { _ = Glibc.close(oomFD) }
        oomFD = -1
    }

    public var state: State {
        switch initProcess.state {
        case .creating: return .creating
        case .created: return .created
        case .running: return paused ? .paused : .running
        case .stopped: return .stopped
        }
    }

    init(id: String, bundle: String, spec: OCISpec, rootfs: String, cgroup: Cgroup?, initProcess: ContainerProcess, engine: ContainerEngine) {
        self.id = id
        self.bundle = bundle
        self.spec = spec
        self.rootfs = rootfs
        self.cgroup = cgroup
        self.initProcess = initProcess
        self.engine = engine
        var ns: UInt64 = 0
        for n in spec.linux?.namespaces ?? [] { ns |= NamespaceFlag.flag(n.type) }
        execNamespaces = ns
    }

    /// Creates a container from its bundle and spec: cgroup, stdio, the cloned init set
    /// up and waiting for Start. `done` runs on the loop with the init pid.
    public static func create(
        id: String, bundle: String, spec: OCISpec, rootfs: String, stdio: StdioPaths, cgroupPath: String?,
        engine: ContainerEngine, program: HostProgram? = nil,
        done: @escaping (Result<Container, ContainerError>) -> Void
    ) {
        let container: Container
        var cleanup: [() -> Void] = []
        // Where Create's time goes, at trace level: cgroup, clone, until the child is set up.
        let t0 = MonotonicClock.nanoseconds()
        var tCgroup: UInt64 = 0, tLaunch: UInt64 = 0
        // Cloned into a new user namespace, the child waits for 'G' before anything else:
        // its v1 cgroups are joined here, with the id maps, not by a joiner.
        let ownUserNamespace = ContainerLauncher.attrCreatesUserNamespace(spec: spec, target: .initProcess(rootfs: rootfs))
        do {
            try spec.validate()
            for field in spec.ignoredFields { engine.logger.notice("container \(id): \(field) is not supported here; ignored") }
            var cgroup: Cgroup?
            if let host = engine.cgroups, let path = cgroupPath {
                let cg = try host.create(path)
                cgroup = cg
                cleanup.append { engine.cgroupReaper.remove(cg, owner: "container \(id)") }
                if let r = spec.linux?.resources { try cg.apply(Container.resources(r)) }
            }
            tCgroup = MonotonicClock.nanoseconds()
            var stdio = stdio
            if stdio.containerID.isEmpty { stdio.containerID = id }
            let io = try ProcessIO(reactor: engine.reactor, paths: stdio, supervisor: engine.supervisor)
            cleanup.append { io.close() }
            let process = ContainerProcess(execID: "", spec: spec.process!, stdio: stdio, io: io)
            process.hostProgram = program
            container = Container(id: id, bundle: bundle, spec: spec, rootfs: rootfs, cgroup: cgroup, initProcess: process, engine: engine)
            process.container = container
            let child = try ContainerLauncher.launch(
                spec: spec, process: spec.process!, target: .initProcess(rootfs: rootfs), bundle: bundle,
                stdio: io.stdioMap, console: io.terminal, cgroup: cgroup, selfPidNamespace: engine.selfPidNamespace,
                program: process.hostProgram)
            let pid = child.pid
            tLaunch = MonotonicClock.nanoseconds()
            // From here the child exists: a failure kills it (it has not run anything yet).
            try process.attach(child, engine: engine)
            cleanup.insert({ process.abandon() }, at: 0)
            try io.start()
            io.keep(in: engine.keeperStore, key: ProcessIO.keeperKey(stdio, execID: ""))
            if ownUserNamespace {
                if let cgroup, cgroup.mode == .v1 { try cgroup.add(pid: pid) }
                try writeIDMaps(pid: pid, spec: spec)
            }
        } catch let e as SpecError {
            for f in cleanup { f() }
            done(.failure(ContainerError(.invalid, e.description)))
            return
        } catch {
            for f in cleanup { f() }
            done(.failure(ContainerError("create \(id): \(error)", cause: error)))
            return
        }
        let tMigrated = MonotonicClock.nanoseconds()
        container.initProcess.whenReady { result in
            if engine.logger.logLevel <= .trace {
                let ms = { (a: UInt64, b: UInt64) in String(Double(b &- a) / 1e6) }
                let now = MonotonicClock.nanoseconds()
                engine.logger.trace("create \(id): cgroup \(ms(t0, tCgroup)) ms, clone \(ms(tCgroup, tLaunch)) ms, after clone \(ms(tLaunch, tMigrated)) ms, until ready \(ms(tMigrated, now)) ms")
            }
            switch result {
            case .success:
                HookRunner.run([.prestart, .createRuntime, .createContainer], container: container, status: "created") { err in
                    guard let err else { done(.success(container)); return }
                    container.initProcess.abandon()
                    container.initProcess.io.close()
                    container.destroyCgroup()
                    done(.failure(ContainerError(err.kind, "create \(id): \(err.message)")))
                }
            case .failure(let e):
                container.initProcess.io.close()
                container.destroyCgroup()
                done(.failure(ContainerError(e.kind, "create \(id): \(e.message)")))
            }
        }
        do {
            try container.initProcess.joinThenGo(ownUserNamespace ? nil : container.cgroup, engine: engine)
        } catch {
            container.initProcess.setupFailed(ContainerError("join cgroup: \(error)", cause: error))
        }
    }

    /// A container as the previous daemon recorded it. Wire its handlers (onProcessExit,
    /// onOOM), then call `resumeWatching` — an exit that happened while no daemon ran is
    /// reported through them.
    public static func restore(
        id: String, bundle: String, spec: OCISpec, rootfs: String, stdio: StdioPaths, cgroupPath: String?,
        ownedMounts: [String], paused: Bool, engine: ContainerEngine
    ) -> Container {
        let io = ProcessIO(recoveredFor: stdio, execID: "", engine: engine)
        let process = ContainerProcess(execID: "", spec: spec.process ?? OCISpec.Process(args: []), stdio: stdio, io: io)
        let cgroup = cgroupPath.flatMap { engine.cgroups?.existing($0) }
        let c = Container(id: id, bundle: bundle, spec: spec, rootfs: rootfs, cgroup: cgroup, initProcess: process, engine: engine)
        process.container = c
        c.ownedMounts = ownedMounts
        c.paused = paused
        return c
    }

    /// A process the previous daemon recorded — the init (`execID` empty) or an exec —
    /// watched again, or given back its recorded exit (see `ContainerProcess.recover`).
    /// Wire `onProcessExit` first: an exit that happened meanwhile is reported through it.
    public func resume(execID: String, stdio: StdioPaths, pid: pid_t, startTime: UInt64, running: Bool,
                       exit: (ExitStatus, WallTime)?, exits: ExitRecords) {
        let p: ContainerProcess
        if execID.isEmpty {
            p = initProcess
        } else {
            p = ContainerProcess(execID: execID, spec: OCISpec.Process(args: []), stdio: stdio,
                                 io: ProcessIO(recoveredFor: stdio, execID: execID, engine: engine))
            p.container = self
            execs[execID] = p
        }
        p.recover(pid: pid, startTime: startTime, state: running ? .running : .created, exit: exit, engine: engine, exits: exits)
    }

    static func writeIDMaps(pid: pid_t, spec: OCISpec) throws(SystemError) {
        func lines(_ m: [OCISpec.IDMapping]?) -> String {
            (m ?? []).map { "\($0.containerID) \($0.hostID) \($0.size)\n" }.joined()
        }
        try Files.write("/proc/\(pid)/setgroups", "deny")
        try Files.write("/proc/\(pid)/uid_map", lines(spec.linux?.uidMappings))
        try Files.write("/proc/\(pid)/gid_map", lines(spec.linux?.gidMappings))
    }

    public static func resources(_ r: OCISpec.Resources) -> CgroupResources {
        var out = CgroupResources()
        out.memoryLimit = r.memory?.limit
        out.memoryReservation = r.memory?.reservation
        out.memorySwap = r.memory?.swap
        out.cpuShares = r.cpu?.shares
        out.cpuQuota = r.cpu?.quota
        out.cpuPeriod = r.cpu?.period
        out.cpus = r.cpu?.cpus.flatMap { $0.isEmpty ? nil : $0 }
        out.mems = r.cpu?.mems.flatMap { $0.isEmpty ? nil : $0 }
        out.pidsLimit = r.pids?.limit
        out.blkioWeight = r.blockIO?.weight
        out.unified = r.unified ?? [:]
        return out
    }

    /// Start: the init execs the user's program.
    public func start(_ done: @escaping (Result<pid_t, ContainerError>) -> Void) {
        guard initProcess.state == .created else {
            done(.failure(ContainerError(.failedPrecondition, "container \(id) is \(state.rawValue), not created")))
            return
        }
        HookRunner.run([.startContainer], container: self, status: "created") { [self] err in
            if let err { done(.failure(err)); return }
            initProcess.start { result in
                done(result)
                if case .success = result {
                    self.poststartRunning = true
                    HookRunner.run([.poststart], container: self, status: "running") { err in
                        if let err { self.engine.logger.warning("container \(self.id): \(err.message)") }
                        self.poststartRunning = false
                        if self.poststopWaiting { self.runPoststop() }
                    }
                }
            }
        }
    }

    /// Exec: a new process in the running container's namespaces and cgroup.
    public func exec(id execID: String, process: OCISpec.Process, stdio: StdioPaths) throws(ContainerError) -> ContainerProcess {
        guard state == .running || state == .paused else {
            throw ContainerError(.failedPrecondition, "container \(id) is \(state.rawValue): exec needs it running")
        }
        guard execs[execID] == nil else { throw ContainerError(.alreadyExists, "exec \(execID) already exists in \(id)") }
        do { try OCISpec.validate(process: process, field: "exec spec") } catch { throw ContainerError(.invalid, error.description) }
        let io: ProcessIO
        var stdio = stdio
        if stdio.containerID.isEmpty { stdio.containerID = id }
        do { io = try ProcessIO(reactor: engine.reactor, paths: stdio, supervisor: engine.supervisor) } catch {
            throw ContainerError("exec \(execID): \(error)", cause: error)
        }
        let p = ContainerProcess(execID: execID, spec: process, stdio: stdio, io: io)
        p.container = self
        execs[execID] = p
        return p
    }

    /// Starts an exec added with `exec`.
    public func startExec(_ p: ContainerProcess, _ done: @escaping (Result<pid_t, ContainerError>) -> Void) {
        guard p.state == .creating, p.pid == 0 else {
            done(.failure(ContainerError(.failedPrecondition, "exec \(p.execID) was already started")))
            return
        }
        guard initProcess.state == .running, initProcess.pidfdRaw >= 0 else {
            done(.failure(ContainerError(.failedPrecondition, "container \(id) is not running")))
            return
        }
        do {
            let child = try ContainerLauncher.launch(
                spec: spec, process: p.spec, target: .exec(pidfd: initProcess.pidfdRaw, namespaces: execNamespaces & ~NamespaceFlag.user),
                bundle: bundle, stdio: p.io.stdioMap, console: p.io.terminal, cgroup: cgroup,
                selfPidNamespace: engine.selfPidNamespace, program: p.hostProgram)
            try p.attach(child, engine: engine)
            try p.io.start()
            p.io.keep(in: engine.keeperStore, key: ProcessIO.keeperKey(p.stdio, execID: p.execID))
            p.expectExec(done)
            try p.joinThenGo(cgroup, engine: engine)
        } catch {
            done(.failure(ContainerError("exec \(p.execID) in \(id): \(error)", cause: error)))
        }
    }

    public func removeExec(_ execID: String) -> ContainerProcess? {
        execs.removeValue(forKey: execID)
    }

    /// Signals the init, or with `all` every process in the container's cgroup.
    public func kill(signal: Int32, all: Bool) throws(ContainerError) {
        if all, let cgroup {
            for pid in cgroup.processes() { Glibc.kill(pid, signal) }
            return
        }
        try initProcess.signal(signal)
    }

    public func pause() throws(ContainerError) {
        guard state == .running else { throw ContainerError(.failedPrecondition, "container \(id) is \(state.rawValue), not running") }
        guard let cgroup else { throw ContainerError(.failedPrecondition, "container \(id) has no cgroup to freeze") }
        do { try cgroup.freeze() } catch { throw ContainerError("pause \(id): \(error)", cause: error) }
        paused = true
    }

    public func resume() throws(ContainerError) {
        guard state == .paused, let cgroup else { throw ContainerError(.failedPrecondition, "container \(id) is \(state.rawValue), not paused") }
        do { try cgroup.thaw() } catch { throw ContainerError("resume \(id): \(error)", cause: error) }
        paused = false
    }

    public func update(_ r: OCISpec.Resources) throws(ContainerError) {
        guard let cgroup else { throw ContainerError(.failedPrecondition, "container \(id) has no cgroup") }
        do { try cgroup.apply(Container.resources(r)) } catch { throw ContainerError("update \(id): \(error)", cause: error) }
    }

    /// Pids in the container (its cgroup; the init alone without one).
    public func pids() -> [pid_t] {
        if let cgroup { return cgroup.processes() }
        return initProcess.state == .running ? [initProcess.pid] : []
    }

    /// Releases what the container holds once its processes are gone: never-started
    /// processes are killed, stdio closed, cgroup removed, owned mounts unmounted.
    public func destroy() {
        if initProcess.state == .creating || initProcess.state == .created { initProcess.abandon() }
        for p in execs.values where p.state != .stopped { p.abandon() }
        if paused, let cgroup { try? cgroup.thaw() }
        if oomFD >= 0 { oomEvent() }  // a kill that raced the exit is still reported
        stopWatchingOOM()
        destroyCgroup()
        for m in ownedMounts.reversed() { Mounts.unmountAll(under: m) }
        ownedMounts.removeAll()
        guard !destroyed else { return }
        destroyed = true
        // A container that exits at once is deleted while its poststart hooks may still
        // run; poststop comes after them, as with runc (whose start waits for poststart).
        if poststartRunning { poststopWaiting = true } else { runPoststop() }
    }

    private func runPoststop() {
        poststopWaiting = false
        HookRunner.run([.poststop], container: self, status: "stopped") { [self] err in
            if let err { engine.logger.warning("container \(id): \(err.message)") }
        }
    }

    private var destroyed = false
    private var poststartRunning = false
    private var poststopWaiting = false

    func destroyCgroup() {
        guard let cgroup else { return }
        engine.cgroupReaper.remove(cgroup, owner: "container \(id)")
    }
}
