import Testing
import SwiftProtobuf
@testable import Runtime
@testable import KuasarWire
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct TTRPCTests {
    /// Server and client of ours on a socket pair, with an echo-ish service covering the
    /// three kinds of stream.
    func withPair(_ kind: BackendKind, _ body: (Reactor, TTRPCServer, TTRPCClient) throws -> Void) throws {
        try withReactor(kind) { reactor in
            let server = TTRPCServer(reactor: reactor)
            // Server stream: the request says how many numbers to send.
            server.register(service: "test.Stream", method: "Count") { call in
                let n = Int(call.requestPayload.first ?? 0)
                for i in 0..<n { call.send([UInt8(i)]) }
                call.respond()
            }
            // Client stream: sums what the client sends, answers once it closes.
            server.register(service: "test.Stream", method: "Sum") { call in
                var sum = 0
                call.onData = { sum += Int($0.first ?? 0) }
                call.onClientClosed = { call.respond([UInt8(sum)]) }
            }
            // Bidirectional: echoes every message doubled; ends when the client does.
            server.register(service: "test.Stream", method: "Double") { call in
                call.onData = { call.send($0.map { $0 &* 2 }) }
                call.onClientClosed = { call.respond() }
            }
            let pair = try Socket.pair()
            server.serve(pair.first)
            let client = try TTRPCClient(reactor: reactor, fd: pair.second)
            try body(reactor, server, client)
            client.close()
            server.close()
            try settle(reactor, ms: 5)
        }
    }

    @Test(arguments: BackendKind.allCases)
    func serverStream(kind: BackendKind) throws {
        try withPair(kind) { reactor, _, client in
            var got: [UInt8] = []
            var result: Result<[UInt8], RPCError>?
            let call = client.start(service: "test.Stream", method: "Count", payload: [5], kind: .serverStream) { result = $0 }
            call.onData = { got += $0 }
            try spin(reactor, "server stream") { result != nil }
            #expect(got == [0, 1, 2, 3, 4])
            #expect((try? result?.get()) == [])
        }
    }

    @Test(arguments: BackendKind.allCases)
    func clientStream(kind: BackendKind) throws {
        try withPair(kind) { reactor, _, client in
            var result: Result<[UInt8], RPCError>?
            let call = client.start(service: "test.Stream", method: "Sum", payload: [], kind: .clientStream) { result = $0 }
            for v: UInt8 in [1, 2, 3, 4] { call.send([v]) }
            call.closeSend()
            try spin(reactor, "client stream") { result != nil }
            #expect((try? result?.get()) == [10])
        }
    }

    @Test(arguments: BackendKind.allCases)
    func bidirectionalStream(kind: BackendKind) throws {
        try withPair(kind) { reactor, _, client in
            var got: [UInt8] = []
            var result: Result<[UInt8], RPCError>?
            let call = client.start(service: "test.Stream", method: "Double", payload: [], kind: .bidirectional) { result = $0 }
            call.onData = { got += $0 }
            call.send([1])
            try spin(reactor, "first echo") { got == [2] }
            call.send([21])
            try spin(reactor, "second echo") { got == [2, 42] }
            call.closeSend()
            try spin(reactor, "stream end") { result != nil }
            #expect((try? result?.get()) == [])
        }
    }

    @Test(arguments: BackendKind.allCases)
    func manyConcurrentStreamsOnOneConnection(kind: BackendKind) throws {
        try withPair(kind) { reactor, _, client in
            var sums: [Int: UInt8] = [:]
            for i in 0..<100 {
                let call = client.start(service: "test.Stream", method: "Sum", payload: [], kind: .clientStream) {
                    sums[i] = (try? $0.get())?.first
                }
                call.send([UInt8(i % 50)])
                call.send([1])
            }
            // Close them in reverse order: answers must still reach their own callers.
            // (Streams 1, 3, 5, ... belong to calls 0, 1, 2, ...)
            #expect(client.openCalls == 100)
            for i in (0..<100).reversed() {
                client.send(stream: UInt32(2 * i + 1), type: .data, flags: [.remoteClosed, .noData], body: [])
            }
            try spin(reactor, "100 sums") { sums.count == 100 }
            #expect(sums.allSatisfy { $0.value == UInt8($0.key % 50 + 1) })
        }
    }

    /// Hostile bytes on one connection get errors or a closed connection; another
    /// connection to the same server is served throughout.
    @Test(arguments: BackendKind.allCases)
    func badInputIsAnsweredAndOthersKeepWorking(kind: BackendKind) throws {
        try withPair(kind) { reactor, server, good in
            let raw = try Socket.pair()
            server.serve(raw.first)
            let evil = raw.second.rawValue

            func frames() throws -> [TTRPC.Frame] {
                var d = TTRPCFrameDecoder()
                var out: [TTRPC.Frame] = []
                var quiet = 0
                while quiet < 3 {
                    try reactor.runOnce(block: false)
                    if let bytes = try drain(evil), !bytes.isEmpty { d.append(bytes); quiet = 0 } else { quiet += 1; usleep(2000) }
                }
                while case .frame(let f)? = d.next() { out.append(f) }
                return out
            }
            func status(_ f: TTRPC.Frame) -> RPCError? {
                guard let r = try? Ttrpc_Response(serializedBytes: f.payload), r.hasStatus, r.status.code != 0 else { return nil }
                return RPCError(RPCCode(rawValue: r.status.code) ?? .unknown, r.status.message)
            }

            // 1. A request whose payload is not a ttrpc.Request.
            _ = writeRaw(evil, TTRPC.encode(TTRPC.Frame(streamID: 1, type: .request, payload: [0xFF, 0xFF, 0xFF])))
            // 2. An even (server-side) stream id.
            var req = Ttrpc_Request()
            req.service = "test.Stream"; req.method = "Count"; req.payload = .init([1])
            _ = writeRaw(evil, TTRPC.encode(TTRPC.Frame(streamID: 2, type: .request, payload: try req.serializedBytes())))
            // 3. A response sent by a client; 4. an unknown message type.
            _ = writeRaw(evil, TTRPC.encode(TTRPC.Frame(streamID: 5, type: .response, payload: [])))
            var unknown = TTRPC.encode(TTRPC.Frame(streamID: 7, type: .data, payload: []))
            unknown[8] = 0x7F
            _ = writeRaw(evil, unknown)
            // 5. An oversized frame header, with a little of its data.
            var huge: [UInt8] = []
            TTRPC.appendHeader(to: &huge, length: 0, streamID: 9, type: .request, flags: [])
            huge[0] = 0x00; huge[1] = 0x50  // 5 MiB declared
            _ = writeRaw(evil, huge + [UInt8](repeating: 0, count: 1000))
            let got = try frames()
            #expect(got.count == 5, "\(got.map(\.streamID))")
            let byStream = Dictionary(got.map { ($0.streamID, status($0)) }, uniquingKeysWith: { a, _ in a })
            #expect(byStream[1]??.code == .invalidArgument)
            #expect(byStream[2]??.message.contains("must be odd") == true)
            #expect(byStream[5]??.code == .invalidArgument)
            #expect(byStream[7]??.message.contains("message type 127") == true)
            #expect(byStream[9]??.code == .resourceExhausted)

            // The good client is served all along.
            var result: Result<[UInt8], RPCError>?
            var got2: [UInt8] = []
            let call = good.start(service: "test.Stream", method: "Count", payload: [3], kind: .serverStream) { result = $0 }
            call.onData = { got2 += $0 }
            try spin(reactor, "good client") { result != nil }
            #expect(got2 == [0, 1, 2])
            raw.second.close()
        }
    }

    /// Random and mutated byte streams through the frame decoder: no crash, no hang,
    /// and never more buffered than one frame's worth. KUASAR_FUZZ_ITERATIONS runs longer.
    @Test func fuzzFrameDecoder() throws {
        let iterations = Int(currentEnvironmentDictionary()["KUASAR_FUZZ_ITERATIONS"] ?? "") ?? 20_000
        var rng = SplitMix(seed: 0x5eed)
        var valid = TTRPC.encode(TTRPC.Frame(streamID: 1, type: .request, payload: Array(repeating: 7, count: 40)))
        valid += TTRPC.encode(TTRPC.Frame(streamID: 3, type: .data, flags: .remoteClosed, payload: []))
        var frames = 0
        for i in 0..<iterations {
            var input: [UInt8]
            if i % 2 == 0 {
                input = (0..<Int(rng.next() % 64)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                input = valid
                for _ in 0..<(1 + Int(rng.next() % 4)) {
                    input[Int(rng.next() % UInt64(input.count))] = UInt8(truncatingIfNeeded: rng.next())
                }
            }
            var d = TTRPCFrameDecoder()
            // Feed in random-sized pieces.
            var off = 0
            while off < input.count {
                let n = min(input.count - off, 1 + Int(rng.next() % 16))
                d.append(Array(input[off..<(off + n)]))
                off += n
                var guardCount = 0
                while let item = d.next() {
                    if case .frame(let f) = item { #expect(f.payload.count <= TTRPC.maxDataLength); frames += 1 }
                    guardCount += 1
                    #expect(guardCount < 100)
                }
                #expect(d.bufferedCount <= TTRPC.headerLength + TTRPC.maxDataLength)
            }
        }
        #expect(frames > 0)
    }

    /// The server's side of the same: garbage from many connections, one after another,
    /// never takes the server down.
    @Test(arguments: BackendKind.allCases)
    func fuzzServer(kind: BackendKind) throws {
        try withPair(kind) { reactor, server, good in
            var rng = SplitMix(seed: 42)
            for _ in 0..<200 {
                let raw = try Socket.pair()
                server.serve(raw.first)
                var bytes = (0..<Int(rng.next() % 200)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                if rng.next() % 2 == 0 {
                    // A plausible header in front of garbage reaches the protobuf decoder.
                    var h: [UInt8] = []
                    TTRPC.appendHeader(to: &h, length: bytes.count, streamID: UInt32(rng.next() % 8), type: .request, flags: [])
                    bytes = h + bytes
                }
                _ = writeRaw(raw.second.rawValue, bytes)
                try reactor.runOnce(block: false)
                raw.second.close()
                try reactor.runOnce(block: false)
            }
            var result: Result<[UInt8], RPCError>?
            good.start(service: "test.Stream", method: "Count", payload: [1], kind: .serverStream) { result = $0 }
            try spin(reactor, "good client after the fuzz") { result != nil }
            #expect((try? result?.get()) == [])
            try spin(reactor, "fuzzed connections released") { server.connectionCount == 1 }
        }
    }
}
}

/// A small deterministic generator, so a failing fuzz case can be replayed.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
