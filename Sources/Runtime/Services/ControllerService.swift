#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import SwiftProtobuf

/// containerd 2.x's sandboxer endpoint: `containerd.services.sandbox.v1.Controller` over
/// gRPC on the daemon's socket. A sandbox made here is a namespace sandbox: its own
/// pinned network (or containerd's `netns_path`), ipc and uts namespaces, a cgroup parent,
/// and after Start its Task API (v3) at `ttrpc+unix://<root>/<id>/task.sock`.
public final class ControllerService {
    public static let service = "containerd.services.sandbox.v1.Controller"
    /// Sandboxer names (containerd's proxy plugin names) → kind, from the config; an
    /// empty name (an older client) means the namespace kind.
    public var sandboxers = KuasarConfig().sandboxers
    /// containerd's ttrpc socket ([containerd] address): where task events of the
    /// sandboxes made here are published.
    public var eventsAddress = KuasarConfig().containerdAddress
    let registry: SandboxRegistry
    let tasks: TaskService
    let reactor: Reactor
    let logger: Logger
    /// Sandboxes shut down here (bounded, persisted): a repeated Shutdown answers OK.
    let shutdowns: ShutdownLog

    public init(registry: SandboxRegistry, tasks: TaskService, reactor: Reactor, logger: Logger) {
        self.registry = registry
        self.tasks = tasks
        self.reactor = reactor
        self.logger = logger
        shutdowns = ShutdownLog(root: registry.root)
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
            resp.pid = UInt32(s.holder?.pid ?? 0)
            resp.state = s.state == .ready ? "SANDBOX_READY" : "SANDBOX_NOTREADY"
            resp.createdAt = Google_Protobuf_Timestamp(s.createdAt)
            if let at = s.exitedAt { resp.exitedAt = Google_Protobuf_Timestamp(at) }
            if s.state != .created {
                resp.address = "ttrpc+unix://" + s.taskSocket
                resp.version = 3
            }
            if r.verbose {
                let info: [String: Any] = [
                    "kind": "namespace", "stateDir": s.stateDir, "cgroup": s.cgroupParent,
                    "labels": s.labels, "extensions": s.extensions.keys.sorted(),
                    "namespaces": s.pinned, "pid": Int(s.holder?.pid ?? 0),
                    "containers": s.containerOrder.compactMap { id in
                        s.containers[id].map { ["id": $0.id, "pid": Int($0.initProcess.pid), "status": $0.state.rawValue] }
                    },
                ]
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
            for c in s.containers.values { try? c.kill(signal: SIGKILL, all: true) }
            self.markStopped(s)
            self.shutdowns.insert(s.id)
            self.tasks.removeSandbox(s)
            call.respond(Containerd_Services_Sandbox_V1_ControllerShutdownResponse())
        }
        unary("Metrics") { [unowned self] (call: GRPCServerCall, r: Containerd_Services_Sandbox_V1_ControllerMetricsRequest) in
            let s = try self.sandbox(r.sandboxID, r.sandboxer)
            guard let host = self.registry.engine.cgroups else { throw RPCError(.failedPrecondition, "no cgroups on this host") }
            var resp = Containerd_Services_Sandbox_V1_ControllerMetricsResponse()
            resp.metrics.timestamp = Google_Protobuf_Timestamp(WallTime.now())
            resp.metrics.id = s.id
            resp.metrics.data = try CgroupMetrics.any(host.existing(s.cgroupParent))
            call.respond(resp)
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
                if let res = spec.linux?.resources {
                    guard let host = self.registry.engine.cgroups else { throw RPCError(.failedPrecondition, "no cgroups on this host") }
                    do { try host.create(s.cgroupParent).apply(Container.resources(res)) } catch {
                        throw RPCError(.internal, "update \(s.id): resources: \(error)")
                    }
                }
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
            throw RPCError(.invalidArgument, "unknown sandboxer \"\(name)\": this daemon serves \(sandboxers.keys.sorted().joined(separator: ", ")) ([sandboxers] in its config)")
        }
    }

    func sandbox(_ id: String, _ sandboxer: String) throws -> Sandbox {
        try checkSandboxer(sandboxer)
        guard let s = registry.sandboxes[id] else { throw RPCError(.notFound, "sandbox \(id) not found") }
        return s
    }

    private func create(_ call: GRPCServerCall, _ r: Containerd_Services_Sandbox_V1_ControllerCreateRequest) throws {
        try checkSandboxer(r.sandboxer)
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
        if !r.netnsPath.isEmpty && !Files.exists(r.netnsPath) {
            throw RPCError(.invalidArgument, "netns_path \(r.netnsPath) does not exist")
        }
        let settings = try PodSettings(config, netnsPath: r.netnsPath)
        let namespace = call.metadata("containerd-namespace").first ?? "k8s.io"
        let (s, _) = try registry.register(id: r.sandboxID, namespace: namespace, eventsAddress: eventsAddress, save: false)
        do {
            try PodSandbox.prepare(s, settings: settings, netnsPath: r.netnsPath, supervisor: registry.engine.supervisor) { [weak self, weak s] status in
                guard let self, let s else { return }
                self.holderExited(s, status)
            }
        } catch {
            registry.remove(s)
            throw RPCError(.internal, "sandbox \(r.sandboxID): the pod's namespaces: \(error)")
        }
        s.state = .created
        s.labels = r.sandbox.labels
        registry.save(s)
        var resp = Containerd_Services_Sandbox_V1_ControllerCreateResponse()
        resp.sandboxID = s.id
        call.respond(resp)
    }

    private func start(_ call: GRPCServerCall, _ r: Containerd_Services_Sandbox_V1_ControllerStartRequest) throws {
        let s = try sandbox(r.sandboxID, r.sandboxer)
        switch s.state {
        case .ready: throw RPCError(.failedPrecondition, "sandbox \(s.id) is already started")
        case .stopped: throw RPCError(.failedPrecondition, "sandbox \(s.id) is stopped")
        case .created: break
        }
        try tasks.serve(s)
        s.state = .ready
        registry.save(s)
        var resp = Containerd_Services_Sandbox_V1_ControllerStartResponse()
        resp.sandboxID = s.id
        resp.pid = UInt32(s.holder?.pid ?? 0)
        resp.createdAt = Google_Protobuf_Timestamp(s.createdAt)
        resp.labels = s.labels
        resp.address = "ttrpc+unix://" + s.taskSocket
        resp.version = 3
        call.respond(resp)
        // The sandbox's cgroup parent, made while containerd dials the Task API (its
        // first Task.Create then only makes the container's own directories).
        if let host = registry.engine.cgroups {
            reactor.schedule(afterNS: 0) { [weak s, logger] in
                guard let s, s.state == .ready else { return }
                do { _ = try host.create(s.cgroupParent) } catch { logger.debug("sandbox \(s.id): cgroup parent: \(error)") }
            }
        }
    }

    private func stop(_ call: GRPCServerCall, _ r: Containerd_Services_Sandbox_V1_ControllerStopRequest) throws {
        let s = try sandbox(r.sandboxID, r.sandboxer)
        let running = s.containers.values.filter { $0.state == .running || $0.state == .paused || $0.state == .created }
        guard !running.isEmpty else {
            stopHolder(s) {
                call.respond(Containerd_Services_Sandbox_V1_ControllerStopResponse())
            }
            return
        }
        for c in running {
            if c.state == .paused { try? c.resume() }
            try? c.kill(signal: r.timeoutSecs == 0 ? SIGKILL : SIGTERM, all: false)
        }
        var remaining = running.count
        var timer: TimerID?
        for c in running {
            c.initProcess.wait { [weak self] _, _ in
                remaining -= 1
                guard remaining == 0, let self else { return }
                if let timer { self.reactor.cancel(timer) }
                self.stopHolder(s) {
                    call.respond(Containerd_Services_Sandbox_V1_ControllerStopResponse())
                }
            }
        }
        if r.timeoutSecs > 0 {
            timer = reactor.schedule(afterNS: UInt64(r.timeoutSecs) * 1_000_000_000) {
                for c in running where c.state != .stopped { try? c.kill(signal: SIGKILL, all: true) }
            }
        }
    }

    /// Ends the pod's holder (SIGKILL: as a namespace init it ignores anything else) and
    /// marks the sandbox stopped once it is gone, with its exit status.
    private func stopHolder(_ s: Sandbox, then done: @escaping () -> Void) {
        guard s.holderPidfd >= 0 else {
            markStopped(s)
            done()
            return
        }
        // Answered by markStopped, once holderExited has run.
        _ = s.stopWaiters.add { _ in done() }
        s.holderStopping = true
        do { try sendSignal(pidfd: s.holderPidfd, SIGKILL) } catch {
            logger.error("sandbox \(s.id): kill holder \(s.holder?.pid ?? 0): \(error)")
        }
    }

    /// The pod's holder ended: by Stop, or on its own (killed from outside). Without it
    /// the pod's namespaces are gone, so the pod is over: its containers are killed and
    /// the sandbox reports stopped with the holder's status.
    func holderExited(_ s: Sandbox, _ status: ExitStatus?) {
        guard registry.sandboxes[s.id] === s else { return }
        if s.exitStatus == nil { s.exitStatus = status ?? .exited(255) }
        if !s.holderStopping && s.state != .stopped {
            logger.warning("sandbox \(s.id): its holder \(s.holder?.pid ?? 0) ended (\(status.map { "\($0)" } ?? "status unknown")); the pod is stopped")
        }
        for c in s.containers.values where c.state == .running || c.state == .paused || c.state == .created {
            try? c.kill(signal: SIGKILL, all: true)
        }
        markStopped(s)
    }

    /// Re-watches a recovered pod's holder; one that ended while no daemon ran stops the
    /// pod now, with the status the keeper recorded.
    func resumeHolder(_ s: Sandbox, exits: ExitRecords) {
        guard let h = s.holder, s.state != .stopped else { return }
        let fd = registry.engine.supervisor.watchForeign(pid: h.pid, startTime: h.startTime, exits: exits) { [weak self, weak s] status in
            guard let self, let s else { return }
            s.holderPidfd = -1
            self.holderExited(s, status)
        }
        if let fd {
            s.holderPidfd = fd
        } else {
            holderExited(s, exits.take(pid: h.pid, startTime: h.startTime))
        }
    }

    private func markStopped(_ s: Sandbox) {
        if s.exitedAt == nil { s.exitedAt = WallTime.now() }
        if s.state != .stopped { s.state = .stopped }
        registry.save(s)
        s.stopWaiters.fire(s.exitedAt!)
    }
}
