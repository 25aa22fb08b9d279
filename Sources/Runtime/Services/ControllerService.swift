#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarHostWire
import KuasarGRPC
import KuasarContainer
import KuasarSandbox
import KuasarSandboxKinds
import KuasarTasks

/// containerd 2.x's sandboxer endpoint: `containerd.services.sandbox.v1.Controller` over
/// gRPC on the daemon's socket. Dispatches each sandbox to the backend of its kind (the
/// request's `sandboxer` name → kind, from the config) and keeps what every kind shares:
/// ids and state files, Wait and its waiters, Status, Shutdown's bookkeeping.
public final class ControllerService {
    public static let service = "containerd.services.sandbox.v1.Controller"
    /// Sandboxer names (containerd's proxy plugin names) → kind, from the config; an
    /// empty name (an older client) means the namespace kind.
    public var sandboxers: [String: String] = KuasarConfig().sandboxers
    /// containerd's ttrpc socket ([containerd] address): where task events of the
    /// sandboxes made here are published.
    public var eventsAddress = KuasarConfig().containerdAddress
    let registry: SandboxRegistry
    let tasks: TaskService
    let reactor: Reactor
    let logger: Logger
    /// kind → its backend: the kinds this daemon was built with.
    let backends: [String: SandboxBackend]
    /// Sandboxes shut down here (bounded, persisted): a repeated Shutdown answers OK.
    let shutdowns: ShutdownLog

    public init(registry: SandboxRegistry, tasks: TaskService, reactor: Reactor, logger: Logger, backends: [SandboxBackend]) {
        self.registry = registry
        self.tasks = tasks
        self.reactor = reactor
        self.logger = logger
        self.backends = Dictionary(backends.map { ($0.kind, $0) }, uniquingKeysWith: { first, _ in first })
        shutdowns = ShutdownLog(root: registry.root)
        for b in backends {
            b.onSandboxExit = { [weak self] s, status in self?.markStopped(s, status: status) }
        }
        registry.backendState = { [weak self] s in self?.backends[s.kind]?.persistentState(s) ?? [:] }
    }

    public func register(on server: GRPCServer) {
        func unary<Req: SwiftProtobuf.Message>(_ m: String, _ body: @escaping (GRPCServerCall, Req) throws -> Void) {
            server.registerUnary(service: Self.service, method: m, body)
        }
        unary("Create") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerCreateRequest) in try self.create(call, r) }
        unary("Start") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerStartRequest) in try self.start(call, r) }
        unary("Platform") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerPlatformRequest) in
            _ = try self.sandbox(r.sandboxID, r.sandboxer)
            var resp = Containerd_Services_Sandbox_V1_ControllerPlatformResponse()
            resp.platform = Self.hostPlatform()
            call.respond(resp)
        }
        unary("Stop") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerStopRequest) in try self.stop(call, r) }
        unary("Wait") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerWaitRequest) in
            let s = try self.sandbox(r.sandboxID, r.sandboxer)
            let answer = { [weak s] (at: WallTime) in
                var resp = Containerd_Services_Sandbox_V1_ControllerWaitResponse()
                resp.exitStatus = UInt32(bitPattern: s?.exitStatus?.code ?? 0)
                resp.exitedAt = Google_Protobuf_Timestamp(at)
                call.respond(resp)
            }
            if let at = s.exitedAt { answer(at); return }
            let token = s.stopWaiters.add(answer)
            call.onCancel = { [weak s] _ in s?.stopWaiters.remove(token) }
        }
        unary("Status") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerStatusRequest) in
            let s = try self.sandbox(r.sandboxID, r.sandboxer)
            var resp = Containerd_Services_Sandbox_V1_ControllerStatusResponse()
            resp.sandboxID = s.id
            let backend = self.backends[s.kind]
            resp.pid = backend?.pid(s) ?? 0
            resp.state = s.state == .ready ? "SANDBOX_READY" : "SANDBOX_NOTREADY"
            resp.createdAt = Google_Protobuf_Timestamp(s.createdAt)
            if let at = s.exitedAt { resp.exitedAt = Google_Protobuf_Timestamp(at) }
            if s.state != .created { (resp.address, resp.version) = s.taskEndpoint }
            if r.verbose {
                var info: [String: Any] = backend?.statusInfo(s) ?? [:]
                info["kind"] = s.kind
                info["sandboxer"] = s.sandboxer ?? ""
                info["labels"] = s.labels
                info["extensions"] = s.extensions.keys.sorted()
                info["containers"] = s.containerOrder.compactMap { id in
                    s.containers[id].map { ["id": $0.id, "pid": Int($0.initProcess.pid), "status": $0.state.rawValue] }
                }
                let json = (try? JSONSerialization.data(withJSONObject: info, options: [.sortedKeys])) ?? Data()
                resp.info = ["info": String(decoding: json, as: UTF8.self)]
            }
            call.respond(resp)
        }
        unary("Shutdown") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerShutdownRequest) in
            guard let s = self.registry.sandboxes[r.sandboxID] else {
                if self.shutdowns.contains(r.sandboxID) { call.respond(Containerd_Services_Sandbox_V1_ControllerShutdownResponse()); return }
                throw RPCError(.notFound, "sandbox \(r.sandboxID) not found")
            }
            self.backends[s.kind]?.shutdown(s)
            self.markStopped(s, status: nil)
            self.shutdowns.insert(s.id)
            self.tasks.removeSandbox(s)
            call.respond(Containerd_Services_Sandbox_V1_ControllerShutdownResponse())
        }
        unary("Metrics") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerMetricsRequest) in
            let s = try self.sandbox(r.sandboxID, r.sandboxer)
            try self.backend(of: s).metrics(s) { result in
                switch result {
                case .failure(let e): call.fail(e)
                case .success(let data):
                    var resp = Containerd_Services_Sandbox_V1_ControllerMetricsResponse()
                    resp.metrics.timestamp = Google_Protobuf_Timestamp(WallTime.now())
                    resp.metrics.id = s.id
                    resp.metrics.data = data
                    call.respond(resp)
                }
            }
        }
        unary("Update") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerUpdateRequest) in
            let s = try self.sandbox(r.sandboxID, r.sandboxer)
            let fields = Set(r.fields)
            for f in fields where !["labels", "extensions", "spec"].contains(f) {
                throw RPCError(.invalidArgument, "update \(s.id): field \"\(f)\" cannot be updated (labels, extensions, spec)")
            }
            // spec: the sandbox's OCI spec; its linux.resources go to the sandbox's cgroup parent.
            if fields.contains("spec") && !r.sandbox.spec.value.isEmpty {
                let spec: OCISpec
                do { spec = try OCISpec.decode(Array(r.sandbox.spec.value)) } catch {
                    throw RPCError(.invalidArgument, "update \(s.id): spec: \(error)")
                }
                if let res = spec.linux?.resources { try self.backend(of: s).update(s, resources: res) }
            }
            if fields.isEmpty || fields.contains("labels") { s.labels = r.sandbox.labels }
            if fields.isEmpty || fields.contains("extensions") {
                s.extensions = r.sandbox.extensions.mapValues { Sandbox.Extension(typeURL: $0.typeURL, value: Array($0.value)) }
            }
            self.registry.save(s)
            call.respond(Containerd_Services_Sandbox_V1_ControllerUpdateResponse())
        }
    }

    static func hostPlatform() -> Containerd_Types_Platform {
        var u = utsname()
        uname(&u)
        let machine = withUnsafeBytes(of: u.machine) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        var p = Containerd_Types_Platform()
        p.os = "linux"
        switch machine {
        case "x86_64": p.architecture = "amd64"
        case "aarch64": p.architecture = "arm64"; p.variant = "v8"
        case "armv7l": p.architecture = "arm"; p.variant = "v7"
        case "riscv64": p.architecture = "riscv64"
        case "ppc64le": p.architecture = "ppc64le"
        case "s390x": p.architecture = "s390x"
        default: p.architecture = machine
        }
        return p
    }

    func checkSandboxer(_ name: String) throws {
        guard name.isEmpty || sandboxers[name] != nil else {
            throw RPCError(.invalidArgument, "unknown sandboxer \"\(name.prefix(128))\": this daemon serves \(sandboxers.keys.sorted().joined(separator: ", ")) ([sandboxers] in its config)")
        }
    }

    /// The daemon exits with on_exit = "stop": the sandbox's kind releases what it runs.
    public func releaseForExit(_ s: Sandbox) {
        backends[s.kind]?.shutdown(s)
    }

    /// Every kind is told the daemon exits.
    public func daemonExiting() {
        for b in backends.values { b.daemonExiting() }
    }

    /// The backend a new sandbox of sandboxer `name` gets: its kind's, if built and usable here.
    func backend(forSandboxer name: String) throws -> SandboxBackend {
        try checkSandboxer(name)
        let kind = name.isEmpty ? "namespace" : sandboxers[name]!
        guard let b = backends[kind] else {
            let why = KuasarConfig.Kind(rawValue: kind)?.unavailableReason ?? "no backend of that kind"
            throw RPCError(.failedPrecondition, "sandboxer \"\(name)\" is of kind \"\(kind)\", which this daemon does not have: \(why) (kinds here: \(backends.keys.sorted().joined(separator: ", ")))")
        }
        if let why = b.unavailableReason {
            throw RPCError(.failedPrecondition, "sandboxer \"\(name)\": the \(kind) kind is not available on this host: \(why)")
        }
        return b
    }

    /// The backend of an existing sandbox (a recovered one may be of a kind this daemon lacks).
    func backend(of s: Sandbox) throws -> SandboxBackend {
        guard let b = backends[s.kind] else {
            throw RPCError(.failedPrecondition, "sandbox \(s.id) is of kind \"\(s.kind)\", which this daemon does not have (kinds here: \(backends.keys.sorted().joined(separator: ", ")))")
        }
        return b
    }

    func sandbox(_ id: String, _ sandboxer: String) throws -> Sandbox {
        try checkSandboxer(sandboxer)
        guard let s = registry.sandboxes[id] else { throw RPCError(.notFound, "sandbox \(id) not found") }
        return s
    }

    private func create(_ call: GRPCServerCall, _ r: Containerd_Services_Sandbox_V1_ControllerCreateRequest) throws {
        let backend = try backend(forSandboxer: r.sandboxer)
        try Identifier.validate(r.sandboxID, what: "sandbox")
        guard registry.sandboxes[r.sandboxID] == nil else { throw RPCError(.alreadyExists, "sandbox \(r.sandboxID) already exists") }
        var config: Runtime_V1_PodSandboxConfig?
        if r.hasOptions && !r.options.value.isEmpty {
            guard r.options.typeURL.hasSuffix("runtime.v1.PodSandboxConfig") else {
                throw RPCError(.invalidArgument, "options: expected a runtime.v1.PodSandboxConfig, got \"\(r.options.typeURL)\"")
            }
            do { config = try Runtime_V1_PodSandboxConfig(serializedBytes: r.options.value) } catch {
                throw RPCError(.invalidArgument, "options: malformed runtime.v1.PodSandboxConfig: \(error)")
            }
        }
        let namespace = call.metadata("containerd-namespace").first ?? "k8s.io"
        let (s, _) = try registry.register(id: r.sandboxID, namespace: namespace, eventsAddress: eventsAddress, save: false)
        s.kind = backend.kind
        s.sandboxer = r.sandboxer
        s.state = .created
        s.labels = r.sandbox.labels
        let request = SandboxCreateRequest(id: s.id, namespace: namespace, netnsPath: r.netnsPath, podConfig: config, labels: r.sandbox.labels)
        backend.create(s, request) { [weak self, weak s] result in
            guard let self, let s else { return }
            switch result {
            case .failure(let e):
                self.registry.remove(s)
                call.fail(e)
            case .success:
                self.registry.save(s)
                var resp = Containerd_Services_Sandbox_V1_ControllerCreateResponse()
                resp.sandboxID = s.id
                call.respond(resp)
            }
        }
    }

    private func start(_ call: GRPCServerCall, _ r: Containerd_Services_Sandbox_V1_ControllerStartRequest) throws {
        let s = try sandbox(r.sandboxID, r.sandboxer)
        switch s.state {
        case .ready: throw RPCError(.failedPrecondition, "sandbox \(s.id) is already started")
        case .stopped: throw RPCError(.failedPrecondition, "sandbox \(s.id) is stopped")
        case .created: break
        }
        let backend = try backend(of: s)
        backend.start(s) { [weak self, weak s] result in
            guard let self, let s else { return }
            var resp = Containerd_Services_Sandbox_V1_ControllerStartResponse()
            switch result {
            case .failure(let e):
                call.fail(e)
                return
            case .success(.tasks(let tasks)):
                do { try self.tasks.serve(s, backend: tasks) } catch {
                    call.fail(RPCError(.internal, "sandbox \(s.id): the Task API at \(s.taskSocket): \(error)"))
                    return
                }
            case .success(.address(let address, let version)):
                s.taskAddressOverride = address
                s.taskVersionOverride = version
            }
            (resp.address, resp.version) = s.taskEndpoint
            s.state = .ready
            self.registry.save(s)
            resp.sandboxID = s.id
            resp.pid = backend.pid(s)
            resp.createdAt = Google_Protobuf_Timestamp(s.createdAt)
            resp.labels = s.labels
            call.respond(resp)
        }
    }

    private func stop(_ call: GRPCServerCall, _ r: Containerd_Services_Sandbox_V1_ControllerStopRequest) throws {
        let s = try sandbox(r.sandboxID, r.sandboxer)
        try backend(of: s).stop(s, timeoutSecs: r.timeoutSecs) {
            call.respond(Containerd_Services_Sandbox_V1_ControllerStopResponse())
        }
    }

    /// The sandbox ended (Stop, Shutdown, or on its own): stopped, with how it ended when
    /// its kind knows, saved, and every waiter answered.
    func markStopped(_ s: Sandbox, status: ExitStatus?) {
        guard registry.sandboxes[s.id] === s else { return }
        if s.exitStatus == nil, let status { s.exitStatus = status }
        if s.exitedAt == nil { s.exitedAt = WallTime.now() }
        if s.state != .stopped { s.state = .stopped }
        registry.save(s)
        s.stopWaiters.fire(s.exitedAt!)
    }

    /// The kind and TaskBackend of a shim-path sandbox of sandboxer `name` (the shim
    /// binary's name says which).
    public func shimTasks(forSandboxer name: String) throws -> (kind: String, tasks: TaskBackend) {
        let b = try backend(forSandboxer: name)
        guard let tasks = b.shimTasks else {
            throw RPCError(.failedPrecondition, "sandboxer \"\(name)\" (kind \(b.kind)) has no shim v2 path: use containerd 2.x's sandbox Controller")
        }
        return (b.kind, tasks)
    }

    /// The exit records a recovered sandbox's kind still needs.
    func exitRecordNames(_ s: Sandbox) -> [String] {
        backends[s.kind]?.exitRecordNames(s, state: s.recoveredState) ?? []
    }

    /// After a restart: each recovered sandbox's kind re-attaches to it.
    func recover(_ s: Sandbox, exits: ExitRecords) {
        guard let b = backends[s.kind] else {
            logger.error("sandbox \(s.id): kind \"\(s.kind)\" is not built into this daemon; its state is kept, its calls fail")
            return
        }
        b.recover(s, state: s.recoveredState, exits: exits)
        s.recoveredState = [:]
    }
}
