import KuasarSystem
/// What a registration wants to hear about.
public struct Interest: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let readable = Interest(rawValue: 0x001)  // POLLIN
    public static let writable = Interest(rawValue: 0x004)  // POLLOUT
    public static let none: Interest = []

    /// The poll(2)/epoll bits for this interest. Peer hang-up (POLLRDHUP) always rides
    /// along with readable; POLLERR and POLLHUP are reported whatever one asks.
    var pollMask: UInt32 { rawValue | (contains(.readable) ? 0x2000 : 0) }
}

/// What happened on a descriptor: poll(2) bits as the kernel gave them.
public struct ReadyEvents: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let readable = ReadyEvents(rawValue: 0x001)
    public static let writable = ReadyEvents(rawValue: 0x004)
    public static let error = ReadyEvents(rawValue: 0x008)
    public static let hangup = ReadyEvents(rawValue: 0x010)
    public static let readHangup = ReadyEvents(rawValue: 0x2000)

    /// Worth a read: data, or an end of file / error that a read will reveal.
    public var wantsRead: Bool { !intersection([.readable, .hangup, .readHangup, .error]).isEmpty }

    public var description: String {
        var parts: [String] = []
        if contains(.readable) { parts.append("readable") }
        if contains(.writable) { parts.append("writable") }
        if contains(.error) { parts.append("error") }
        if contains(.hangup) { parts.append("hangup") }
        if contains(.readHangup) { parts.append("readHangup") }
        return "[" + parts.joined(separator: ",") + "]"
    }
}

/// Which kernel interface the reactor waits with.
public enum BackendKind: String, Sendable, CaseIterable, CustomStringConvertible {
    case uring = "io_uring"
    case epoll

    public var description: String { rawValue }

    /// Whether this kernel lets us use the backend here.
    public var isAvailable: Bool {
        switch self {
        case .uring: return UringBackend.isAvailable
        case .epoll: return true
        }
    }

    /// The backend `KUASAR_REACTOR` names, if it names one.
    static func forced(_ value: String?) -> BackendKind? { value.flatMap(BackendKind.init(rawValue:)) }
}

/// A kernel readiness interface. Tokens are opaque 64-bit values chosen by the
/// reactor (fd + generation); a backend hands them back with each event and never
/// interprets them. Both backends deliver level-triggered readiness: an fd that stays
/// ready is reported again on the next wait.
protocol ReactorBackend: AnyObject {
    var kind: BackendKind { get }
    func add(fd: Int32, interest: Interest, token: UInt64) throws(SystemError)
    func modify(fd: Int32, interest: Interest, token: UInt64) throws(SystemError)
    func remove(fd: Int32, token: UInt64) throws(SystemError)
    /// Waits for events (forever when `block`, else only collects what is ready) and
    /// calls `deliver(token, events)` for each, in the loop's thread.
    func wait(block: Bool, _ deliver: (UInt64, ReadyEvents) -> Void) throws(SystemError)
    func close()
}

/// Readiness through epoll, level-triggered (no EPOLLET): a handler that stops short
/// of EAGAIN is simply called again, and back-pressure is just dropping an interest.
final class EpollBackend: ReactorBackend {
    let kind = BackendKind.epoll
    private let set: EpollSet

    init() throws(SystemError) {
        set = try EpollSet()
    }

    func add(fd: Int32, interest: Interest, token: UInt64) throws(SystemError) {
        try set.add(fd: fd, events: interest.pollMask, token: token)
    }

    func modify(fd: Int32, interest: Interest, token: UInt64) throws(SystemError) {
        try set.modify(fd: fd, events: interest.pollMask, token: token)
    }

    func remove(fd: Int32, token: UInt64) throws(SystemError) {
        try set.remove(fd: fd)
    }

    func wait(block: Bool, _ deliver: (UInt64, ReadyEvents) -> Void) throws(SystemError) {
        try set.wait(block: block) { token, events in deliver(token, ReadyEvents(rawValue: events)) }
    }

    func close() {
        set.close()
    }
}
