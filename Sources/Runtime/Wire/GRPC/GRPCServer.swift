import Logging
import NIOHPACK
import SwiftProtobuf
import KuasarSystem
import KuasarReactor
import KuasarWire

/// A gRPC server over our own HTTP/2, on the reactor: unary and server-streaming
/// methods, metadata, `grpc-timeout` deadlines, trailers with `grpc-status` and
/// `grpc-message`. containerd's sandbox Controller API arrives here.
public final class GRPCServer {
    public typealias Handler = (GRPCServerCall) throws -> Void
    /// Largest request or response message (gRPC's length prefix allows 4 GiB).
    public static let maxMessageSize = 16 << 20

    let reactor: Reactor
    let logger: Logger
    public let limits: HTTP2Limits
    private var handlers: [String: Handler] = [:]
    private var listeners = ListenerGroup()
    private var connections = LiveSet<HTTP2ServerConnection>()

    public init(reactor: Reactor, limits: HTTP2Limits = HTTP2Limits(), logger: Logger = Logger(label: "kuasar.grpc")) {
        self.reactor = reactor
        self.limits = limits
        self.logger = logger
    }

    public var connectionCount: Int { connections.count }

    /// Registers "/package.Service/Method". The handler runs once the request message
    /// has arrived; it answers now or later through the call.
    public func register(service: String, method: String, _ handler: @escaping Handler) {
        handlers["/\(service)/\(method)"] = handler
    }

    public func registerUnary<Request: SwiftProtobuf.Message>(
        service: String, method: String, _ body: @escaping (GRPCServerCall, Request) throws -> Void
    ) {
        register(service: service, method: method) { call in
            try body(call, MessageCoding.decode(Request.self, from: call.requestMessage, code: .invalidArgument, context: method).get())
        }
    }

    public func listen(path: String) throws(SystemError) {
        try listeners.listen(reactor: reactor, path: path) { [unowned self] conn in self.serve(conn) }
    }

    public func serve(_ fd: consuming OwnedFD) {
        let h2 = HTTP2ServerConnection(server: self, connection: Connection(reactor: reactor, fd: fd), limits: limits)
        connections.insert(h2)
        h2.start()
    }

    func connectionClosed(_ c: HTTP2ServerConnection) {
        connections.remove(c)
    }

    /// Stops accepting; sends GOAWAY to every connection, which close once their
    /// calls are done.
    public func shutdownGracefully() {
        listeners.close()
        for c in connections.all { c.shutdownGracefully() }
    }

    public func close() {
        listeners.close()
        for c in connections.takeAll() { c.close() }
    }

    /// A new stream's request headers: validate, find the method, make the call.
    func startCall(on conn: HTTP2ServerConnection, stream: HTTP2ServerConnection.Stream, headers: HPACKHeaders) -> GRPCServerCall? {
        let call = GRPCServerCall(connection: conn, stream: stream, headers: headers)
        guard headers.first(name: ":method") == "POST", let path = headers.first(name: ":path") else {
            call.fail(RPCError(.invalidArgument, "a gRPC request needs :method POST and a :path"))
            return nil
        }
        guard (headers.first(name: "content-type") ?? "").hasPrefix("application/grpc") else {
            call.fail(RPCError(.invalidArgument, "content-type must be application/grpc"))
            return nil
        }
        guard let handler = handlers[path] else {
            call.fail(RPCError(.unimplemented, "method \(path) is not implemented by this server"))
            return nil
        }
        call.handler = handler
        if let t = headers.first(name: "grpc-timeout") {
            guard let ns = Self.parseTimeout(t) else {
                call.fail(RPCError(.invalidArgument, "bad grpc-timeout \"\(t)\""))
                return nil
            }
            if ns != .max { call.armDeadline(reactor: reactor, afterNS: ns) }
        }
        return call
    }

    /// "100m" → 100 ms in ns. Units: H M S m u n; at most 8 digits. A timeout too long
    /// for 64 bits of nanoseconds (99999999H is ~11,000 years) is "no deadline", never a trap.
    static func parseTimeout(_ s: String) -> UInt64? {
        guard let unit = s.last, s.count >= 2, s.count <= 9, let n = UInt64(s.dropLast()) else { return nil }
        let scale: UInt64
        switch unit {
        case "H": scale = 3_600_000_000_000
        case "M": scale = 60_000_000_000
        case "S": scale = 1_000_000_000
        case "m": scale = 1_000_000
        case "u": scale = 1_000
        case "n": scale = 1
        default: return nil
        }
        let (ns, overflow) = n.multipliedReportingOverflow(by: scale)
        return overflow ? .max : ns
    }

    /// grpc-message is percent-encoded outside printable ASCII (and '%').
    static func percentEncode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            if b >= 0x20 && b <= 0x7E && b != UInt8(ascii: "%") {
                out.unicodeScalars.append(Unicode.Scalar(b))
            } else {
                out += "%" + String(b, radix: 16, uppercase: true).leftPad(2)
            }
        }
        return out
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

/// One gRPC call on the server.
public final class GRPCServerCall {
    unowned let connection: HTTP2ServerConnection
    let stream: HTTP2ServerConnection.Stream
    public let path: String
    public let metadata: [(name: String, value: String)]
    var handler: GRPCServer.Handler?
    public private(set) var requestMessage: [UInt8] = []
    private var messages = 0
    public private(set) var isFinished = false
    private var deadlineTimer: TimerID?
    private weak var reactor: Reactor?

    /// The call ended without its handler answering: deadline, reset, disconnect.
    public var onCancel: ((RPCError) -> Void)?

    init(connection: HTTP2ServerConnection, stream: HTTP2ServerConnection.Stream, headers: HPACKHeaders) {
        self.connection = connection
        self.stream = stream
        path = headers.first(name: ":path") ?? ""
        metadata = headers.filter { !$0.name.hasPrefix(":") }.map { (name: $0.name, value: $0.value) }
    }

    public func metadata(_ name: String) -> [String] {
        metadata.filter { $0.name == name }.map(\.value)
    }

    func armDeadline(reactor: Reactor, afterNS: UInt64) {
        self.reactor = reactor
        deadlineTimer = reactor.schedule(afterNS: afterNS) { [weak self] in
            guard let self, !self.isFinished else { return }
            self.deadlineTimer = nil
            let e = RPCError(.deadlineExceeded, "deadline of \(afterNS / 1_000_000) ms exceeded")
            self.fail(e)
            self.onCancel?(e)
        }
    }

    /// Takes complete length-prefixed messages out of the stream's inbound bytes.
    func receive(_ inbound: inout [UInt8]) {
        guard !isFinished else { inbound.removeAll(); return }
        while inbound.count >= 5 {
            let length = Int(HTTP2.u32(inbound[1..<5]))
            if inbound[0] != 0 {
                fail(RPCError(.unimplemented, "compressed messages are not supported (no grpc-encoding was negotiated)"))
                inbound.removeAll()
                return
            }
            if length > GRPCServer.maxMessageSize {
                fail(RPCError(.resourceExhausted, "message of \(length) bytes exceeds the maximum of \(GRPCServer.maxMessageSize)"))
                inbound.removeAll()
                return
            }
            guard inbound.count >= 5 + length else { return }
            messages += 1
            if messages > 1 {
                fail(RPCError(.unimplemented, "\(path) takes one request message (client streaming is not supported)"))
                inbound.removeAll()
                return
            }
            requestMessage = Array(inbound[5..<(5 + length)])
            inbound.removeFirst(5 + length)
        }
    }

    /// The client finished sending: run the handler.
    func requestComplete() {
        guard !isFinished, let handler else { return }
        self.handler = nil
        guard messages == 1 else {
            fail(RPCError(.internal, "\(path): expected one request message, got \(messages)"))
            return
        }
        do { try handler(self) } catch { fail(RPCError.from(error)) }
    }

    /// One message of a server stream.
    public func send(_ bytes: [UInt8]) {
        guard !isFinished else { return }
        if bytes.count > GRPCServer.maxMessageSize {
            fail(RPCError(.resourceExhausted, "response of \(bytes.count) bytes exceeds the maximum of \(GRPCServer.maxMessageSize)"))
            return
        }
        connection.sendMessage(stream, bytes)
    }

    public func send<M: SwiftProtobuf.Message>(_ message: M) {
        switch MessageCoding.encode(message) {
        case .success(let bytes): send(bytes)
        case .failure(let error): fail(error)
        }
    }

    /// The unary answer: message, then OK.
    public func respond(_ bytes: [UInt8]) {
        guard !isFinished else { return }
        send(bytes)
        finish()
    }

    public func respond<M: SwiftProtobuf.Message>(_ message: M) {
        switch MessageCoding.encode(message) {
        case .success(let bytes): respond(bytes)
        case .failure(let error): fail(error)
        }
    }

    /// Ends a server stream with OK.
    public func finish() {
        guard !isFinished else { return }
        end()
        connection.finish(stream, status: nil)
    }

    public func fail(_ error: RPCError) {
        guard !isFinished else { return }
        end()
        connection.finish(stream, status: error)
    }

    func cancel(_ error: RPCError) {
        guard !isFinished else { return }
        end()
        onCancel?(error)
    }

    private func end() {
        isFinished = true
        handler = nil
        if let t = deadlineTimer { reactor?.cancel(t) }
        deadlineTimer = nil
    }
}
