#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOCore
import NIOHPACK
import SwiftProtobuf
import KuasarSystem
import KuasarReactor
import KuasarWire

/// A blocking gRPC client for unary calls over h2c on a unix socket: one call at a time
/// on one connection (streams 1, 3, 5, …). For the CLI, benchmarks and tests — a peer
/// of the daemon, never inside it.
public final class GRPCClient {
    private var fd: OwnedFD?
    private var decoder = HTTP2FrameDecoder(maxFrameSize: 1 << 24, expectPreface: false)
    private var hpackEncoder = HPACKEncoder(allocator: ByteBufferAllocator())
    private var hpackDecoder = HPACKDecoder(allocator: ByteBufferAllocator())
    private var nextStream: UInt32 = 1
    private var sendWindow = 65_535
    private let authority: String
    private var readBuffer = [UInt8](repeating: 0, count: 65_536)

    /// Closes the connection (also when the client goes away).
    public func close() { fd.take()?.close() }

    deinit { close() }

    public init(path: String) throws {
        fd = try Socket.connectUnix(path: path, blocking: true)
        authority = "localhost"
        var out = HTTP2.preface
        // No push; a large window so answers never wait for our WINDOW_UPDATE.
        var settings: [UInt8] = []
        for (id, value) in [(HTTP2.Setting.enablePush, UInt32(0)), (.initialWindowSize, UInt32(1 << 30))] {
            settings += [UInt8(id.rawValue >> 8), UInt8(id.rawValue & 0xff)]
            HTTP2.appendU32(to: &settings, value)
        }
        HTTP2.appendFrame(to: &out, type: .settings, streamID: 0, payload: settings)
        var inc: [UInt8] = []
        HTTP2.appendU32(to: &inc, UInt32(1 << 30))
        HTTP2.appendFrame(to: &out, type: .windowUpdate, streamID: 0, payload: inc)
        try fd!.writeAll(out)
    }


    /// Calls `/<service>/<method>`; a non-OK grpc-status throws it as an RPCError.
    public func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ service: String, _ method: String, _ request: Req, as: Resp.Type, metadata: [(String, String)] = []
    ) throws -> Resp {
        let id = nextStream
        nextStream += 2
        var headers = HPACKHeaders([(":method", "POST"), (":scheme", "http"), (":path", "/\(service)/\(method)"),
                                    (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers")])
        for (k, v) in metadata { headers.add(name: k, value: v) }
        var block = ByteBufferAllocator().buffer(capacity: 256)
        try hpackEncoder.encode(headers: headers, to: &block)
        var out: [UInt8] = []
        HTTP2.appendFrame(to: &out, type: .headers, flags: .endHeaders, streamID: id, payload: block.readBytes(length: block.readableBytes) ?? [])
        let body: [UInt8] = try request.serializedBytes()
        var message: [UInt8] = [0]
        HTTP2.appendU32(to: &message, UInt32(body.count))
        message += body
        guard message.count <= sendWindow else { throw RPCError(.resourceExhausted, "request of \(message.count) bytes over the peer's window") }
        sendWindow -= message.count
        HTTP2.appendFrame(to: &out, type: .data, flags: .endStream, streamID: id, payload: message)
        try fd!.writeAll(out)

        var data: [UInt8] = []
        var status: Int?
        var statusMessage = ""
        while status == nil {
            guard let frame = try nextFrame() else { throw RPCError(.unavailable, "the server closed the connection") }
            switch frame.frameType {
            case .settings where !frame.flags.contains(.ack):
                var ack: [UInt8] = []
                HTTP2.appendFrame(to: &ack, type: .settings, flags: .ack, streamID: 0)
                try fd!.writeAll(ack)
            case .ping where !frame.flags.contains(.ack):
                var pong: [UInt8] = []
                HTTP2.appendFrame(to: &pong, type: .ping, flags: .ack, streamID: 0, payload: frame.payload)
                try fd!.writeAll(pong)
            case .windowUpdate where frame.streamID == 0 && frame.payload.count == 4:
                sendWindow += Int(HTTP2.u32(frame.payload[...]) & 0x7fff_ffff)
            case .data where frame.streamID == id:
                data += frame.payload
            case .headers where frame.streamID == id:
                var buffer = ByteBuffer(bytes: frame.payload)
                let h = try hpackDecoder.decodeHeaders(from: &buffer)
                if let s = h.first(name: "grpc-status") {
                    status = Int(s) ?? 2
                    statusMessage = h.first(name: "grpc-message")?.percentDecoded ?? ""
                }
            case .rstStream where frame.streamID == id:
                throw RPCError(.unavailable, "stream reset by the server")
            case .goAway:
                throw RPCError(.unavailable, "the server sent GOAWAY")
            default:
                break
            }
        }
        guard status == 0 else { throw RPCError(RPCCode(rawValue: Int32(status!)) ?? .unknown, statusMessage) }
        guard data.count >= 5 else { throw RPCError(.internal, "no response message") }
        return try Resp(serializedBytes: Array(data[5...]))
    }

    private func nextFrame() throws -> HTTP2.Frame? {
        while true {
            if let f = try decoder.next() { return f }
            let n = readBuffer.withUnsafeMutableBytes { Glibc.read(fd?.rawValue ?? -1, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            readBuffer.withUnsafeBytes { decoder.append(UnsafeRawBufferPointer(rebasing: $0[..<n])) }
        }
    }
}
