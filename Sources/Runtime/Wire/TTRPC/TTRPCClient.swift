#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import SwiftProtobuf
import KuasarSystem
import KuasarReactor

/// A ttrpc client on the reactor: many calls in flight on one connection, each on
/// its own odd stream id; unary calls and all three kinds of stream. Completions run
/// on the loop. The daemon is a client of each VM's agent and of containerd's events
/// service.
public final class TTRPCClient {
    let reactor: Reactor
    let logger: Logger
    private let connection: Connection
    private var decoder = TTRPCFrameDecoder()
    private var nextStreamID: UInt32 = 1
    private var calls: [UInt32: TTRPCClientCall] = [:]
    public private(set) var isClosed = false
    private var closeReason = RPCError(.unavailable, "connection closed")

    /// Runs once when the connection ends, after every open call has been failed.
    public var onClose: ((RPCError) -> Void)?

    public init(reactor: Reactor, fd: consuming OwnedFD, logger: Logger = Logger(label: "kuasar.ttrpc.client")) throws(SystemError) {
        self.reactor = reactor
        self.logger = logger
        connection = Connection(reactor: reactor, fd: fd)
        // A completion may drop the client's last owner (its owner closes it on an answer):
        // the client lives until its handler has returned.
        connection.onRead = { [unowned self] _, bytes in
            withExtendedLifetime(self) {
                self.decoder.append(bytes)
                while !self.isClosed, let item = self.decoder.next() { self.handle(item) }
            }
        }
        connection.onClose = { [unowned self] _, error in
            withExtendedLifetime(self) {
                if let error { self.closeReason = RPCError(.unavailable, "connection lost: \(error)") }
                self.teardown()
            }
        }
        try connection.start()
    }

    /// Connects to a ttrpc server on a unix socket.
    public static func connect(reactor: Reactor, path: String) throws(SystemError) -> TTRPCClient {
        try TTRPCClient(reactor: reactor, fd: try Socket.connectUnix(path: path))
    }

    public var openCalls: Int { calls.count }

    /// Starts a call. `payload` is the encoded request message; `timeoutNS` bounds the
    /// whole call here and is sent to the server as `timeout_nano`.
    @discardableResult
    public func start(
        service: String, method: String, payload: [UInt8], timeoutNS: UInt64? = nil,
        metadata: [(String, String)] = [], kind: TTRPCClientCall.Kind = .unary,
        completion: @escaping (Result<[UInt8], RPCError>) -> Void
    ) -> TTRPCClientCall {
        let stream = nextStreamID
        nextStreamID &+= 2
        let call = TTRPCClientCall(client: self, streamID: stream, kind: kind, completion: completion)
        guard !isClosed else {
            call.complete(.failure(closeReason))
            return call
        }
        var request = Ttrpc_Request()
        request.service = service
        request.method = method
        request.payload = Data(payload)
        if let timeoutNS { request.timeoutNano = Int64(clamping: timeoutNS) }
        request.metadata = metadata.map { kv in
            var m = Ttrpc_KeyValue()
            m.key = kv.0
            m.value = kv.1
            return m
        }
        let body: [UInt8]
        do { body = try request.serializedBytes() } catch {
            call.complete(.failure(RPCError(.internal, "cannot encode request: \(error)")))
            return call
        }
        guard body.count <= TTRPC.maxDataLength else {
            call.complete(.failure(RPCError(.resourceExhausted,
                "request of \(body.count) bytes exceeds the maximum message size of \(TTRPC.maxDataLength)")))
            return call
        }
        calls[stream] = call
        let flags: TTRPC.Flags
        switch kind {
        case .unary: flags = []
        case .serverStream: flags = .remoteClosed
        case .clientStream, .bidirectional: flags = .remoteOpen
        }
        send(stream: stream, type: .request, flags: flags, body: body)
        if let timeoutNS {
            call.deadline = reactor.schedule(afterNS: timeoutNS) { [weak call] in
                call?.complete(.failure(RPCError(.deadlineExceeded, "\(service)/\(method): no answer within \(timeoutNS / 1_000_000) ms")))
            }
        }
        return call
    }

    /// A unary call with protobuf messages.
    public func unary<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        service: String, method: String, _ request: Request, as: Response.Type, timeoutNS: UInt64? = nil,
        metadata: [(String, String)] = [], completion: @escaping (Result<Response, RPCError>) -> Void
    ) {
        let payload: [UInt8]
        switch MessageCoding.encode(request) {
        case .success(let bytes): payload = bytes
        case .failure(let error): completion(.failure(error)); return
        }
        start(service: service, method: method, payload: payload, timeoutNS: timeoutNS, metadata: metadata) { result in
            completion(result.flatMap { MessageCoding.decode(Response.self, from: $0, code: .internal, context: "\(service)/\(method) answer") })
        }
    }

    func send(stream: UInt32, type: TTRPC.MessageType, flags: TTRPC.Flags, body: [UInt8]) {
        connection.write(TTRPC.frame(streamID: stream, type: type, flags: flags, body: body))
    }

    private func handle(_ item: TTRPCDecoded) {
        switch item {
        case .oversized(let stream, let length):
            calls[stream]?.complete(.failure(RPCError(.resourceExhausted,
                "server sent \(length) bytes, over the maximum message size of \(TTRPC.maxDataLength)")))
        case .frame(let frame):
            guard let call = calls[frame.streamID] else { return }  // late answer to a call we gave up on
            switch frame.messageType {
            case .response:
                let response: Ttrpc_Response
                do { response = try Ttrpc_Response(serializedBytes: frame.payload) } catch {
                    call.complete(.failure(RPCError(.internal, "cannot decode ttrpc response: \(error)")))
                    return
                }
                if response.hasStatus && response.status.code != 0 {
                    let code = RPCCode(rawValue: response.status.code) ?? .unknown
                    call.complete(.failure(RPCError(code, response.status.message)))
                } else {
                    call.complete(.success([UInt8](response.payload)))
                }
            case .data:
                if !frame.flags.contains(.noData) { call.onData?(frame.payload) }
                if frame.flags.contains(.remoteClosed) { call.complete(.success([])) }
            case .request, .none:
                call.complete(.failure(RPCError(.internal, "server sent message type \(frame.type) on stream \(frame.streamID)")))
            }
        }
    }

    func finished(_ call: TTRPCClientCall) {
        if calls[call.streamID] === call { calls[call.streamID] = nil }
    }

    private func teardown() {
        guard !isClosed else { return }
        isClosed = true
        for call in Array(calls.values) { call.complete(.failure(closeReason)) }
        calls.removeAll()
        onClose?(closeReason)
    }

    /// Closes the connection; open calls fail with Unavailable.
    public func close() {
        closeReason = RPCError(.unavailable, "client closed")
        connection.close()
    }
}

/// One call from the client side.
public final class TTRPCClientCall {
    public enum Kind: Sendable {
        case unary, serverStream, clientStream, bidirectional
    }

    unowned let client: TTRPCClient
    public let streamID: UInt32
    public let kind: Kind
    private var completion: ((Result<[UInt8], RPCError>) -> Void)?
    var deadline: TimerID?
    private var sendClosed: Bool

    /// Messages the server streams back (server and bidirectional streams).
    public var onData: (([UInt8]) -> Void)?

    init(client: TTRPCClient, streamID: UInt32, kind: Kind, completion: @escaping (Result<[UInt8], RPCError>) -> Void) {
        self.client = client
        self.streamID = streamID
        self.kind = kind
        self.completion = completion
        sendClosed = kind == .unary || kind == .serverStream
    }

    public var isFinished: Bool { completion == nil }

    /// Sends one message on a client stream.
    public func send(_ payload: [UInt8]) {
        guard !sendClosed, !isFinished else { return }
        client.send(stream: streamID, type: .data, flags: [], body: payload)
    }

    /// Closes our side of the stream; the server answers when it is done.
    public func closeSend() {
        guard !sendClosed, !isFinished else { return }
        sendClosed = true
        client.send(stream: streamID, type: .data, flags: [.remoteClosed, .noData], body: [])
    }

    func complete(_ result: Result<[UInt8], RPCError>) {
        guard let completion else { return }
        self.completion = nil
        onData = nil
        if let deadline { client.reactor.cancel(deadline) }
        deadline = nil
        client.finished(self)
        completion(result)
    }
}
