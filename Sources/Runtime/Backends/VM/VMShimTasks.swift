#if canImport(Glibc)
import Glibc
#endif
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarHostWire
import KuasarContainer
import KuasarSandbox
import KuasarSandboxKinds

/// The `vm` kind on containerd 1.6/1.7's shim path (runtime `io.containerd.kuasar-vm.v2`).
/// No Controller makes the pod there: the sandbox is registered by the shim binary and its
/// first Task.Create (the CRI's pause container, or `ctr run`'s only container) boots the
/// VM, sized from that container's `linux.resources` and named after its hostname. Creates
/// that arrive while it boots wait for it. The VM goes when the sandbox is removed after
/// its last container (Task.Shutdown). Every call is then the Controller path's `VMTasks`.
final class VMShimTasks: TaskBackendForwarder<VMTasks> {
    unowned let backend: VMBackend
    /// The Creates waiting for a sandbox's VM to boot.
    private var booting: [String: [(Result<Void, RPCError>) -> Void]] = [:]

    init(backend: VMBackend) {
        self.backend = backend
        super.init(inner: backend.tasks)
    }

    override func create(_ r: Containerd_Task_V2_CreateTaskRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_CreateTaskResponse>) throws {
        try Identifier.validate(r.id, what: "container")
        guard r.bundle.hasPrefix("/") else { throw RPCError(.invalidArgument, "bundle \"\(r.bundle)\" must be an absolute path") }
        if backend.pods[s.id] == nil && booting[s.id] == nil {
            // The first container's spec sizes and names the VM; a bad spec fails here,
            // before a VM is booted for it.
            let spec = try OCISpec.decode(try Files.read(r.bundle + "/config.json"))
            // The CRI's pause container names the CNI netns (containers after it join
            // it through /proc/<pid>/ns paths, which mean the guest's own).
            let netns = spec.linux?.namespaces?.first { $0.type == "network" }?.path ?? ""
            boot(s, Self.podConfig(spec), netns: netns.hasPrefix("/proc/") ? "" : netns)
        }
        whenBooted(s) { [weak self] result in
            guard let self else { return }
            switch result {
            case .failure(let e):
                reply(.failure(e))
            case .success:
                do { try self.inner.create(r, in: s, reply: reply) } catch { reply(.failure(RPCError.from(error))) }
            }
        }
    }

    /// What a Controller.Create would have carried, from the first container's spec: its
    /// hostname, and its memory limit and CPU quota on top of the configured VM size.
    static func podConfig(_ spec: OCISpec) -> Runtime_V1_PodSandboxConfig {
        var config = Runtime_V1_PodSandboxConfig()
        if let h = spec.hostname, !h.isEmpty { config.hostname = h }
        if let r = spec.linux?.resources {
            var res = Runtime_V1_LinuxContainerResources()
            if let limit = r.memory?.limit, limit > 0 { res.memoryLimitInBytes = limit }
            if let q = r.cpu?.quota, q > 0, let p = r.cpu?.period, p > 0, p <= UInt64(Int64.max) {
                res.cpuQuota = q
                res.cpuPeriod = Int64(p)
            }
            config.linux.resources = res
        }
        return config
    }

    private func boot(_ s: Sandbox, _ config: Runtime_V1_PodSandboxConfig, netns: String) {
        booting[s.id] = []
        let finish = { [weak self] (result: Result<Void, RPCError>) in
            guard let self else { return }
            let waiters = self.booting.removeValue(forKey: s.id) ?? []
            if case .failure = result { self.backend.shutdown(s) }
            for w in waiters { w(result) }
        }
        backend.create(s, SandboxCreateRequest(id: s.id, namespace: s.namespace, netnsPath: netns, podConfig: config)) { [weak self] r in
            guard let self else { return }
            if case .failure(let e) = r { finish(.failure(e)); return }
            self.backend.start(s) { [weak self] r in
                guard let self else { return }
                switch r {
                case .failure(let e):
                    finish(.failure(RPCError(e.code, "the VM of sandbox \(s.id) did not start: \(e.message)")))
                case .success:
                    s.taskBackend = self
                    self.backend.registry.save(s)
                    finish(.success(()))
                }
            }
        }
    }

    private func whenBooted(_ s: Sandbox, _ body: @escaping (Result<Void, RPCError>) -> Void) {
        if booting[s.id] != nil { booting[s.id]!.append(body); return }
        guard let pod = backend.pods[s.id], let vm = pod.vm, !vm.hasExited else {
            body(.failure(RPCError(.failedPrecondition, "sandbox \(s.id): its VM has exited; delete its containers and run them again")))
            return
        }
        body(.success(()))
    }

    /// A sandbox whose VM still boots is not empty: its first container is on its way.
    override func isEmpty(_ s: Sandbox) -> Bool { booting[s.id] == nil && inner.isEmpty(s) }
    /// The sandbox goes (its last container was deleted, or ForceDelete): so does its VM.
    override func release(_ s: Sandbox) { backend.shutdown(s) }
}
