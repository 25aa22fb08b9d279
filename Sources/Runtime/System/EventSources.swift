#if canImport(Glibc)
import Glibc
#endif
import CShims
import KuasarOCI

/// An epoll set and its event buffer (the epoll backend's kernel side). Tokens and
/// poll(2) bits pass through unchanged.
public final class EpollSet {
    private var epfd: OwnedFD?
    private let raw: Int32
    private let events: UnsafeMutablePointer<ks_event>
    private let capacity = 256

    public init() throws(SystemError) {
        let fd = try shim("epoll_create1") { ks_epoll_create() }
        epfd = OwnedFD(adopting: fd)
        raw = fd
        events = .allocate(capacity: capacity)
    }

    public func add(fd: Int32, events mask: UInt32, token: UInt64) throws(SystemError) {
        _ = try shim("epoll_ctl(ADD)", "fd \(fd)") { ks_epoll_ctl(raw, Int32(KS_EPOLL_ADD), fd, mask, token) }
    }

    public func modify(fd: Int32, events mask: UInt32, token: UInt64) throws(SystemError) {
        _ = try shim("epoll_ctl(MOD)", "fd \(fd)") { ks_epoll_ctl(raw, Int32(KS_EPOLL_MOD), fd, mask, token) }
    }

    public func remove(fd: Int32) throws(SystemError) {
        _ = try shim("epoll_ctl(DEL)", "fd \(fd)") { ks_epoll_ctl(raw, Int32(KS_EPOLL_DEL), fd, 0, 0) }
    }

    /// Waits (forever when `block`) and calls `body(token, events)` for each event.
    @inline(__always)
    public func wait(block: Bool, _ body: (UInt64, UInt32) -> Void) throws(SystemError) {
        let n = try shim("epoll_wait") { ks_epoll_wait(raw, events, Int32(capacity), block ? -1 : 0) }
        for i in 0..<Int(n) { body(events[i].token, events[i].events) }
    }

    public func close() {
        epfd.take()?.close()
        events.deallocate()
    }
}

/// A CLOCK_MONOTONIC timerfd armed with absolute deadlines.
public enum TimerFD {
    public static func make() throws(SystemError) -> OwnedFD {
        OwnedFD(adopting: try shim("timerfd_create") { ks_timerfd_create() })
    }

    /// Arms for an absolute monotonic deadline in ns; 0 disarms.
    public static func arm(_ fd: Int32, deadlineNS: UInt64) {
        _ = ks_timerfd_arm(fd, deadlineNS)
    }
}

/// An eventfd: a counter another thread bumps to wake a poller.
public enum EventFD {
    public static func make() throws(SystemError) -> OwnedFD {
        OwnedFD(adopting: try shim("eventfd") { ks_eventfd(0) })
    }

    public static func signal(_ fd: Int32) {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(fd, $0.baseAddress, 8) }
    }

    /// Reads (and so resets) the counter of an eventfd or a timerfd.
    public static func drain(_ fd: Int32) {
        var counter: UInt64 = 0
        _ = withUnsafeMutableBytes(of: &counter) { Glibc.read(fd, $0.baseAddress, 8) }
    }
}

/// Reaping children without stealing another waiter's status.
public enum ChildReaper {
    public enum Outcome {
        case running
        case exited(ExitStatus)
        /// Already reaped by someone else: the status is lost.
        case gone(Errno)
    }

    /// waitid(P_PIDFD, WNOHANG).
    public static func collect(pidfd: Int32) -> Outcome {
        var code: Int32 = 0, status: Int32 = 0
        let rc = ks_pidfd_wait(pidfd, 1, &code, &status)
        if rc == 0 { return .running }
        if rc > 0 { return .exited(ExitStatus(siginfoCode: code, status: status)) }
        return .gone(Errno(rawValue: -rc))
    }

    /// The pid of some exited child, left unreaped (WNOWAIT); nil when there is none.
    public static func peekExited() -> pid_t? {
        let pid = ks_peek_exited_child()
        return pid > 0 ? pid : nil
    }

    /// Reaps `pid` if it has exited.
    public static func reap(_ pid: pid_t) -> ExitStatus? {
        var code: Int32 = 0, status: Int32 = 0
        return ks_reap_pid(pid, &code, &status) > 0 ? ExitStatus(siginfoCode: code, status: status) : nil
    }
}

extension Signals {
    /// Points an existing signalfd at a new set of signals.
    public static func updateSignalFD(_ fd: Int32, _ signals: [Int32]) throws(SystemError) {
        _ = try shim("signalfd") { ks_signalfd(fd, signals, Int32(signals.count)) }
    }

    /// The next pending signal on a signalfd, nil when none is pending.
    public static func readSignalFD(_ fd: Int32) -> Int32? {
        var pid: Int32 = 0
        let sig = ks_signalfd_read(fd, &pid)
        return sig > 0 ? sig : nil
    }
}
