import Testing
import NIOCore
import NIOHPACK
@testable import Runtime
@testable import KuasarWire
@testable import KuasarGRPC
#if canImport(Glibc)
import Glibc
#endif

/// Memory a hostile client can make a connection hold stays bounded.
extension AllTests {
@Suite struct MemoryBoundTests {
    /// ttrpc: calls a handler keeps open may hold only so many request bytes.
    @Test func ttrpcHeldRequestBytesAreBounded() throws {
        try withReactor(.uring) { reactor in
            var limits = TTRPCServer.Limits()
            limits.maxHeldRequestBytes = 1 << 20
            let server = TTRPCServer(reactor: reactor, limits: limits)
            var held: [TTRPCServerCall] = []
            server.register(service: "test.Hold", method: "Call") { held.append($0) }
            let pair = try Socket.pair()
            server.serve(pair.first)
            let client = try TTRPCClient(reactor: reactor, fd: pair.second)
            var results: [Int: Result<[UInt8], RPCError>] = [:]
            let payload = [UInt8](repeating: 1, count: 300 * 1024)
            for i in 0..<4 {
                client.start(service: "test.Hold", method: "Call", payload: payload) { results[i] = $0 }
            }
            try spin(reactor, "three held, the fourth refused") { held.count == 3 && results[3] != nil }
            if case .failure(let e)? = results[3] { #expect(e.code == .resourceExhausted) } else { Issue.record("fourth call should be refused") }
            // Finishing one makes room again.
            held[0].respond([9])
            client.start(service: "test.Hold", method: "Call", payload: payload) { results[4] = $0 }
            try spin(reactor, "a new call fits") { held.count == 4 }
            #expect((try? results[0]?.get()) == [9])
            for c in held.dropFirst() { c.respond() }
            try spin(reactor, "all answered") { results.count == 5 }
            client.close()
            server.close()
            try settle(reactor, ms: 5)
        }
    }

    /// gRPC: unfinished request messages across streams are capped per connection.
    @Test func http2BufferedRequestsAreBounded() throws {
        try withReactor(.uring) { reactor in
            var limits = HTTP2Limits()
            limits.maxBufferedInbound = 1 << 20
            let server = GRPCServer(reactor: reactor, limits: limits)
            server.register(service: "test.Echo", method: "Echo") { $0.respond($0.requestMessage) }
            let pair = try Socket.pair()
            let client = pair.second.rawValue
            server.serve(pair.first)

            var encoder = HPACKEncoder(allocator: ByteBufferAllocator())
            var out = HTTP2.preface
            HTTP2.appendFrame(to: &out, type: .settings, streamID: 0)
            for stream in [UInt32(1), 3, 5] {
                var block = ByteBufferAllocator().buffer(capacity: 64)
                try encoder.encode(headers: [":method": "POST", ":scheme": "http", ":path": "/test.Echo/Echo",
                                             ":authority": "x", "content-type": "application/grpc"], to: &block)
                HTTP2.appendFrame(to: &out, type: .headers, flags: .endHeaders, streamID: stream, payload: block.readBytes(length: block.readableBytes)!)
                // A message announced at 8 MiB, of which 400 KiB arrive and the rest never does.
                var first: [UInt8] = [0]
                HTTP2.appendU32(to: &first, 8 << 20)
                first += [UInt8](repeating: 0, count: 16_384 - 5)
                HTTP2.appendFrame(to: &out, type: .data, streamID: stream, payload: first)
                for _ in 0..<24 { HTTP2.appendFrame(to: &out, type: .data, streamID: stream, payload: [UInt8](repeating: 0, count: 16_384)) }
            }
            var sent = 0
            var received: [UInt8] = []
            var eof = false
            for _ in 0..<3000 where !eof {
                if sent < out.count {
                    let n = out[sent...].withUnsafeBytes { write(client, $0.baseAddress, $0.count) }
                    if n > 0 { sent += n }
                }
                try reactor.runOnce(block: false)
                if let more = try drain(client) { received += more } else { eof = true }
                usleep(500)
            }
            #expect(eof, "the connection is closed")
            let goaway = GRPCShutdownTests.frames(received).first { $0.0 == HTTP2.FrameType.goAway.rawValue }
            #expect(goaway.map { HTTP2.u32($0.3[4..<8]) } == HTTP2.ErrorCode.enhanceYourCalm.rawValue)
            pair.second.close()
            server.close()
        }
    }
}
}
