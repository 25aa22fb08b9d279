import Testing
import NIOCore
import NIOHPACK
@testable import Runtime
@testable import KuasarWire
@testable import KuasarGRPC
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct GRPCShutdownTests {
    /// Reads whole frames the server sent: (type, flags, stream, payload); nil entry at EOF.
    static func frames(_ bytes: [UInt8]) -> [(UInt8, UInt8, UInt32, [UInt8])] {
        var out: [(UInt8, UInt8, UInt32, [UInt8])] = []
        var i = 0
        while i + 9 <= bytes.count {
            let n = Int(bytes[i]) << 16 | Int(bytes[i + 1]) << 8 | Int(bytes[i + 2])
            guard i + 9 + n <= bytes.count else { break }
            let stream = HTTP2.u32(bytes[(i + 5)..<(i + 9)]) & 0x7FFF_FFFF
            out.append((bytes[i + 3], bytes[i + 4], stream, Array(bytes[(i + 9)..<(i + 9 + n)])))
            i += 9 + n
        }
        return out
    }

    /// Shutdown sends GOAWAY naming the last stream, lets the open call finish, then closes.
    @Test(arguments: BackendKind.allCases)
    func gracefulShutdown(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let server = GRPCServer(reactor: reactor)
            var held: GRPCServerCall?
            server.register(service: "test.Slow", method: "Call") { held = $0 }
            let pair = try Socket.pair()
            let client = pair.second.rawValue
            server.serve(pair.first)

            var encoder = HPACKEncoder(allocator: ByteBufferAllocator())
            var block = ByteBufferAllocator().buffer(capacity: 64)
            try encoder.encode(headers: [":method": "POST", ":scheme": "http", ":path": "/test.Slow/Call",
                                         ":authority": "x", "content-type": "application/grpc"], to: &block)
            var out = HTTP2.preface
            HTTP2.appendFrame(to: &out, type: .settings, streamID: 0)
            HTTP2.appendFrame(to: &out, type: .headers, flags: .endHeaders, streamID: 1, payload: block.readBytes(length: block.readableBytes)!)
            HTTP2.appendFrame(to: &out, type: .data, flags: .endStream, streamID: 1, payload: [0, 0, 0, 0, 1, 42])
            #expect(writeRaw(client, out) == out.count)
            try spin(reactor, "the call reaches its handler") { held != nil }
            #expect(held?.requestMessage == [42])

            server.shutdownGracefully()
            var received: [UInt8] = []
            try settle(reactor, ms: 20)
            received += (try drain(client)) ?? []
            let goaway = Self.frames(received).first { $0.0 == HTTP2.FrameType.goAway.rawValue }
            #expect(goaway != nil)
            if let g = goaway {
                #expect(HTTP2.u32(g.3[0..<4]) == 1, "last stream id")
                #expect(HTTP2.u32(g.3[4..<8]) == 0, "NO_ERROR")
            }
            #expect(server.connectionCount == 1, "the connection stays open for the call in flight")

            held?.respond([7, 7])
            // The client's end is not on the reactor: poll it while the loop runs
            // without blocking.
            var eof = false
            for _ in 0..<2000 where !eof {
                try reactor.runOnce(block: false)
                if let more = try drain(client) { received += more } else { eof = true }
                usleep(1000)
            }
            #expect(eof, "the server closed after the last call")
            let types = Self.frames(received).map(\.0)
            #expect(types.contains(HTTP2.FrameType.data.rawValue))
            let last = Self.frames(received).last { $0.0 == HTTP2.FrameType.headers.rawValue }
            #expect(last.map { $0.1 & HTTP2.Flags.endStream.rawValue != 0 } == true, "trailers end the stream")
            #expect(server.connectionCount == 0)
            pair.second.close()
            server.close()
        }
    }
}
}
