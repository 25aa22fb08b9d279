import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
@testable import KuasarSandbox
@testable import KuasarServices
#if canImport(Glibc)
import Glibc
#endif

/// The sandbox-kind seam: the Controller dispatches on the request's sandboxer name, a
/// second kind's sandboxes are saved with their kind and state and recovered beside
/// namespace pods. The second kind is a tiny backend of this test; the Controller is
/// driven over gRPC by a client thread while the loop runs here.
extension AllTests {
@Suite struct BackendSeamTests {
    /// A kind whose sandboxes are only bookkeeping: a state directory marker, an address
    /// someone else serves, a pid it makes up, and a token it saves and wants back.
    final class ToyBackend: SandboxBackend {
        let kind = "toy"
        var unavailableReason: String? { nil }
        var onSandboxExit: ((Sandbox, ExitStatus?) -> Void)?
        var calls: [String] = []
        var recovered: [String: [String: String]] = [:]

        func create(_ s: Sandbox, _ request: SandboxCreateRequest, done: @escaping (Result<Void, RPCError>) -> Void) {
            calls.append("create \(s.id)")
            if request.labels["fail"] != nil { done(.failure(RPCError(.internal, "toy: asked to fail"))); return }
            do { try Files.write(s.stateDir + "/toy", "made", create: true); done(.success(())) } catch { done(.failure(RPCError.from(error))) }
        }
        func start(_ s: Sandbox, done: @escaping (Result<SandboxStarted, RPCError>) -> Void) {
            calls.append("start \(s.id)")
            done(.success(.address("ttrpc+unix:///run/toy/\(s.id).sock", version: 2)))
        }
        func stop(_ s: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void) {
            calls.append("stop \(s.id)")
            onSandboxExit?(s, .exited(7))
            done()
        }
        func shutdown(_ s: Sandbox) { calls.append("shutdown \(s.id)") }
        func update(_ s: Sandbox, resources: OCISpec.Resources) throws { throw RPCError(.unimplemented, "toy: no resources") }
        func metrics(_ s: Sandbox, done: @escaping (Result<Google_Protobuf_Any, RPCError>) -> Void) { done(.failure(RPCError(.unimplemented, "toy: no metrics"))) }
        func pid(_ s: Sandbox) -> UInt32 { 4242 }
        func statusInfo(_ s: Sandbox) -> [String: Any] { ["toy": true] }
        func persistentState(_ s: Sandbox) -> [String: String] { ["token": s.id + "-token"] }
        func recover(_ s: Sandbox, state: [String: String], exits: ExitRecords) { recovered[s.id] = state }
    }

    /// One daemon's worth of services on a root, as the daemon wires them.
    final class Services {
        let registry: SandboxRegistry
        let tasks: TaskService
        let controller: ControllerService
        let grpc: GRPCServer
        let toy = ToyBackend()
        let engine: ContainerEngine

        init(root: String, reactor: Reactor, supervisor: ProcessSupervisor, socket: String) throws {
            engine = try ContainerEngine(reactor: reactor, supervisor: supervisor)
            registry = SandboxRegistry(root: root, engine: engine, logger: .init(label: "seam"))
            tasks = TaskService(registry: registry, reactor: reactor, logger: .init(label: "seam"))
            let ns = NamespaceBackend(registry: registry, tasks: tasks.containers, reactor: reactor, logger: .init(label: "seam"))
            controller = ControllerService(registry: registry, tasks: tasks, reactor: reactor, logger: .init(label: "seam"), backends: [ns, toy])
            controller.sandboxers = ["kuasar": "namespace", "toy": "toy", "kuasar-vm": "vm"]
            controller.eventsAddress = ""
            grpc = GRPCServer(reactor: reactor)
            controller.register(on: grpc)
            unlink(socket)
            try grpc.listen(path: socket)
        }

        func close() {
            grpc.close()
            tasks.close()
            engine.close()
        }
    }

    /// Runs `body` on a client thread with a gRPC client on `socket`, the loop spinning here.
    static func client(_ reactor: Reactor, socket: String, _ body: @escaping @Sendable (GRPCClient) throws -> Void) throws {
        final class Box: @unchecked Sendable { var error: (any Error)?; var done = false }
        let box = Box()
        Thread {
            do {
                let c = try GRPCClient(path: socket)
                defer { c.close() }
                try body(c)
            } catch { box.error = error }
            box.done = true
        }.start()
        try spin(reactor, timeoutMS: 20_000, "the client thread") { box.done }
        if let e = box.error { throw e }
    }

    static let controller = "containerd.services.sandbox.v1.Controller"
    static let md = [("containerd-namespace", "k8s.io")]

    static func create(_ c: GRPCClient, _ id: String, _ sandboxer: String, labels: [String: String] = [:]) throws {
        var r = Containerd_Services_Sandbox_V1_ControllerCreateRequest()
        r.sandboxID = id
        r.sandboxer = sandboxer
        r.sandbox.labels = labels
        if sandboxer == "kuasar" {
            var config = Runtime_V1_PodSandboxConfig()
            config.hostname = id
            r.options.typeURL = "type.googleapis.com/runtime.v1.PodSandboxConfig"
            r.options.value = try config.serializedData()
        }
        _ = try c.call(controller, "Create", r, as: Containerd_Services_Sandbox_V1_ControllerCreateResponse.self, metadata: md)
    }

    static func start(_ c: GRPCClient, _ id: String, _ sandboxer: String) throws -> Containerd_Services_Sandbox_V1_ControllerStartResponse {
        var r = Containerd_Services_Sandbox_V1_ControllerStartRequest()
        r.sandboxID = id
        r.sandboxer = sandboxer
        return try c.call(controller, "Start", r, as: Containerd_Services_Sandbox_V1_ControllerStartResponse.self, metadata: md)
    }

    static func code(_ body: () throws -> Void) -> (RPCCode?, String) {
        do { try body(); return (nil, "") } catch let e as RPCError { return (e.code, e.message) } catch { return (.unknown, "\(error)") }
    }

    @Test func controllerDispatchesBySandboxerAndRecoversEachKind() throws {
        let root = "/tmp/kuasar-seam-\(getpid())"
        Files.removeTree(root)
        try makeDirectories(root, mode: 0o700)
        defer { Files.removeTree(root) }
        let socket = root + "/ctl.sock"
        try withReactor(.epoll) { reactor in
            let supervisor = ProcessSupervisor(reactor: reactor)
            defer { supervisor.close() }
            var first: Services? = try Services(root: root, reactor: reactor, supervisor: supervisor, socket: socket)
            let toy1 = first!.toy
            try Self.client(reactor, socket: socket) { c in
                try Self.create(c, "pod-ns", "kuasar")
                try Self.create(c, "pod-toy", "toy", labels: ["app": "toy"])
                let started = try Self.start(c, "pod-toy", "toy")
                #expect(started.address == "ttrpc+unix:///run/toy/pod-toy.sock" && started.version == 2 && started.pid == 4242, "\(started)")
                let ns = try Self.start(c, "pod-ns", "kuasar")
                #expect(ns.address.hasSuffix("/pod-ns/task.sock") && ns.version == 3 && ns.pid > 0, "\(ns)")

                // Unknown name: InvalidArgument naming the configured ones.
                let (unknown, why) = Self.code { try Self.create(c, "pod-x", "nope") }
                #expect(unknown == .invalidArgument && why.contains("kuasar, kuasar-vm, toy"), "\(why)")
                // A kind this daemon was built without: FailedPrecondition with the reason.
                let (missing, reason) = Self.code { try Self.create(c, "pod-vm", "kuasar-vm") }
                #expect(missing == .failedPrecondition && reason.contains("\"vm\"") && reason.contains("does not have"), "\(reason)")
                // A kind's failed Create leaves nothing registered.
                let (failed, _) = Self.code { try Self.create(c, "pod-fails", "toy", labels: ["fail": "1"]) }
                #expect(failed == .internal)

                var st = Containerd_Services_Sandbox_V1_ControllerStatusRequest()
                st.sandboxID = "pod-toy"
                st.sandboxer = "toy"
                st.verbose = true
                let status = try c.call(Self.controller, "Status", st, as: Containerd_Services_Sandbox_V1_ControllerStatusResponse.self, metadata: Self.md)
                let info = status.info["info"] ?? ""
                #expect(status.pid == 4242 && status.address == started.address && info.contains("\"kind\":\"toy\"") && info.contains("\"toy\":true"), "\(status)")
                let (metrics, _) = Self.code {
                    var m = Containerd_Services_Sandbox_V1_ControllerMetricsRequest()
                    m.sandboxID = "pod-toy"
                    _ = try c.call(Self.controller, "Metrics", m, as: Containerd_Services_Sandbox_V1_ControllerMetricsResponse.self, metadata: Self.md)
                }
                #expect(metrics == .unimplemented)
            }
            #expect(toy1.calls == ["create pod-toy", "start pod-toy", "create pod-fails"], "\(toy1.calls)")
            #expect(!Files.exists(root + "/pod-fails") && !Files.exists(root + "/pod-vm") && !Files.exists(root + "/pod-x"))
            let saved = try Files.readString(root + "/pod-toy/state.json")
            #expect(saved.contains("\"version\":2") && saved.contains("\"kind\":\"toy\"") && saved.contains("\"sandboxer\":\"toy\"")
                    && saved.contains("\"token\":\"pod-toy-token\""), "\(saved)")
            let holder = first!.registry.sandboxes["pod-ns"]!.holder!.pid

            // A restart: the state is read back by a new set of services on the same root.
            first!.close()
            first = nil
            let second = try Services(root: root, reactor: reactor, supervisor: supervisor, socket: socket)
            defer { second.close() }
            let exits = ExitRecords(dir: root + "/exits")
            let (sandboxes, _) = second.registry.recover()
            #expect(Set(sandboxes.map(\.id)) == ["pod-ns", "pod-toy"])
            for s in sandboxes { second.controller.recover(s, exits: exits) }
            #expect(second.registry.sandboxes["pod-toy"]?.kind == "toy" && second.registry.sandboxes["pod-ns"]?.kind == "namespace")
            #expect(second.toy.recovered == ["pod-toy": ["token": "pod-toy-token"]], "\(second.toy.recovered)")
            #expect(second.registry.sandboxes["pod-ns"]?.holderPidfd ?? -1 >= 0, "the namespace pod's holder was not watched again")

            try Self.client(reactor, socket: socket) { c in
                var stop = Containerd_Services_Sandbox_V1_ControllerStopRequest()
                stop.sandboxID = "pod-toy"
                stop.sandboxer = "toy"
                _ = try c.call(Self.controller, "Stop", stop, as: Containerd_Services_Sandbox_V1_ControllerStopResponse.self, metadata: Self.md)
                var wait = Containerd_Services_Sandbox_V1_ControllerWaitRequest()
                wait.sandboxID = "pod-toy"
                let w = try c.call(Self.controller, "Wait", wait, as: Containerd_Services_Sandbox_V1_ControllerWaitResponse.self, metadata: Self.md)
                #expect(w.exitStatus == 7, "\(w)")
                for (id, name) in [("pod-toy", "toy"), ("pod-ns", "kuasar")] {
                    var sd = Containerd_Services_Sandbox_V1_ControllerShutdownRequest()
                    sd.sandboxID = id
                    sd.sandboxer = name
                    _ = try c.call(Self.controller, "Shutdown", sd, as: Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self, metadata: Self.md)
                }
            }
            #expect(second.toy.calls == ["stop pod-toy", "shutdown pod-toy"], "\(second.toy.calls)")
            try spin(reactor, "the pod's holder to go") { processGone(holder) }
            try settle(reactor, ms: 20)
            #expect(second.registry.sandboxes.isEmpty && !Files.exists(root + "/pod-ns") && !Files.exists(root + "/pod-toy"))
        }
    }

    /// A state file of the previous format (version 1: no kind, no sandboxer) still loads,
    /// as a namespace sandbox; an unknown future version is left alone, named in the log.
    @Test func versionOneStateFilesStillLoad() throws {
        let root = "/tmp/kuasar-seam-v1-\(getpid())"
        Files.removeTree(root)
        try makeDirectories(root + "/old", mode: 0o700)
        try makeDirectories(root + "/future", mode: 0o700)
        defer { Files.removeTree(root) }
        let v1 = #"{"version":1,"id":"old","namespace":"default","eventsAddress":"","state":"ready","createdAt":{"seconds":1700000000,"nanos":0},"labels":{},"pinned":{},"cgroupRoot":"kuasar","containers":[]}"#
        try Files.write(root + "/old/state.json", v1, create: true)
        try Files.write(root + "/future/state.json", v1.replacingOccurrences(of: "\"version\":1", with: "\"version\":9").replacingOccurrences(of: "\"old\"", with: "\"future\""), create: true)
        try withReactor(.epoll) { reactor in
            let supervisor = ProcessSupervisor(reactor: reactor)
            defer { supervisor.close() }
            let engine = try ContainerEngine(reactor: reactor, supervisor: supervisor)
            defer { engine.close() }
            let registry = SandboxRegistry(root: root, engine: engine, logger: .init(label: "seam"))
            let (found, _) = registry.recover()
            #expect(found.map(\.id) == ["old"])
            #expect(found.first?.kind == "namespace" && found.first?.sandboxer == nil && found.first?.namespace == "default")
            registry.save(found[0])
            #expect(try Files.readString(root + "/old/state.json").contains("\"version\":2,\"id\":\"old\",\"kind\":\"namespace\""))
            registry.sandboxes.removeAll()
        }
    }
}
}
