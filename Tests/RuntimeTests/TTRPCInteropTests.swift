import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// A Task service with just enough behaviour to observe the wire: State answers
/// from the request and metadata, Wait never answers (deadlines, disconnects).
final class ProbeTaskService {
    static let service = "containerd.task.v2.Task"
    var heldWaits: [TTRPCServerCall] = []
    var cancellations: [RPCError] = []

    func register(on server: TTRPCServer) {
        server.registerUnary(service: Self.service, method: "State") { (call, req: Containerd_Task_V2_StateRequest) in
            if req.id == "missing" { throw RPCError(.notFound, "container \"missing\" not found") }
            var r = Containerd_Task_V2_StateResponse()
            r.id = req.id
            r.execID = req.execID
            r.bundle = "/run/kuasar/" + (call.metadata("containerd-namespace-ttrpc").first ?? "-")
            r.pid = req.id.hasPrefix("c") ? 1000 + (UInt32(req.id.dropFirst()) ?? 0) : 42
            r.status = .running
            r.exitStatus = 3
            r.exitedAt = Google_Protobuf_Timestamp(seconds: 1_700_000_000)
            r.stdout = "/run/fifo/stdout"
            r.terminal = true
            call.respond(r)
        }
        server.registerUnary(service: Self.service, method: "Wait") { [unowned self] (call, _: Containerd_Task_V2_WaitRequest) in
            self.heldWaits.append(call)
            // Weak: a held call can be cancelled when its connection closes after the probe is gone.
            call.onCancel = { [weak self] in self?.cancellations.append($0) }
        }
    }
}

extension AllTests {
@Suite struct TTRPCInteropTests {
    /// Runs the Go ttrpc client against our server for one scenario.
    func goClient(_ scenario: String, kind: BackendKind = .uring, timeoutMS: UInt64 = 20_000,
                  check: (String, ProbeTaskService) throws -> Void) throws {
        let peer = try goPeer("ttrpc-peer")
        let socket = "/tmp/kuasar-test-\(getpid())-ttrpc.sock"
        try withReactor(kind) { reactor in
            let server = TTRPCServer(reactor: reactor)
            let probe = ProbeTaskService()
            probe.register(on: server)
            try server.listen(path: socket)
            let supervisor = ProcessSupervisor(reactor: reactor)
            let client = try runPeer(reactor, supervisor, [peer, "client", socket, scenario], timeoutMS: timeoutMS)
            // Let the server notice the client's departure.
            try settle(reactor, ms: 30)
            #expect(client.exit == .exited(0), "go client: \(client.text)")
            try check(client.text, probe)
            client.close()
            server.close()
            unlink(socket)
        }
    }

    @Test(arguments: BackendKind.allCases)
    func goClientDecodesOurStateWithContainerdTypes(kind: BackendKind) throws {
        try goClient("state", kind: kind) { out, _ in
            #expect(out == "ok id=c1 exec=e1 bundle=/run/kuasar/k8s.io pid=1001 status=RUNNING exit=3 exited=1700000000 stdout=/run/fifo/stdout terminal=true")
        }
    }

    @Test func deadlineFromTimeoutNanoEndsTheCall() throws {
        try goClient("deadline") { out, probe in
            #expect(out.hasPrefix("code=DeadlineExceeded"), "\(out)")
            let elapsed = Int(out.split(separator: "=").last ?? "") ?? 0
            #expect(elapsed >= 190 && elapsed < 2000, "answered after \(elapsed) ms")
            // Our server saw timeout_nano and cancelled the held Wait itself.
            #expect(probe.cancellations.first?.code == .deadlineExceeded)
        }
    }

    @Test func unknownMethodIsUnimplemented() throws {
        try goClient("unimplemented") { out, _ in
            #expect(out == "code=Unimplemented msg=method /containerd.task.v2.Task/Checkpoint is not implemented by this server")
        }
    }

    @Test func handlerErrorsKeepTheirCode() throws {
        try goClient("notfound") { out, _ in
            #expect(out == "code=NotFound msg=container \"missing\" not found")
        }
    }

    @Test func payloadsNearFourMiB() throws {
        try goClient("large") { out, _ in
            #expect(out == "ok id_len=\(4 * 1024 * 1024 - 4096) bundle_len=18")
        }
    }

    @Test func oversizedRequestIsRefusedAndTheConnectionLives() throws {
        try goClient("oversized") { out, _ in
            // The Go client itself refuses to send over 4 MiB; either way the next call works.
            #expect(out.hasPrefix("code=ResourceExhausted"), "\(out)")
            #expect(out.hasSuffix("after=after"), "\(out)")
        }
    }

    @Test(arguments: BackendKind.allCases)
    func hundredConcurrentCalls(kind: BackendKind) throws {
        try goClient("concurrent", kind: kind) { out, _ in
            #expect(out == "ok good=100")
        }
    }

    @Test func clientVanishingMidCallCancelsIt() throws {
        try goClient("disconnect") { out, probe in
            #expect(out == "gone")
            #expect(probe.heldWaits.count == 1)
            #expect(probe.cancellations == [RPCError(.cancelled, "client disconnected")])
        }
    }

    /// Our client against the Go ttrpc server.
    @Test(arguments: BackendKind.allCases)
    func ourClientAgainstGoServer(kind: BackendKind) throws {
        let peer = try goPeer("ttrpc-peer")
        let socket = "/tmp/kuasar-test-\(getpid())-goserver.sock"
        try withReactor(kind) { reactor in
            let supervisor = ProcessSupervisor(reactor: reactor)
            let server = try PeerProcess(reactor: reactor, supervisor: supervisor, [peer, "server", socket])
            try spin(reactor, "Go server ready") { server.text.contains("ready") || server.exit != nil }
            let client = try TTRPCClient.connect(reactor: reactor, path: socket)
            let ns = [("containerd-namespace-ttrpc", "default")]

            var state: Result<Containerd_Task_V2_StateResponse, RPCError>?
            var req = Containerd_Task_V2_StateRequest()
            req.id = "c9"
            client.unary(service: ProbeTaskService.service, method: "State", req, as: Containerd_Task_V2_StateResponse.self, metadata: ns) { state = $0 }
            try spin(reactor, "State") { state != nil }
            let s = try #require(try? state?.get())
            #expect(s.id == "c9" && s.bundle == "/run/bundle/default" && s.pid == 42 && s.exitStatus == 3)
            #expect(s.exitedAt.seconds == 1_700_000_000)

            var missing: Result<Containerd_Task_V2_StateResponse, RPCError>?
            req.id = "missing"
            client.unary(service: ProbeTaskService.service, method: "State", req, as: Containerd_Task_V2_StateResponse.self) { missing = $0 }
            try spin(reactor, "State missing") { missing != nil }
            #expect(throws: RPCError(.notFound, "container \"missing\" not found")) { try missing!.get() }

            // Our deadline fires while the Go server sleeps; its late answer is dropped.
            var slow: Result<Containerd_Task_V2_WaitResponse, RPCError>?
            var waitReq = Containerd_Task_V2_WaitRequest()
            waitReq.id = "300ms"
            client.unary(service: ProbeTaskService.service, method: "Wait", waitReq, as: Containerd_Task_V2_WaitResponse.self,
                         timeoutNS: 50_000_000) { slow = $0 }
            try spin(reactor, "Wait deadline") { slow != nil }
            #expect((try? slow?.get()) == nil)
            if case .failure(let e)? = slow { #expect(e.code == .deadlineExceeded) }

            // 100 concurrent calls on the one connection, each answered to its own caller.
            var answers: [String: String] = [:]
            for i in 0..<100 {
                var r = Containerd_Task_V2_StateRequest()
                r.id = "k\(i)"
                client.unary(service: ProbeTaskService.service, method: "State", r, as: Containerd_Task_V2_StateResponse.self) {
                    answers["k\(i)"] = (try? $0.get())?.id ?? "error"
                }
            }
            try spin(reactor, "100 answers") { answers.count == 100 }
            #expect(answers.allSatisfy { $0.key == $0.value })

            // A payload near 4 MiB each way.
            var big: Result<Containerd_Task_V2_StateResponse, RPCError>?
            req.id = String(repeating: "z", count: 4 * 1024 * 1024 - 8192)
            client.unary(service: ProbeTaskService.service, method: "State", req, as: Containerd_Task_V2_StateResponse.self) { big = $0 }
            try spin(reactor, "large State") { big != nil }
            #expect((try? big?.get())?.id.count == 4 * 1024 * 1024 - 8192)

            // The server dies mid-call: the caller hears Unavailable, not silence.
            var orphan: Result<Containerd_Task_V2_WaitResponse, RPCError>?
            waitReq.id = "10s"
            client.unary(service: ProbeTaskService.service, method: "Wait", waitReq, as: Containerd_Task_V2_WaitResponse.self) { orphan = $0 }
            try supervisor.signal(server.pid, SIGKILL)
            try spin(reactor, "Unavailable after the server died") { orphan != nil && server.done }
            if case .failure(let e)? = orphan { #expect(e.code == .unavailable) } else { Issue.record("expected a failure, got \(String(describing: orphan))") }
            #expect(client.isClosed)
            server.close()
            unlink(socket)
        }
    }
}
}
