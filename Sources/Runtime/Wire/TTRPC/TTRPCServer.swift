#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import SwiftProtobuf
import KuasarSystem
import KuasarReactor

/// A ttrpc server on the reactor: a registry of "/service/method" handlers and the
/// connections it serves. Handlers run on the loop and must not block; a handler that
/// needs to wait (a Task/Wait, a VM agent call) keeps its `TTRPCServerCall` and answers
/// later. Unary calls and client-, server- and bidirectional streams share one model:
/// a call receives the request payload, then optional data frames, and ends with
/// exactly one response (or a final data frame with `remote closed`).
public final class TTRPCServer {
    public struct Limits: Sendable {
        /// Open calls per connection; more are refused with ResourceExhausted.
        public var maxConcurrentCalls = 1024
        /// Request bytes held by a connection's open calls (up to 4 MiB each): more
        /// are refused with ResourceExhausted until some calls finish.
        public var maxHeldRequestBytes = 64 << 20
        public init() {}
    }

    public typealias Handler = (TTRPCServerCall) throws -> Void

    let reactor: Reactor
    let logger: Logger
    public let limits: Limits
    /// service → method → handler: looked up per call without building a path string.
    private var handlers: [String: [String: Handler]] = [:]
    private var listeners = ListenerGroup()
    private var connections = LiveSet<TTRPCServerConnection>()

    public init(reactor: Reactor, limits: Limits = Limits(), logger: Logger = Logger(label: "kuasar.ttrpc")) {
        self.reactor = reactor
        self.limits = limits
        self.logger = logger
    }

    public var connectionCount: Int { connections.count }

    /// Registers a handler for any kind of call.
    public func register(service: String, method: String, _ handler: @escaping Handler) {
        handlers[service, default: [:]][method] = handler
    }

    /// Registers a unary protobuf method: the request arrives decoded; answer with
    /// `call.respond(message)` now or later, or throw / `call.fail` with a status.
    public func registerUnary<Request: SwiftProtobuf.Message>(
        service: String, method: String, _ body: @escaping (TTRPCServerCall, Request) throws -> Void
    ) {
        register(service: service, method: method) { call in
            try body(call, MessageCoding.decode(Request.self, from: call.requestData, code: .invalidArgument, context: method).get())
        }
    }

    func handler(for service: String, _ method: String) -> Handler? {
        handlers[service]?[method]
    }

    /// Listens on a unix socket (0600) and serves every connection it accepts.
    public func listen(path: String) throws(SystemError) {
        try listeners.listen(reactor: reactor, path: path) { [unowned self] conn in self.serve(conn) }
    }

    /// Serves an already connected stream (an accepted socket, a VM agent channel);
    /// `onClose` runs once it has closed (a channel that must be opened again).
    /// `closeOnOversized`: a frame longer than the limit ends the connection (after its
    /// error answer) instead of being skipped — for a channel with no reliable end of
    /// stream (virtio-serial), where a length read from the middle of a frame would
    /// otherwise make it skip everything that follows; opened again, it starts afresh.
    public func serve(_ fd: consuming OwnedFD, closeOnOversized: Bool = false, onClose: (() -> Void)? = nil) {
        let conn = TTRPCServerConnection(server: self, connection: Connection(reactor: reactor, fd: fd))
        conn.onClosed = onClose
        conn.closeOnOversized = closeOnOversized
        connections.insert(conn)
        conn.start()
    }

    func connectionClosed(_ conn: TTRPCServerConnection) {
        connections.remove(conn)
    }

    /// Stops listening and closes every connection; open calls see Canceled.
    public func close() {
        listeners.close()
        for c in connections.takeAll() { c.close() }
    }
}

/// One client connection: decodes frames, routes them to calls, writes responses.
final class TTRPCServerConnection {
    unowned let server: TTRPCServer
    let connection: Connection
    private var decoder = TTRPCFrameDecoder()
    private var calls: [UInt32: TTRPCServerCall] = [:]
    private var heldRequestBytes = 0
    private var closed = false
    var onClosed: (() -> Void)?
    var closeOnOversized = false
    /// Closing after a framing error: what is still read is not decoded.
    private var ending = false
    /// Whatever the service says the client's session is (see `TTRPCServerCall.session`).
    var session: UInt64 = 0

    init(server: TTRPCServer, connection: Connection) {
        self.server = server
        self.connection = connection
    }

    func start() {
        // A handler may end the connection (and the server drop it): it lives until the
        // handler has returned.
        connection.onRead = { [unowned self] _, bytes in
            withExtendedLifetime(self) {
                if self.ending { return }
                self.decoder.append(bytes)
                self.connection.cork()
                defer { self.connection.uncork() }
                while !self.closed, !self.ending, let item = self.decoder.next() { self.handle(item) }
            }
        }
        connection.onClose = { [unowned self] _, error in
            withExtendedLifetime(self) {
                if let error { self.server.logger.debug("ttrpc connection closed: \(error)") }
                self.teardown()
            }
        }
        do {
            try connection.start()
        } catch {
            server.logger.error("ttrpc: cannot serve a connection: \(error)")
            connection.close(error: error)
        }
    }

    func close() {
        connection.close()
    }

    /// Every open call but `keep` ends as cancelled, unanswered: the client that made them
    /// is gone although the connection stays (a channel that outlives its peer).
    func cancelCalls(except keep: TTRPCServerCall, _ error: RPCError) -> Int {
        let others = calls.values.filter { $0 !== keep }
        for call in others { call.cancel(error) }
        return others.count
    }

    private func teardown() {
        guard !closed else { return }
        closed = true
        // The client is gone: every open call is cancelled; nothing can be answered.
        for call in Array(calls.values) { call.cancel(RPCError(.cancelled, "client disconnected")) }
        calls.removeAll()
        // Taken first: the server's set may hold the last reference to self.
        let after = onClosed
        onClosed = nil
        server.connectionClosed(self)
        after?()
    }

    private func handle(_ item: TTRPCDecoded) {
        switch item {
        case .oversized(let stream, let length):
            sendResponse(stream: stream, status: RPCError(.resourceExhausted,
                "message length \(length) exceeds the maximum message size of \(TTRPC.maxDataLength)"), payload: [])
            calls[stream]?.cancel(RPCError(.resourceExhausted, "oversized message on the stream"))
            if closeOnOversized {
                server.logger.warning("ttrpc: a frame of \(length) bytes on a channel without end of stream: closed to start afresh")
                ending = true
                connection.closeAfterFlush()
            }
        case .frame(let frame):
            switch frame.messageType {
            case .request: handleRequest(frame)
            case .data: handleData(frame)
            case .response, .none:
                // A client never sends responses; an unknown type cannot be routed.
                sendResponse(stream: frame.streamID, status: RPCError(.invalidArgument,
                    "unexpected ttrpc message type \(frame.type) from a client"), payload: [])
            }
        }
    }

    private func handleRequest(_ frame: TTRPC.Frame) {
        let stream = frame.streamID
        guard stream % 2 == 1 else {
            sendResponse(stream: stream, status: RPCError(.invalidArgument, "stream id \(stream) must be odd for client initiated streams"), payload: [])
            return
        }
        guard calls[stream] == nil else {
            sendResponse(stream: stream, status: RPCError(.invalidArgument, "stream id \(stream) is already in use"), payload: [])
            return
        }
        let request: Ttrpc_Request
        do {
            request = try Ttrpc_Request(serializedBytes: frame.payload)
        } catch {
            sendResponse(stream: stream, status: RPCError(.invalidArgument, "cannot decode ttrpc request: \(error)"), payload: [])
            return
        }
        guard let handler = server.handler(for: request.service, request.method) else {
            sendResponse(stream: stream, status: RPCError(.unimplemented,
                "method /\(request.service)/\(request.method) is not implemented by this server"), payload: [])
            return
        }
        guard calls.count < server.limits.maxConcurrentCalls else {
            sendResponse(stream: stream, status: RPCError(.resourceExhausted,
                "too many concurrent calls on this connection (limit \(server.limits.maxConcurrentCalls))"), payload: [])
            return
        }
        guard heldRequestBytes + request.payload.count <= server.limits.maxHeldRequestBytes else {
            sendResponse(stream: stream, status: RPCError(.resourceExhausted,
                "open calls on this connection already hold \(heldRequestBytes) request bytes (limit \(server.limits.maxHeldRequestBytes))"), payload: [])
            return
        }
        let streaming = !frame.flags.intersection([.remoteOpen, .remoteClosed]).isEmpty
        let call = TTRPCServerCall(connection: self, streamID: stream, request: request,
                                   clientStreaming: frame.flags.contains(.remoteOpen), streaming: streaming)
        calls[stream] = call
        heldRequestBytes += call.requestData.count
        if request.timeoutNano > 0 {
            call.armDeadline(reactor: server.reactor, afterNS: UInt64(request.timeoutNano))
        }
        do {
            try handler(call)
        } catch {
            call.fail(RPCError.from(error))
        }
    }

    private func handleData(_ frame: TTRPC.Frame) {
        guard let call = calls[frame.streamID] else {
            // Data for a finished or unknown stream: nothing to route it to. The Go
            // implementation drops it too; a reply could race the finished call's response.
            server.logger.debug("ttrpc: data for unknown stream \(frame.streamID) dropped")
            return
        }
        call.receiveData(frame.flags.contains(.noData) ? nil : frame.payload, closed: frame.flags.contains(.remoteClosed))
    }

    func sendResponse(stream: UInt32, status: RPCError?, payload: [UInt8]) {
        if status == nil && payload.count <= TTRPC.maxDataLength - 8 {
            // The hot path: ttrpc.Response{payload = 2} written straight into the frame
            // (tag 0x12, varint length, bytes) — no intermediate message or copies.
            var frame: [UInt8] = []
            let body = payload.isEmpty ? 0 : 1 + varintSize(payload.count) + payload.count
            frame.reserveCapacity(TTRPC.headerLength + body)
            TTRPC.appendHeader(to: &frame, length: body, streamID: stream, type: .response, flags: [])
            if !payload.isEmpty {
                frame.append(0x12)
                appendVarint(&frame, UInt64(payload.count))
                frame += payload
            }
            if !closed { connection.write(frame) }
            return
        }
        var response = Ttrpc_Response()
        if let status {
            response.status.code = status.code.rawValue
            response.status.message = status.message
        }
        response.payload = Data(payload)
        let body: [UInt8]
        do { body = try response.serializedBytes() } catch { return }
        send(stream: stream, type: .response, flags: [], body: body)
    }

    func send(stream: UInt32, type: TTRPC.MessageType, flags: TTRPC.Flags, body: [UInt8]) {
        guard !closed else { return }
        if body.count > TTRPC.maxDataLength {
            // Never put an illegal frame on the wire: the peer would drop the connection.
            if type == .response || type == .data {
                sendResponse(stream: stream, status: RPCError(.resourceExhausted,
                    "response of \(body.count) bytes exceeds the maximum message size of \(TTRPC.maxDataLength)"), payload: [])
            }
            return
        }
        connection.write(TTRPC.frame(streamID: stream, type: type, flags: flags, body: body))
    }

    func finished(_ call: TTRPCServerCall) {
        if calls[call.streamID] === call {
            calls[call.streamID] = nil
            heldRequestBytes -= call.requestData.count
        }
    }
}

/// One call on the server side, from request to its single final answer.
public final class TTRPCServerCall {
    public enum State: Equatable, Sendable {
        case open
        /// The client will send no more data; the answer is still owed.
        case clientClosed
        case finished
    }

    unowned let connection: TTRPCServerConnection
    public let streamID: UInt32
    public let service: String
    public let method: String
    /// The request message's bytes.
    public var requestPayload: [UInt8] { [UInt8](requestData) }
    let requestData: Data
    public let metadata: [(key: String, value: String)]
    /// The request opened a stream (ttrpc 1.2 flags) rather than a unary call.
    public let isStreaming: Bool
    public private(set) var state: State
    private var deadlineTimer: TimerID?
    private weak var reactor: Reactor?

    /// Data frames from a client stream; nil for a frame that carried no message.
    public var onData: (([UInt8]) -> Void)?
    /// The client closed its side of the stream.
    public var onClientClosed: (() -> Void)?
    /// The call ended without an answer from its handler: deadline, disconnect.
    public var onCancel: ((RPCError) -> Void)?

    init(connection: TTRPCServerConnection, streamID: UInt32, request: Ttrpc_Request, clientStreaming: Bool, streaming: Bool) {
        self.connection = connection
        self.streamID = streamID
        service = request.service
        method = request.method
        requestData = request.payload
        metadata = request.metadata.map { (key: $0.key, value: $0.value) }
        isStreaming = streaming
        state = clientStreaming ? .open : .clientClosed
    }

    /// Every value of metadata `key` (e.g. `containerd-namespace-ttrpc`).
    public func metadata(_ key: String) -> [String] {
        metadata.filter { $0.key == key }.map(\.value)
    }

    public var isFinished: Bool { state == .finished }

    func armDeadline(reactor: Reactor, afterNS: UInt64) {
        self.reactor = reactor
        deadlineTimer = reactor.schedule(afterNS: afterNS) { [weak self] in
            guard let self, !self.isFinished else { return }
            self.deadlineTimer = nil
            let error = RPCError(.deadlineExceeded, "deadline of \(afterNS / 1_000_000) ms exceeded")
            self.fail(error)
            self.onCancel?(error)
        }
    }

    func receiveData(_ payload: [UInt8]?, closed: Bool) {
        guard state == .open else { return }
        if let payload { onData?(payload) }
        if closed {
            state = .clientClosed
            onClientClosed?()
        }
    }

    func cancel(_ error: RPCError) {
        guard !isFinished else { return }
        finish()
        onCancel?(error)
    }

    private func finish() {
        state = .finished
        if let t = deadlineTimer { reactor?.cancel(t) }
        deadlineTimer = nil
        onData = nil
        onClientClosed = nil
        connection.finished(self)
    }

    /// Sends one message on a server stream (a data frame).
    public func send(_ payload: [UInt8]) {
        guard !isFinished else { return }
        connection.send(stream: streamID, type: .data, flags: [], body: payload)
    }

    public func send<M: SwiftProtobuf.Message>(_ message: M) {
        switch MessageCoding.encode(message) {
        case .success(let bytes): send(bytes)
        case .failure(let error): fail(error)
        }
    }

    /// The successful answer; ends the call.
    public func respond(_ payload: [UInt8] = []) {
        guard !isFinished else { return }
        connection.sendResponse(stream: streamID, status: nil, payload: payload)
        finish()
    }

    public func respond<M: SwiftProtobuf.Message>(_ message: M) {
        switch MessageCoding.encode(message) {
        case .success(let bytes): respond(bytes)
        case .failure(let error): fail(error)
        }
    }

    /// The session of the connection this call came on, as the service names it (0 until
    /// it does): for channels whose peer can change without the connection ending.
    public var session: UInt64 {
        get { connection.session }
        set { connection.session = newValue }
    }

    /// Ends every other open call of this connection unanswered (`onCancel` runs): a new
    /// peer took over the channel. Returns how many there were.
    @discardableResult
    public func cancelOtherCalls(_ error: RPCError) -> Int {
        connection.cancelCalls(except: self, error)
    }

    /// Closes the connection this call came on once what is queued (its answer) is
    /// written: containerd waits for that close after a shim's Shutdown.
    public func closeConnectionAfterFlush() {
        connection.connection.closeAfterFlush()
    }

    /// Ends the call with an error status.
    public func fail(_ error: RPCError) {
        guard !isFinished else { return }
        connection.sendResponse(stream: streamID, status: error, payload: [])
        finish()
    }
}

/// Protobuf base-128 varints, for the few envelopes written by hand.
@inline(__always)
func varintSize(_ n: Int) -> Int {
    var v = UInt64(n), size = 1
    while v >= 0x80 { v >>= 7; size += 1 }
    return size
}

@inline(__always)
func appendVarint(_ out: inout [UInt8], _ value: UInt64) {
    var v = value
    while v >= 0x80 {
        out.append(UInt8(truncatingIfNeeded: v) | 0x80)
        v >>= 7
    }
    out.append(UInt8(v))
}
