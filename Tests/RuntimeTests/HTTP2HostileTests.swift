import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct HTTP2HostileTests {
    /// Each hostile connection gets the error code RFC 9113 names, and a well-behaved
    /// grpcio client on the same server is served afterwards.
    @Test(arguments: [
        ("bad_preface", "goaway=1 closed=True"),
        ("no_settings_first", "goaway=1 closed=True"),
        ("oversized_frame", "goaway=6 closed=True"),
        ("header_block_flood", "goaway=11 closed=True"),
        ("hpack_bomb", "goaway=9 closed=True"),
        ("bad_hpack", "goaway=9 closed=True"),
        ("window_overflow", "goaway=3 closed=True"),
        ("stream_reuse", "goaway=5 closed=True"),
        ("even_stream", "goaway=1 closed=True"),
        ("rst_flood", "goaway=11 closed=True"),
        ("settings_flood", "goaway=11 closed=True"),
        ("ping_flood", "goaway=11 closed=True"),
        ("refused_streams", "rst=7:6 closed=False"),
    ])
    func hostileInput(testCase: String, expected: String) throws {
        let socket = "/tmp/kuasar-test-\(getpid())-h2.sock"
        try withReactor(.uring) { reactor in
            let server = GRPCServer(reactor: reactor)
            EchoService().register(on: server)
            try server.listen(path: socket)
            let supervisor = ProcessSupervisor(reactor: reactor)
            let hostile = try runPeer(reactor, supervisor, pythonPeer("h2_hostile.py", socket, testCase))
            #expect(hostile.exit == .exited(0))
            // Some answers carry more than the code we look for (e.g. SETTINGS acks); the
            // line names only GOAWAY and RST_STREAM codes.
            #expect(hostile.text == expected, "\(testCase): \(hostile.text)")

            let good = try runPeer(reactor, supervisor, pythonPeer("grpc_client.py", socket, "unary"))
            #expect(good.text == "ok hello|ns=k8s.io")
            hostile.close()
            good.close()
            server.close()
            try spin(reactor) { server.connectionCount == 0 }
            unlink(socket)
        }
    }
}
}
