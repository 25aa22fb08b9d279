import Logging
import KuasarSystem
import KuasarReactor

/// A QEMU Machine Protocol client on the reactor, one per VM: JSON lines on QEMU's
/// `-qmp unix:…,server=on` socket. It reads the greeting, negotiates capabilities, then
/// runs commands (each matched to its answer by `id`, many in flight, each on a
/// deadline) and hands every asynchronous event (SHUTDOWN, DEVICE_DELETED, …) to
/// `onEvent`. Nothing here blocks: QEMU may stall, the loop does not.
public final class QMPClient {
    /// An answer's `error` member, or a connection that ended first.
    public struct Failure: Error, CustomStringConvertible, Sendable {
        /// QMP's error class (GenericError, CommandNotFound, DeviceNotFound, …), or
        /// "Disconnected" / "Timeout" / "Protocol" for what happened on our side.
        public let errorClass: String
        public let desc: String
        public var description: String { "\(errorClass): \(desc)" }
    }

    /// A line longer than this is a protocol error (QEMU's answers are far smaller).
    public static let maxLine = 1 << 20

    let reactor: Reactor
    let logger: Logger
    private let connection: Connection
    private var buffer: [UInt8] = []
    private var nextID = 1
    private var pending: [Int: (command: String, done: (Result<JSONValue, Failure>) -> Void, timer: TimerID?)] = [:]
    private var greeted = false
    private var readyWaiters: [(Result<JSONValue, Failure>) -> Void] = []
    /// The greeting's `QMP` member (version, capabilities), once read.
    public private(set) var greeting: JSONValue?
    public private(set) var isClosed = false

    /// Asynchronous events: name, `data` (or null).
    public var onEvent: ((String, JSONValue) -> Void)?
    /// Runs once when the connection ends (QEMU exited, or it was closed here).
    public var onClose: ((Failure) -> Void)?

    public init(reactor: Reactor, fd: consuming OwnedFD, logger: Logger = Logger(label: "kuasar.qmp")) throws(SystemError) {
        self.reactor = reactor
        self.logger = logger
        connection = Connection(reactor: reactor, fd: fd)
        // An answer's handler may drop the client's last owner: it lives until the handler returned.
        connection.onRead = { [unowned self] _, bytes in withExtendedLifetime(self) { self.received(bytes) } }
        connection.onClose = { [unowned self] _, error in
            withExtendedLifetime(self) {
                self.teardown(Failure(errorClass: "Disconnected", desc: error.map { "QMP connection lost: \($0)" } ?? "QMP connection closed"))
            }
        }
        try connection.start()
    }

    public static func connect(reactor: Reactor, path: String, logger: Logger = Logger(label: "kuasar.qmp")) throws(SystemError) -> QMPClient {
        try QMPClient(reactor: reactor, fd: try Socket.connectUnix(path: path), logger: logger)
    }

    /// Once the greeting was read and `qmp_capabilities` accepted: `done` gets the
    /// greeting. Called again after that, it answers at once.
    public func handshake(timeoutNS: UInt64, done: @escaping (Result<JSONValue, Failure>) -> Void) {
        if let greeting, greeted { done(.success(greeting)); return }
        if isClosed { done(.failure(Failure(errorClass: "Disconnected", desc: "QMP connection closed before its greeting"))); return }
        var timer: TimerID?
        let once: (Result<JSONValue, Failure>) -> Void = { [reactor] r in
            guard let t = timer else { return }
            timer = nil
            reactor.cancel(t)
            done(r)
        }
        readyWaiters.append(once)
        timer = reactor.schedule(afterNS: timeoutNS) { once(.failure(Failure(errorClass: "Timeout", desc: "no QMP greeting within \(timeoutNS / 1_000_000) ms"))) }
    }

    /// Runs `command` with `arguments`; `done` gets its `return` member or its `error`.
    public func execute(_ command: String, _ arguments: JSONValue? = nil, timeoutNS: UInt64 = 10_000_000_000,
                        done: @escaping (Result<JSONValue, Failure>) -> Void) {
        guard !isClosed else {
            done(.failure(Failure(errorClass: "Disconnected", desc: "QMP connection closed; \(command) not sent")))
            return
        }
        let id = nextID
        nextID += 1
        var members: [(String, JSONValue)] = [("execute", .string(command))]
        if let arguments { members.append(("arguments", arguments)) }
        members.append(("id", .number(Double(id))))
        let timer = reactor.schedule(afterNS: timeoutNS) { [weak self] in
            guard let self, let p = self.pending.removeValue(forKey: id) else { return }
            p.done(.failure(Failure(errorClass: "Timeout", desc: "\(command): no answer within \(timeoutNS / 1_000_000) ms")))
        }
        pending[id] = (command, done, timer)
        _ = connection.write(JSONValue.object(members).text + "\r\n")
    }

    public func close() {
        connection.close()
    }

    private func received(_ bytes: UnsafeRawBufferPointer) {
        buffer.append(contentsOf: bytes)
        while !isClosed, let nl = buffer.firstIndex(of: 10) {
            let line = buffer[..<nl]
            defer { buffer.removeSubrange(...nl) }
            guard line.contains(where: { $0 != 13 && $0 != 32 }) else { continue }
            let message: JSONValue
            do { message = try JSONValue.parse(line) } catch {
                logger.warning("QMP: a line that is not JSON (\(line.count) bytes): \(error)")
                continue
            }
            handle(message)
        }
        if buffer.count > Self.maxLine {
            logger.error("QMP: a line of more than \(Self.maxLine) bytes; closing")
            teardown(Failure(errorClass: "Protocol", desc: "QMP line longer than \(Self.maxLine) bytes"))
            connection.close()
        }
    }

    private func handle(_ m: JSONValue) {
        if let g = m["QMP"] {
            greeting = g
            // Capabilities negotiation: nothing else is accepted before it.
            execute("qmp_capabilities") { [weak self] r in
                guard let self else { return }
                if case .success = r { self.greeted = true }
                let waiters = self.readyWaiters
                self.readyWaiters.removeAll()
                for w in waiters { w(r.map { _ in g }) }
            }
            return
        }
        if let event = m["event"]?.stringValue {
            onEvent?(event, m["data"] ?? .null)
            return
        }
        guard let idNumber = m["id"]?.numberValue, let p = pending.removeValue(forKey: Int(idNumber)) else {
            logger.debug("QMP: an answer no command waits for: \(m.text.prefix(200))")
            return
        }
        if let t = p.timer { reactor.cancel(t) }
        if let error = m["error"] {
            p.done(.failure(Failure(errorClass: error["class"]?.stringValue ?? "GenericError", desc: error["desc"]?.stringValue ?? error.text)))
        } else {
            p.done(.success(m["return"] ?? .null))
        }
    }

    private func teardown(_ reason: Failure) {
        guard !isClosed else { return }
        isClosed = true
        let open = pending
        pending.removeAll()
        for (_, p) in open.sorted(by: { $0.key < $1.key }) {
            if let t = p.timer { reactor.cancel(t) }
            p.done(.failure(Failure(errorClass: reason.errorClass, desc: "\(p.command): \(reason.desc)")))
        }
        let waiters = readyWaiters
        readyWaiters.removeAll()
        for w in waiters { w(.failure(reason)) }
        onClose?(reason)
        onClose = nil
        onEvent = nil
    }
}
