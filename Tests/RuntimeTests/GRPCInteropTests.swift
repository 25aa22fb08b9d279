import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// Debian's python3 (not a pyenv one earlier on PATH) has python3-grpcio and python3-h2.
let systemPython = "/usr/bin/python3"

/// The service the Python peers talk to.
final class EchoService {
    var cancellations: [RPCError] = []
    func register(on server: GRPCServer) {
        server.register(service: "test.Echo", method: "Echo") { [unowned self] call in
            if call.requestMessage == Array("hang".utf8) {
                call.onCancel = { [unowned self] in self.cancellations.append($0) }
                return  // never answered: the deadline ends it
            }
            var reply = call.requestMessage
            if let ns = call.metadata("containerd-namespace").first { reply += Array("|ns=\(ns)".utf8) }
            call.respond(reply)
        }
        server.register(service: "test.Echo", method: "Count") { call in
            let n = Int(String(decoding: call.requestMessage, as: UTF8.self)) ?? 0
            for i in 0..<n { call.send(Array("n\(i)".utf8)) }
            call.finish()
        }
        server.register(service: "test.Echo", method: "Fail") { _ in
            throw RPCError(.notFound, "container “x” not found")
        }
    }
}

extension AllTests {
@Suite struct GRPCInteropTests {
    func pythonClient(_ scenario: String, kind: BackendKind = .uring, check: (String, EchoService) throws -> Void) throws {
        let socket = "/tmp/kuasar-test-\(getpid())-grpc.sock"
        try withReactor(kind) { reactor in
            let server = GRPCServer(reactor: reactor)
            let echo = EchoService()
            echo.register(on: server)
            try server.listen(path: socket)
            let supervisor = ProcessSupervisor(reactor: reactor)
            let client = try runPeer(reactor, supervisor, pythonPeer("grpc_client.py", socket, scenario), timeoutMS: 60_000)
            try settle(reactor, ms: 30)
            #expect(client.exit == .exited(0), "python: \(client.text)")
            try check(client.text, echo)
            client.close()
            server.close()
            unlink(socket)
        }
    }

    @Test(arguments: BackendKind.allCases)
    func unaryWithMetadata(kind: BackendKind) throws {
        try pythonClient("unary", kind: kind) { out, _ in #expect(out == "ok hello|ns=k8s.io") }
    }

    @Test func serverStreaming() throws {
        try pythonClient("stream") { out, _ in #expect(out == "ok n0,n1,n2,n3,n4") }
    }

    @Test func deadlineExceeded() throws {
        try pythonClient("deadline") { out, echo in
            #expect(out == "DEADLINE_EXCEEDED")
            #expect(echo.cancellations.count == 1)  // our grpc-timeout fired or the client reset it
        }
    }

    @Test func unknownMethodIsUnimplemented() throws {
        try pythonClient("unimplemented") { out, _ in
            #expect(out == "UNIMPLEMENTED method /test.Echo/Nope is not implemented by this server")
        }
    }

    @Test func errorStatusAndUnicodeMessage() throws {
        try pythonClient("error") { out, _ in #expect(out == "NOT_FOUND container “x” not found") }
    }

    @Test(arguments: BackendKind.allCases)
    func tenMiBMessageBothWays(kind: BackendKind) throws {
        try pythonClient("big", kind: kind) { out, _ in #expect(out == "ok 10485760 True") }
    }

    @Test(arguments: BackendKind.allCases)
    func twoHundredConcurrentCallsOnOneChannel(kind: BackendKind) throws {
        try pythonClient("concurrent", kind: kind) { out, _ in #expect(out == "ok 200") }
    }

    @Test func oversizedMessageIsRefusedAndTheChannelLives() throws {
        try pythonClient("toolarge") { out, _ in #expect(out == "RESOURCE_EXHAUSTED still here") }
    }
}
}
