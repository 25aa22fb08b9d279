import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct HTTP2FuzzTests {
    /// Random and mutated frame streams through the frame decoder: no crash, no hang,
    /// bounded buffering. KUASAR_FUZZ_ITERATIONS runs longer.
    @Test func fuzzFrameDecoder() throws {
        let iterations = Int(currentEnvironmentDictionary()["KUASAR_FUZZ_ITERATIONS"] ?? "") ?? 20_000
        var rng = SplitMix(seed: 0xF00D)
        var valid = HTTP2.preface
        HTTP2.appendFrame(to: &valid, type: .settings, streamID: 0)
        HTTP2.appendFrame(to: &valid, type: .headers, flags: [.endHeaders], streamID: 1, payload: [0x83, 0x86, 0x84])
        HTTP2.appendFrame(to: &valid, type: .data, flags: [.endStream], streamID: 1, payload: [0, 0, 0, 0, 1, 42])
        var frames = 0, errors = 0
        for i in 0..<iterations {
            var input = valid
            if i % 3 == 0 {
                input = HTTP2.preface + (0..<Int(rng.next() % 80)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                for _ in 0..<(1 + Int(rng.next() % 4)) {
                    let at = HTTP2.preface.count + Int(rng.next() % UInt64(input.count - HTTP2.preface.count))
                    input[at] = UInt8(truncatingIfNeeded: rng.next())
                }
            }
            var d = HTTP2FrameDecoder()
            var off = 0
            outer: while off < input.count {
                let n = min(input.count - off, 1 + Int(rng.next() % 16))
                d.append(Array(input[off..<(off + n)]))
                off += n
                do {
                    var k = 0
                    while let f = try d.next() {
                        #expect(f.payload.count <= HTTP2.defaultMaxFrameSize)
                        frames += 1
                        k += 1
                        #expect(k < 100)
                    }
                } catch {
                    errors += 1
                    break outer
                }
                #expect(d.bufferedCount <= HTTP2.headerLength + HTTP2.defaultMaxFrameSize + HTTP2.preface.count)
            }
        }
        #expect(frames > 0 && errors > 0)
    }

    /// Garbage after a valid preface and SETTINGS, from many connections: the server
    /// answers or closes each, and keeps serving a real client.
    @Test func fuzzServer() throws {
        let socket = "/tmp/kuasar-test-\(getpid())-h2fuzz.sock"
        try withReactor(.uring) { reactor in
            let server = GRPCServer(reactor: reactor)
            EchoService().register(on: server)
            try server.listen(path: socket)
            var rng = SplitMix(seed: 7)
            for _ in 0..<300 {
                let raw = try Socket.pair()
                server.serve(raw.first)
                var bytes = HTTP2.preface
                HTTP2.appendFrame(to: &bytes, type: .settings, streamID: 0)
                let type = UInt8(rng.next() % 11)
                let body = (0..<Int(rng.next() % 64)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                var f: [UInt8] = []
                HTTP2.appendFrame(to: &f, type: .data, flags: HTTP2.Flags(rawValue: UInt8(truncatingIfNeeded: rng.next())),
                                  streamID: UInt32(rng.next() % 6), payload: body)
                f[3] = type
                bytes += f
                _ = writeRaw(raw.second.rawValue, bytes)
                try reactor.runOnce(block: false)
                raw.second.close()
                try reactor.runOnce(block: false)
            }
            let supervisor = ProcessSupervisor(reactor: reactor)
            let good = try runPeer(reactor, supervisor, pythonPeer("grpc_client.py", socket, "unary"))
            #expect(good.text == "ok hello|ns=k8s.io")
            good.close()
            server.close()
            try spin(reactor) { server.connectionCount == 0 }
            unlink(socket)
        }
    }
}
}
