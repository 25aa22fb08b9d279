import Logging
import NIOCore
import NIOHPACK
import KuasarSystem
import KuasarReactor
import KuasarWire

/// The server side of one HTTP/2 connection (h2c with prior knowledge, as containerd
/// dials a unix socket), on the reactor. It owns the HPACK state, the streams and both
/// directions of flow control, and hands complete requests to its `GRPCServer`.
final class HTTP2ServerConnection {
    typealias Limits = HTTP2Limits

    final class Stream {
        let id: UInt32
        var remoteClosed = false
        var sendWindow: Int
        var recvWindow: Int
        var unackedRecv = 0
        var inbound: [UInt8] = []
        var outbound: [UInt8] = []
        var outboundOffset = 0
        var pendingTrailers: HPACKHeaders?
        var headersSent = false
        var call: GRPCServerCall?
        init(id: UInt32, sendWindow: Int, recvWindow: Int) {
            self.id = id
            self.sendWindow = sendWindow
            self.recvWindow = recvWindow
        }
        var outboundPending: Int { outbound.count - outboundOffset }
    }

    unowned let server: GRPCServer
    let connection: Connection
    let limits: Limits
    var logger: Logger { server.logger }
    private var decoder = HTTP2FrameDecoder()
    private var hpackDecoder: HPACKDecoder
    private var hpackEncoder: HPACKEncoder
    private var streams: [UInt32: Stream] = [:]
    private var lastStreamID: UInt32 = 0
    private var settingsReceived = false
    private var closed = false
    private var goingAway = false

    // Peer's settings and our send windows.
    private var peerInitialWindow = 65_535
    private var peerMaxFrameSize = HTTP2.defaultMaxFrameSize
    private var connectionSendWindow = 65_535
    private var connectionRecvWindow = 65_535
    private var connectionUnackedRecv = 0

    // A header block in progress (HEADERS then CONTINUATION until END_HEADERS).
    private var headerBlockStream: UInt32?
    private var headerBlock: [UInt8] = []
    private var headerBlockEndsStream = false

    private var bufferedInbound = 0
    private var controlWindowStart: UInt64 = 0
    private var controlCount = 0

    init(server: GRPCServer, connection: Connection, limits: Limits) {
        self.server = server
        self.connection = connection
        self.limits = limits
        hpackDecoder = HPACKDecoder(allocator: ByteBufferAllocator(), maxDynamicTableSize: HPACKDecoder.maxDynamicTableSize,
                                    maxHeaderListSize: limits.maxHeaderListSize)
        hpackEncoder = HPACKEncoder(allocator: ByteBufferAllocator())
    }

    func start() {
        connection.onRead = { [unowned self] _, bytes in self.receive(bytes) }
        connection.onWritable = { [unowned self] _ in self.pumpAll() }
        connection.onClose = { [unowned self] _, error in
            if let error { self.logger.debug("h2 connection closed: \(error)") }
            self.teardown()
        }
        do { try connection.start() } catch {
            connection.close(error: error)
            return
        }
        // Our SETTINGS, then open the connection window beyond the RFC's 64 KiB.
        var out: [UInt8] = []
        var s: [UInt8] = []
        func setting(_ id: HTTP2.Setting, _ v: Int) {
            s.append(UInt8(id.rawValue >> 8)); s.append(UInt8(id.rawValue & 0xFF))
            HTTP2.appendU32(to: &s, UInt32(v))
        }
        setting(.maxConcurrentStreams, limits.maxConcurrentStreams)
        setting(.initialWindowSize, limits.initialWindow)
        setting(.maxHeaderListSize, limits.maxHeaderListSize)
        setting(.enablePush, 0)
        HTTP2.appendFrame(to: &out, type: .settings, streamID: 0, payload: s)
        var inc: [UInt8] = []
        HTTP2.appendU32(to: &inc, UInt32(limits.connectionWindow - 65_535))
        HTTP2.appendFrame(to: &out, type: .windowUpdate, streamID: 0, payload: inc)
        connectionRecvWindow = limits.connectionWindow
        connection.write(out)
    }

    // MARK: Input

    private func receive(_ bytes: UnsafeRawBufferPointer) {
        decoder.append(bytes)
        connection.cork()
        defer { connection.uncork() }
        do {
            while !closed, let frame = try decoder.next() { try handle(frame) }
        } catch {
            fail(error)
        }
    }

    /// A connection error: GOAWAY naming the last stream we processed, then close.
    private func fail(_ error: HTTP2ConnectionError) {
        guard !closed else { return }
        logger.info("h2: \(error.code) — \(error.reason)")
        var payload: [UInt8] = []
        HTTP2.appendU32(to: &payload, lastStreamID)
        HTTP2.appendU32(to: &payload, error.code.rawValue)
        payload += Array(error.reason.utf8.prefix(256))
        var out: [UInt8] = []
        HTTP2.appendFrame(to: &out, type: .goAway, streamID: 0, payload: payload)
        connection.write(out)
        connection.closeAfterFlush()
        teardown()
    }

    private func countControlFrame() throws(HTTP2ConnectionError) {
        let now = MonotonicClock.nanoseconds()
        if now - controlWindowStart > 1_000_000_000 {
            controlWindowStart = now
            controlCount = 0
        }
        controlCount += 1
        if controlCount > limits.controlFramesPerSecond {
            throw HTTP2ConnectionError(code: .enhanceYourCalm, reason: "more than \(limits.controlFramesPerSecond) control frames per second")
        }
    }

    private func handle(_ f: HTTP2.Frame) throws(HTTP2ConnectionError) {
        if !settingsReceived && f.frameType != .settings {
            throw HTTP2ConnectionError(code: .protocolError, reason: "the first frame must be SETTINGS")
        }
        if let open = headerBlockStream, f.frameType != .continuation || f.streamID != open {
            throw HTTP2ConnectionError(code: .protocolError, reason: "expected CONTINUATION for stream \(open)")
        }
        switch f.frameType {
        case .settings: try handleSettings(f)
        case .headers: try handleHeaders(f)
        case .continuation: try handleContinuation(f)
        case .data: try handleData(f)
        case .windowUpdate: try handleWindowUpdate(f)
        case .ping:
            guard f.streamID == 0 else { throw HTTP2ConnectionError(code: .protocolError, reason: "PING on a stream") }
            guard f.payload.count == 8 else { throw HTTP2ConnectionError(code: .frameSizeError, reason: "PING of \(f.payload.count) bytes") }
            try countControlFrame()
            if !f.flags.contains(.ack) {
                var out: [UInt8] = []
                HTTP2.appendFrame(to: &out, type: .ping, flags: .ack, streamID: 0, payload: f.payload)
                connection.write(out)
            }
        case .rstStream:
            guard f.streamID != 0 else { throw HTTP2ConnectionError(code: .protocolError, reason: "RST_STREAM on stream 0") }
            guard f.payload.count == 4 else { throw HTTP2ConnectionError(code: .frameSizeError, reason: "RST_STREAM of \(f.payload.count) bytes") }
            if f.streamID > lastStreamID { throw HTTP2ConnectionError(code: .protocolError, reason: "RST_STREAM for idle stream \(f.streamID)") }
            try countControlFrame()
            if let s = streams[f.streamID] {
                s.call?.cancel(RPCError(.cancelled, "client reset the stream"))
                removeStream(s)
            }
        case .priority:
            guard f.payload.count == 5 else { throw HTTP2ConnectionError(code: .frameSizeError, reason: "PRIORITY of \(f.payload.count) bytes") }
        case .goAway:
            goingAway = true
            if streams.isEmpty { connection.closeAfterFlush() }
        case .pushPromise:
            throw HTTP2ConnectionError(code: .protocolError, reason: "clients must not send PUSH_PROMISE")
        case .none:
            break  // unknown frame types are ignored (RFC 9113 §4.1)
        }
    }

    private func handleSettings(_ f: HTTP2.Frame) throws(HTTP2ConnectionError) {
        guard f.streamID == 0 else { throw HTTP2ConnectionError(code: .protocolError, reason: "SETTINGS on a stream") }
        try countControlFrame()
        if f.flags.contains(.ack) {
            guard f.payload.isEmpty else { throw HTTP2ConnectionError(code: .frameSizeError, reason: "SETTINGS ack with a payload") }
            return
        }
        guard f.payload.count % 6 == 0 else { throw HTTP2ConnectionError(code: .frameSizeError, reason: "SETTINGS of \(f.payload.count) bytes") }
        settingsReceived = true
        var i = 0
        while i < f.payload.count {
            let id = UInt16(f.payload[i]) << 8 | UInt16(f.payload[i + 1])
            let value = Int(HTTP2.u32(f.payload[(i + 2)..<(i + 6)]))
            i += 6
            switch HTTP2.Setting(rawValue: id) {
            case .headerTableSize:
                try? hpackEncoder.setDynamicTableSize(min(value, 4096))
            case .enablePush:
                guard value <= 1 else { throw HTTP2ConnectionError(code: .protocolError, reason: "ENABLE_PUSH \(value)") }
            case .initialWindowSize:
                guard value <= HTTP2.maxWindow else { throw HTTP2ConnectionError(code: .flowControlError, reason: "INITIAL_WINDOW_SIZE \(value)") }
                let delta = value - peerInitialWindow
                peerInitialWindow = value
                for s in streams.values {
                    s.sendWindow += delta
                    if s.sendWindow > HTTP2.maxWindow { throw HTTP2ConnectionError(code: .flowControlError, reason: "stream window overflow") }
                }
            case .maxFrameSize:
                guard value >= 16_384 && value <= 16_777_215 else { throw HTTP2ConnectionError(code: .protocolError, reason: "MAX_FRAME_SIZE \(value)") }
                peerMaxFrameSize = value
            case .maxConcurrentStreams, .maxHeaderListSize, .none:
                break
            }
        }
        var out: [UInt8] = []
        HTTP2.appendFrame(to: &out, type: .settings, flags: .ack, streamID: 0)
        connection.write(out)
        pumpAll()
    }

    /// Strips padding (and the priority block of HEADERS).
    private func fragment(_ f: HTTP2.Frame, priority: Bool) throws(HTTP2ConnectionError) -> ArraySlice<UInt8> {
        var body = f.payload[...]
        var pad = 0
        if f.flags.contains(.padded) {
            guard let p = body.first else { throw HTTP2ConnectionError(code: .frameSizeError, reason: "padded frame without a pad length") }
            pad = Int(p)
            body = body.dropFirst()
        }
        if priority && f.flags.contains(.priority) {
            guard body.count >= 5 else { throw HTTP2ConnectionError(code: .frameSizeError, reason: "HEADERS too short for its priority") }
            body = body.dropFirst(5)
        }
        guard pad <= body.count else { throw HTTP2ConnectionError(code: .protocolError, reason: "padding longer than the frame") }
        return body.dropLast(pad)
    }

    private func handleHeaders(_ f: HTTP2.Frame) throws(HTTP2ConnectionError) {
        let id = f.streamID
        guard id != 0 else { throw HTTP2ConnectionError(code: .protocolError, reason: "HEADERS on stream 0") }
        let block = try fragment(f, priority: true)
        if let s = streams[id] {
            // Trailers from the client: must end the stream.
            guard f.flags.contains(.endStream), !s.remoteClosed else {
                throw HTTP2ConnectionError(code: .protocolError, reason: "unexpected HEADERS on open stream \(id)")
            }
        } else {
            guard id % 2 == 1 else { throw HTTP2ConnectionError(code: .protocolError, reason: "client stream id \(id) is even") }
            guard id > lastStreamID else {
                throw HTTP2ConnectionError(code: .streamClosed, reason: "stream id \(id) reused or not increasing (last \(lastStreamID))")
            }
        }
        headerBlockStream = id
        headerBlock = Array(block)
        headerBlockEndsStream = f.flags.contains(.endStream)
        if f.flags.contains(.endHeaders) { try headersComplete() }
    }

    private func handleContinuation(_ f: HTTP2.Frame) throws(HTTP2ConnectionError) {
        guard headerBlockStream != nil else { throw HTTP2ConnectionError(code: .protocolError, reason: "CONTINUATION without HEADERS") }
        headerBlock += f.payload
        if headerBlock.count > limits.maxHeaderBlock {
            throw HTTP2ConnectionError(code: .enhanceYourCalm, reason: "header block over \(limits.maxHeaderBlock) bytes")
        }
        if f.flags.contains(.endHeaders) { try headersComplete() }
    }

    private func headersComplete() throws(HTTP2ConnectionError) {
        guard let id = headerBlockStream else { return }
        headerBlockStream = nil
        var buffer = ByteBuffer(bytes: headerBlock)
        headerBlock = []
        let headers: HPACKHeaders
        do {
            headers = try hpackDecoder.decodeHeaders(from: &buffer)
        } catch {
            // The decoder's dynamic table may now disagree with the client's: only a
            // connection error is safe.
            throw HTTP2ConnectionError(code: .compressionError, reason: "HPACK: \(error)")
        }
        if let s = streams[id] {
            // Client trailers: the request is complete.
            s.remoteClosed = true
            requestComplete(s)
            return
        }
        lastStreamID = id
        if goingAway || streams.count >= limits.maxConcurrentStreams {
            resetStream(id, .refusedStream)
            return
        }
        let s = Stream(id: id, sendWindow: peerInitialWindow, recvWindow: limits.initialWindow)
        streams[id] = s
        s.remoteClosed = headerBlockEndsStream
        s.call = server.startCall(on: self, stream: s, headers: headers)
        if s.remoteClosed { requestComplete(s) }
    }

    private func handleData(_ f: HTTP2.Frame) throws(HTTP2ConnectionError) {
        guard f.streamID != 0 else { throw HTTP2ConnectionError(code: .protocolError, reason: "DATA on stream 0") }
        let length = f.payload.count
        guard length <= connectionRecvWindow else {
            throw HTTP2ConnectionError(code: .flowControlError, reason: "DATA beyond the connection window")
        }
        connectionRecvWindow -= length
        connectionUnackedRecv += length
        if connectionUnackedRecv >= limits.connectionWindow / 4 {
            windowUpdate(stream: 0, connectionUnackedRecv)
            connectionRecvWindow += connectionUnackedRecv
            connectionUnackedRecv = 0
        }
        if length == 0 && !f.flags.contains(.endStream) { try countControlFrame() }
        guard let s = streams[f.streamID] else {
            if f.streamID > lastStreamID { throw HTTP2ConnectionError(code: .protocolError, reason: "DATA on idle stream \(f.streamID)") }
            return  // a stream we already reset or finished: drop (its window is accounted above)
        }
        guard !s.remoteClosed else {
            resetStream(s.id, .streamClosed)
            return
        }
        guard length <= s.recvWindow else {
            resetStream(s.id, .flowControlError)
            s.call?.cancel(RPCError(.resourceExhausted, "client exceeded the stream's flow-control window"))
            removeStream(s)
            return
        }
        s.recvWindow -= length
        s.unackedRecv += length
        let data = try fragment(f, priority: false)
        s.inbound += data
        bufferedInbound += data.count
        if f.flags.contains(.endStream) {
            s.remoteClosed = true
        } else if s.unackedRecv >= limits.initialWindow / 4 {
            windowUpdate(stream: s.id, s.unackedRecv)
            s.recvWindow += s.unackedRecv
            s.unackedRecv = 0
        }
        // The call may finish (and the stream go) while it parses: hand it the bytes
        // out of the stream rather than an inout into it.
        var pending = s.inbound
        s.inbound = []
        let before = pending.count
        s.call?.receive(&pending)
        if streams[s.id] === s {
            bufferedInbound -= before - pending.count
            s.inbound = pending
        } else {
            bufferedInbound -= before
        }
        if bufferedInbound > limits.maxBufferedInbound {
            throw HTTP2ConnectionError(code: .enhanceYourCalm,
                reason: "more than \(limits.maxBufferedInbound >> 20) MiB of unfinished request messages buffered")
        }
        if s.remoteClosed, streams[s.id] != nil { requestComplete(s) }
    }

    private func handleWindowUpdate(_ f: HTTP2.Frame) throws(HTTP2ConnectionError) {
        guard f.payload.count == 4 else { throw HTTP2ConnectionError(code: .frameSizeError, reason: "WINDOW_UPDATE of \(f.payload.count) bytes") }
        let inc = Int(HTTP2.u32(f.payload[...]) & 0x7FFF_FFFF)
        if f.streamID == 0 {
            guard inc > 0 else { throw HTTP2ConnectionError(code: .protocolError, reason: "WINDOW_UPDATE of 0 on the connection") }
            connectionSendWindow += inc
            guard connectionSendWindow <= HTTP2.maxWindow else {
                throw HTTP2ConnectionError(code: .flowControlError, reason: "connection window overflow")
            }
            pumpAll()
            return
        }
        guard let s = streams[f.streamID] else { return }
        guard inc > 0 else { resetStream(s.id, .protocolError); removeStream(s); return }
        s.sendWindow += inc
        guard s.sendWindow <= HTTP2.maxWindow else {
            resetStream(s.id, .flowControlError)
            s.call?.cancel(RPCError(.internal, "stream window overflow"))
            removeStream(s)
            return
        }
        pump(s)
    }

    private func requestComplete(_ s: Stream) {
        s.call?.requestComplete()
    }

    // MARK: Output

    private func windowUpdate(stream: UInt32, _ increment: Int) {
        var p: [UInt8] = []
        HTTP2.appendU32(to: &p, UInt32(increment))
        var out: [UInt8] = []
        HTTP2.appendFrame(to: &out, type: .windowUpdate, streamID: stream, payload: p)
        connection.write(out)
    }

    func resetStream(_ id: UInt32, _ code: HTTP2.ErrorCode) {
        var p: [UInt8] = []
        HTTP2.appendU32(to: &p, code.rawValue)
        var out: [UInt8] = []
        HTTP2.appendFrame(to: &out, type: .rstStream, streamID: id, payload: p)
        connection.write(out)
    }

    private func writeHeaders(_ s: Stream, _ headers: HPACKHeaders, endStream: Bool) {
        var buffer = ByteBufferAllocator().buffer(capacity: 128)
        do { try hpackEncoder.encode(headers: headers, to: &buffer) } catch {
            logger.error("h2: HPACK encode failed: \(error)")
            return
        }
        let block = buffer.readBytes(length: buffer.readableBytes) ?? []
        var out: [UInt8] = []
        var offset = 0
        var first = true
        repeat {
            let n = min(block.count - offset, peerMaxFrameSize)
            let last = offset + n == block.count
            var flags: HTTP2.Flags = last ? .endHeaders : []
            if first && endStream { flags.insert(.endStream) }
            block[offset..<(offset + n)].withUnsafeBytes {
                HTTP2.appendFrame(to: &out, type: first ? .headers : .continuation, flags: flags, streamID: s.id, payload: $0)
            }
            offset += n
            first = false
        } while offset < block.count
        connection.write(out)
    }

    /// Response headers, once, before any message.
    func sendResponseHeaders(_ s: Stream) {
        guard !s.headersSent else { return }
        s.headersSent = true
        writeHeaders(s, [":status": "200", "content-type": "application/grpc"], endStream: false)
    }

    func sendMessage(_ s: Stream, _ bytes: [UInt8]) {
        sendResponseHeaders(s)
        s.outbound.append(0)
        let n = UInt32(bytes.count)
        HTTP2.appendU32(to: &s.outbound, n)
        s.outbound += bytes
        pump(s)
    }

    /// Ends the stream with trailers (or trailers-only when nothing was sent).
    func finish(_ s: Stream, status: RPCError?) {
        var trailers = HPACKHeaders()
        if !s.headersSent && s.outboundPending == 0 {
            trailers.add(name: ":status", value: "200")
            trailers.add(name: "content-type", value: "application/grpc")
            s.headersSent = true
        }
        trailers.add(name: "grpc-status", value: "\(status?.code.rawValue ?? 0)")
        if let status { trailers.add(name: "grpc-message", value: GRPCServer.percentEncode(status.message)) }
        s.pendingTrailers = trailers
        pump(s)
    }

    private func pump(_ s: Stream) {
        while s.outboundPending > 0 && connection.isWritable {
            let n = min(s.outboundPending, s.sendWindow, connectionSendWindow, peerMaxFrameSize)
            if n <= 0 { return }
            var out: [UInt8] = []
            out.reserveCapacity(HTTP2.headerLength + n)
            s.outbound[s.outboundOffset..<(s.outboundOffset + n)].withUnsafeBytes {
                HTTP2.appendFrame(to: &out, type: .data, streamID: s.id, payload: $0)
            }
            s.outboundOffset += n
            s.sendWindow -= n
            connectionSendWindow -= n
            connection.write(out)
            if s.outboundOffset == s.outbound.count {
                s.outbound.removeAll(keepingCapacity: false)
                s.outboundOffset = 0
            }
        }
        if s.outboundPending == 0, let trailers = s.pendingTrailers {
            s.pendingTrailers = nil
            writeHeaders(s, trailers, endStream: true)
            if !s.remoteClosed { resetStream(s.id, .noError) }  // we are done; stop the client sending
            removeStream(s)
            if goingAway && streams.isEmpty { connection.closeAfterFlush() }
        }
    }

    private func pumpAll() {
        for s in Array(streams.values) where s.outboundPending > 0 || s.pendingTrailers != nil { pump(s) }
    }

    // MARK: Closing

    /// Graceful: GOAWAY now, close once the open streams are done.
    func shutdownGracefully() {
        guard !closed, !goingAway else { return }
        goingAway = true
        var payload: [UInt8] = []
        HTTP2.appendU32(to: &payload, lastStreamID)
        HTTP2.appendU32(to: &payload, HTTP2.ErrorCode.noError.rawValue)
        var out: [UInt8] = []
        HTTP2.appendFrame(to: &out, type: .goAway, streamID: 0, payload: payload)
        connection.write(out)
        if streams.isEmpty { connection.closeAfterFlush() }
    }

    func close() { connection.close() }

    private func teardown() {
        guard !closed else { return }
        closed = true
        for s in streams.values { s.call?.cancel(RPCError(.cancelled, "client disconnected")) }
        streams.removeAll()
        server.connectionClosed(self)
    }

    private func removeStream(_ s: Stream) {
        bufferedInbound -= s.inbound.count
        s.inbound = []
        streams[s.id] = nil
    }
}

/// What one HTTP/2 connection may cost us, whatever the client sends.
public struct HTTP2Limits: Sendable {
    public var maxConcurrentStreams = 1024
    /// Per stream: what we let a client send ahead.
    public var initialWindow = 1 << 20
    /// For the whole connection.
    public var connectionWindow = 16 << 20
    public var maxHeaderListSize = 16 * 1024
    /// HEADERS + CONTINUATION before END_HEADERS.
    public var maxHeaderBlock = 64 * 1024
    /// SETTINGS, PING, RST_STREAM and empty DATA frames per second.
    public var controlFramesPerSecond = 1000
    /// Request bytes buffered across all streams before their messages complete.
    /// Each message may be 16 MiB, so without this a client could park 1024 of them.
    public var maxBufferedInbound = 64 << 20
    public init() {}
}
