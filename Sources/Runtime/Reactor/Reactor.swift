#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization
import KuasarSystem

/// The daemon's one event loop.
///
/// Everything the daemon waits on is a file descriptor registered here: sockets,
/// pipes, FIFOs, ptys, pidfds, a signalfd, a timerfd for all timers, and an eventfd
/// through which a helper thread can hand work back. One thread runs the loop; every
/// entry point asserts it.
///
/// ## Readiness rules
///
/// 1. **Level-triggered.** Both backends (io_uring one-shot polls re-armed after each
///    completion, and epoll without EPOLLET) report an fd again on the next iteration
///    while it stays ready. A handler may stop before EAGAIN (for fairness) without
///    losing a wake-up; it should read until EAGAIN or a budget.
/// 2. **Readiness is a hint.** A wake-up can be spurious (another reader drained it,
///    the event raced a state change): every read and write must be non-blocking and
///    treat EAGAIN as "nothing now".
/// 3. **Hang-up and error are hints, too.** `.hangup`, `.readHangup` and `.error` are
///    delivered whatever the interest; the truth comes from the next read or write
///    (end of file, ECONNRESET, EPIPE). Data can still be pending when hang-up arrives:
///    read it first.
/// 4. **Deregister before close.** `deregister` retires the registration's generation
///    and removes the fd from the kernel set; only then may the fd be closed. An event
///    already collected for the old registration — even if the fd number is reused and
///    registered again within the same batch — carries the old generation and is
///    dropped, never delivered to the new owner.
/// 5. **Interest is back-pressure.** Dropping `.readable` stops reading from a peer;
///    dropping `.writable` when a write queue empties avoids a busy loop.
/// 6. **Handlers run on the loop thread and must not block.** Work that has to block
///    goes to a helper thread that returns through `ReactorInbox.post`.
public final class Reactor {
    public let backendKind: BackendKind
    let backend: any ReactorBackend
    let logger: Logger

    /// A registration: an fd number plus the generation that was current when it was
    /// made. Only the registration that matches the slot's generation gets events.
    public struct Registration: Hashable, Sendable {
        public let fd: Int32
        let generation: UInt32
        var token: UInt64 { UInt64(generation) << 32 | UInt64(UInt32(bitPattern: fd)) }
    }

    public typealias Handler = (ReadyEvents) -> Void

    struct Slot {
        var generation: UInt32 = 0
        var interest: Interest = []
        var handler: Handler?
    }
    var slots: [Slot] = []

    /// Events dropped because their registration was gone (stale generation).
    public private(set) var staleEventsDropped = 0
    var registrationCount = 0
    /// Registrations made by users of the reactor (its own timerfd, eventfd and
    /// signalfd not counted): non-zero at close means someone leaked one.
    public var userRegistrationCount: Int {
        registrationCount - internalRegistrations.count - (signalRegistration == nil ? 0 : 1)
    }
    /// Jobs run from `inbox` so far.
    public private(set) var inboxJobsRun = 0

    var timers = TimerQueue()
    private var timerFD: OwnedFD?
    private let timerRaw: Int32
    private var armedDeadline: UInt64 = 0

    private var signalFD: OwnedFD?
    private var signalHandlers: [Int32: (Int32) -> Void] = [:]
    private var signalRegistration: Registration?

    private var internalRegistrations: [Registration] = []
    public let inbox: ReactorInbox
    private var inboxFD: OwnedFD?
    private let inboxRaw: Int32

    /// One read buffer for every connection of this loop: only one handler runs at a time.
    /// Write-queue chunks shared by this loop's connections.
    let chunkPool = ChunkPool()
    package lazy var sharedReadBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)

    private let threadID: pid_t
    private var running = false
    private var stopRequested = false
    private var closed = false

    public init(backend kind: BackendKind? = nil, logger: Logger = Logger(label: "kuasar.reactor")) throws(SystemError) {
        // Unless asked for one: the io_uring ring itself is the probe (a kernel that
        // refuses it, or lacks an opcode, gets epoll), so a start sets up one ring, not three.
        switch kind ?? BackendKind.forced(getenv("KUASAR_REACTOR").map { String(cString: $0) }) {
        case .uring?: backend = try UringBackend()
        case .epoll?: backend = try EpollBackend()
        case nil:
            if let uring = try? UringBackend() { backend = uring } else { backend = try EpollBackend() }
        }
        backendKind = backend.kind
        self.logger = logger
        threadID = Signals.currentThreadID()
        // A write to a peer that went away must come back as EPIPE to the connection
        // that made it, not kill the whole process (pipes and ptys have no MSG_NOSIGNAL).
        Signals.ignoreSIGPIPE()

        let timer = try TimerFD.make()
        let tfd = timer.rawValue
        timerFD = consume timer
        timerRaw = tfd
        let event = try EventFD.make()
        let efd = event.rawValue
        inboxFD = consume event
        inboxRaw = efd
        inbox = ReactorInbox(eventFD: efd)

        internalRegistrations.append(try register(fd: tfd, interest: .readable) { [unowned self] _ in self.fireTimers() })
        internalRegistrations.append(try register(fd: efd, interest: .readable) { [unowned self] _ in self.drainInbox() })
    }

    deinit {
        assert(closed, "Reactor dropped without close(): its fds would leak")
    }

    @inline(__always)
    func assertLoopThread() {
        assert(Signals.currentThreadID() == threadID, "reactor used from a thread that is not its loop thread")
    }

    // MARK: Registrations

    /// Watches `fd` for `interest`; `handler` runs on the loop with what was ready.
    /// The caller keeps owning the fd and must `deregister` before closing it.
    public func register(fd: Int32, interest: Interest, handler: @escaping Handler) throws(SystemError) -> Registration {
        assertLoopThread()
        precondition(fd >= 0)
        let i = Int(fd)
        if i >= slots.count { slots.append(contentsOf: repeatElement(Slot(), count: i + 1 - slots.count + 64)) }
        precondition(slots[i].handler == nil, "fd \(fd) is registered twice")
        // A new generation per registration: events of any earlier one are stale.
        slots[i].generation = (slots[i].generation &+ 1) & 0x7FFF_FFFF
        let reg = Registration(fd: fd, generation: slots[i].generation)
        try backend.add(fd: fd, interest: interest, token: reg.token)
        slots[i].interest = interest
        slots[i].handler = handler
        registrationCount += 1
        return reg
    }

    public func modify(_ reg: Registration, interest: Interest) throws(SystemError) {
        assertLoopThread()
        guard isCurrent(reg) else { return }
        let i = Int(reg.fd)
        if slots[i].interest == interest { return }
        try backend.modify(fd: reg.fd, interest: interest, token: reg.token)
        slots[i].interest = interest
    }

    public func interest(of reg: Registration) -> Interest? {
        isCurrent(reg) ? slots[Int(reg.fd)].interest : nil
    }

    /// Stops events for `reg`. Call before closing its fd. Idempotent.
    public func deregister(_ reg: Registration) {
        assertLoopThread()
        guard isCurrent(reg) else { return }
        let i = Int(reg.fd)
        do {
            try backend.remove(fd: reg.fd, token: reg.token)
        } catch {
            // EBADF/ENOENT here means the fd was closed before deregistering: a bug in
            // the caller, but the slot is still retired so nothing reaches it again.
            logger.warning("deregister fd \(reg.fd): \(error)")
        }
        slots[i].handler = nil
        slots[i].interest = []
        slots[i].generation = (slots[i].generation &+ 1) & 0x7FFF_FFFF
        registrationCount -= 1
    }

    func isCurrent(_ reg: Registration) -> Bool {
        let i = Int(reg.fd)
        return i < slots.count && slots[i].handler != nil && slots[i].generation == reg.generation
    }

    @inline(__always)
    private func dispatch(_ token: UInt64, _ events: ReadyEvents) {
        let fd = Int(truncatingIfNeeded: token & 0xFFFF_FFFF)
        let generation = UInt32(truncatingIfNeeded: token >> 32)
        guard fd < slots.count, slots[fd].generation == generation, let handler = slots[fd].handler else {
            staleEventsDropped += 1
            return
        }
        let relevant = events.intersection(ReadyEvents(rawValue: slots[fd].interest.rawValue).union([.error, .hangup, .readHangup]))
        if relevant.isEmpty { return }
        handler(relevant)
    }

    // MARK: Running

    /// Runs until `stop()` is called from a handler.
    public func run() throws(SystemError) {
        assertLoopThread()
        running = true
        stopRequested = false
        defer { running = false }
        while !stopRequested {
            try backend.wait(block: true) { token, events in dispatch(token, events) }
        }
    }

    /// One iteration: waits (if `block`) and dispatches what is ready.
    public func runOnce(block: Bool = true) throws(SystemError) {
        assertLoopThread()
        try backend.wait(block: block) { token, events in dispatch(token, events) }
    }

    /// Runs until `condition` holds, or fails after `timeoutNS` (tests and tools).
    @discardableResult
    public func run(until condition: () -> Bool, timeoutNS: UInt64 = 10_000_000_000) throws(SystemError) -> Bool {
        var timedOut = false
        let guardTimer = schedule(afterNS: timeoutNS) { timedOut = true }
        defer { cancel(guardTimer) }
        while !condition() && !timedOut && !stopRequested {
            try runOnce(block: true)
        }
        stopRequested = false
        return condition()
    }

    /// Makes `run()` return after the current batch of events.
    public func stop() {
        stopRequested = true
    }

    /// Closes every descriptor the reactor itself owns. Registrations still held by
    /// others are reported: they are leaks.
    public func close() {
        assertLoopThread()
        guard !closed else { return }
        for reg in internalRegistrations { deregister(reg) }
        if let reg = signalRegistration { deregister(reg) }
        if registrationCount != 0 {
            logger.warning("reactor closed with \(registrationCount) registrations still open")
        }
        timerFD.take()?.close()
        inboxFD.take()?.close()
        signalFD.take()?.close()
        inbox.close()
        backend.close()
        sharedReadBuffer.deallocate()
        chunkPool.drain()
        closed = true
    }

    // MARK: Timers

    /// Runs `body` once after `afterNS` nanoseconds, or every `repeatingNS` after that.
    @discardableResult
    public func schedule(afterNS: UInt64, repeatingNS: UInt64? = nil, _ body: @escaping () -> Void) -> TimerID {
        assertLoopThread()
        // Saturating: a peer's huge timeout (ttrpc timeout_nano, grpc-timeout) means "never",
        // not a wrapped deadline that fires at once.
        let (deadline, overflow) = MonotonicClock.nanoseconds().addingReportingOverflow(afterNS)
        let id = timers.insert(deadline: overflow ? .max : deadline, interval: repeatingNS, body: body)
        rearmTimerFD()
        return id
    }

    /// A cancelled timer never fires, even if it was already due in this batch.
    public func cancel(_ id: TimerID) {
        assertLoopThread()
        timers.cancel(id)
    }

    private func rearmTimerFD() {
        guard let next = timers.nextDeadline else { return }
        if armedDeadline != 0 && armedDeadline <= next { return }
        armedDeadline = next
        TimerFD.arm(timerRaw, deadlineNS: next)
    }

    private func fireTimers() {
        EventFD.drain(timerRaw)
        armedDeadline = 0
        let now = MonotonicClock.nanoseconds()
        while let (id, body) = timers.popDue(now: now) {
            _ = id
            body()
        }
        rearmTimerFD()
    }

    // MARK: Signals

    /// Delivers `signals` to `handler` on the loop through a signalfd. Blocks them in
    /// the calling thread; a process that wants them only here must block them before
    /// starting other threads (see `Signals.block`).
    public func onSignals(_ signals: [Int32], handler: @escaping (Int32) -> Void) throws(SystemError) {
        assertLoopThread()
        try Signals.block(signals)
        for s in signals { signalHandlers[s] = handler }
        let all = Array(signalHandlers.keys)
        if let raw = signalFD?.rawValue {
            try Signals.updateSignalFD(raw, all)
        } else {
            let fd = try Signals.makeSignalFD(all)
            let raw = fd.rawValue
            signalFD = consume fd
            signalRegistration = try register(fd: raw, interest: .readable) { [unowned self] _ in self.drainSignals() }
        }
    }

    private func drainSignals() {
        guard let fd = signalFD?.rawValue else { return }
        while let sig = Signals.readSignalFD(fd) {
            signalHandlers[sig]?(sig)
        }
    }

    // MARK: Inbox

    private func drainInbox() {
        EventFD.drain(inboxRaw)
        for job in inbox.takeAll() {
            job()
            inboxJobsRun += 1
        }
    }
}

/// The one door into the loop from another thread: post a closure, the loop runs it.
/// Meant for the rare helper thread doing blocking work, never for the request path.
public final class ReactorInbox: Sendable {
    private let eventFD: Int32
    private let queue = Mutex<(jobs: [@Sendable () -> Void], open: Bool)>(([], true))

    init(eventFD: Int32) { self.eventFD = eventFD }

    /// Queues `job` for the loop thread and wakes it. Returns false after the reactor closed.
    @discardableResult
    public func post(_ job: @escaping @Sendable () -> Void) -> Bool {
        let accepted = queue.withLock { q -> Bool in
            guard q.open else { return false }
            q.jobs.append(job)
            return true
        }
        if accepted { EventFD.signal(eventFD) }
        return accepted
    }

    func takeAll() -> [@Sendable () -> Void] {
        queue.withLock { q in
            let jobs = q.jobs
            q.jobs.removeAll()
            return jobs
        }
    }

    func close() {
        queue.withLock { $0.open = false; $0.jobs.removeAll() }
    }
}

/// This process's environment as a dictionary.
public func currentEnvironmentDictionary() -> [String: String] {
    var out: [String: String] = [:]
    for entry in currentEnvironment() {
        if let eq = entry.firstIndex(of: "=") {
            out[String(entry[..<eq])] = String(entry[entry.index(after: eq)...])
        }
    }
    return out
}
