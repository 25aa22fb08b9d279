#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarHostWire
import KuasarContainer
import KuasarSandbox
import KuasarSandboxKinds

/// The `vm` kind's settings, as `[vm]` gives them.
public struct VMSettings: Sendable {
    public var kernel: String
    public var initrd: String
    public var accelerator: String
    public var memoryMiB: UInt32
    public var vcpus: UInt32
    public var bootTimeoutNS: UInt64
    public var kernelArgs: [String]
    /// Pods of the default size start as clones of a template (`VMTemplates`), built at
    /// daemon start when none matches; nil: every pod cold-boots.
    public var templateDir: String?

    public init(kernel: String, initrd: String, accelerator: String, memoryMiB: UInt32, vcpus: UInt32, bootTimeoutNS: UInt64, kernelArgs: [String]) {
        self.kernel = kernel
        self.initrd = initrd
        self.accelerator = accelerator
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.bootTimeoutNS = bootTimeoutNS
        self.kernelArgs = kernelArgs
    }
}

/// The `vm` kind: a microVM per pod. Controller.Create prepares the state directory and
/// the share (`<state dir>/share`, exported to the guest); Start launches the VMM, waits
/// for the guest agent's first answer, sets the pod up in the guest (hostname, DNS,
/// sysctls, clock) and serves containerd's Task API at `<state dir>/task.sock` on the
/// host, forwarding each call to the agent (`VMTasks`). The VMM's exit ends the pod.
public final class VMBackend: SandboxBackend {
    public let kind: String
    public var onSandboxExit: ((Sandbox, ExitStatus?) -> Void)?
    let hypervisor: Hypervisor
    let settings: VMSettings
    let registry: SandboxRegistry
    let reactor: Reactor
    let logger: Logger
    public let tasks: VMTasks
    var pods: [String: VMPod] = [:]
    /// containerd 1.6/1.7's shim path: the first container's Create boots the VM.
    public private(set) lazy var shimTasks: TaskBackend? = VMShimTasks(backend: self)

    public init(kind: String = "vm", hypervisor: Hypervisor, settings: VMSettings, registry: SandboxRegistry, reactor: Reactor, logger: Logger) {
        self.kind = kind
        self.hypervisor = hypervisor
        self.settings = settings
        self.registry = registry
        self.reactor = reactor
        self.logger = logger
        tasks = VMTasks(registry: registry, reactor: reactor, logger: logger)
        tasks.podOf = { [unowned self] s in self.pods[s.id] }
        if let dir = settings.templateDir {
            templates = VMTemplates(root: dir, hypervisor: hypervisor, settings: settings, reactor: reactor, logger: logger)
        }
        if settings.accelerator == "auto" { startProbe() } else { accelerator = Accelerator.chosen(by: settings.accelerator) }
        if templates != nil {
            // On the loop once it runs: the default size's template, found or built.
            reactor.schedule(afterNS: 0) { [weak self] in self?.whenAccelerator { _ in self?.prepareTemplate() } }
        }
    }

    /// The templates pods clone (nil: `[vm] template = false`).
    public private(set) var templates: VMTemplates?

    /// What a dead daemon's builds left goes; then the default size's template is loaded
    /// (its digests checked) or built. Pods started meanwhile cold-boot.
    private func prepareTemplate() {
        guard let templates, let accelerator, unavailableReason == nil else { return }
        templates.removeLeftovers()
        templates.ensure(memoryMiB: settings.memoryMiB, vcpus: settings.vcpus, accelerator: accelerator.0) { [weak self] r in
            if case .failure(let e) = r { self?.logger.error("\(e.message): VM pods cold-boot") }
        }
    }

    /// The accelerator pods get, and why; nil until the KVM probe has answered.
    public private(set) var accelerator: (Accelerator, why: String)?
    private var acceleratorWaiters: [((Accelerator, why: String)) -> Void] = []

    /// The KVM probe as a child on the loop (~30 ms), started with the daemon: a VM's
    /// Start never waits for it unless it comes within those first milliseconds.
    private func startProbe() {
        let decided = { [weak self] (probe: (ran: Bool, detail: String)) in
            guard let self else { return }
            let chosen = Accelerator.decide(probe)
            self.accelerator = chosen
            if chosen.0 == .tcg { self.logger.warning("vm: accelerator tcg: \(chosen.why)") } else { self.logger.info("vm: accelerator kvm: \(chosen.why)") }
            let waiters = self.acceleratorWaiters
            self.acceleratorWaiters.removeAll()
            for w in waiters { w(chosen) }
        }
        let supervisor = registry.engine.supervisor
        do {
            var deadline: TimerID?
            let pid = try supervisor.adopt(try KVMProbe.start()) { [reactor] status in
                if let deadline { reactor.cancel(deadline) }
                decided(KVMProbe.describe(status))
            }
            deadline = reactor.schedule(afterNS: UInt64(KVMProbe.timeoutMS) * 1_000_000) { try? supervisor.signal(pid, SIGKILL) }
        } catch {
            decided((false, "the probe did not start: \(error)"))
        }
    }

    private func whenAccelerator(_ body: @escaping ((Accelerator, why: String)) -> Void) {
        if let accelerator { body(accelerator) } else { acceleratorWaiters.append(body) }
    }

    public var unavailableReason: String? {
        hypervisor.unavailableReason ?? Self.missingImage(kernel: settings.kernel, initrd: settings.initrd)
    }

    /// Why the guest image cannot be used, nil when both files are readable.
    public static func missingImage(kernel: String, initrd: String) -> String? {
        for (what, path) in [("kernel", kernel), ("initrd", initrd)] where access(path, R_OK) != 0 {
            return "the guest \(what) \(path) is missing (make guest builds and installs the image; [vm] \(what) names another)"
        }
        return nil
    }

    /// The image's on-demand modules (`modules/` beside the initrd), bound read-only into
    /// the share for the agent; without them overlay and block rootfs cannot load theirs.
    private func shareModules(_ s: Sandbox, _ share: String) {
        let initrd = settings.initrd
        let dir = String(initrd[..<(initrd.lastIndex(of: "/") ?? initrd.startIndex)]) + "/modules"
        guard Files.isDirectory(dir) else {
            logger.info("sandbox \(s.id): no on-demand guest modules in \(dir) (make guest installs them): overlay and block rootfs are unavailable in its guest")
            return
        }
        let target = share + "/" + AgentProtocol.modulesDirectory
        do {
            try makeDirectories(target, mode: 0o755)
            try RootfsMounts.mount("bind", source: dir, options: ["rbind", "ro"], at: target)
        } catch {
            logger.warning("sandbox \(s.id): share the guest modules \(dir): \(error); overlay and block rootfs are unavailable in its guest")
        }
    }

    public func create(_ s: Sandbox, _ request: SandboxCreateRequest, done: @escaping (Result<Void, RPCError>) -> Void) {
        do {
            let (memory, vcpus) = try size(request.podConfig)
            let share = s.stateDir + "/share"
            try makeDirectories(share, mode: 0o711)
            var spec = VMSpec(id: s.id, stateDir: s.stateDir, kernel: settings.kernel, initrd: settings.initrd,
                              memoryMiB: memory, vcpus: vcpus, accelerator: .tcg, sharePath: share)
            spec.kernelArgs = settings.kernelArgs
            var setup = try setupRequest(s, request.podConfig)
            var network: PodNetwork?
            if !request.netnsPath.isEmpty {
                let net: PodNetwork
                do { net = try PodNetwork.attach(netnsPath: request.netnsPath) } catch {
                    throw RPCError(RPCCode(errno: error.errno), "sandbox \(s.id): join the VM to the pod's network namespace \(request.netnsPath): \(error)")
                }
                Self.configure(&spec, &setup, net)
                let links = net.links.map { "\($0.name) \($0.mac) \($0.addresses.joined(separator: ","))" }
                logger.info("sandbox \(s.id): network \(request.netnsPath): \(links.isEmpty ? "no interface to join (the guest gets no NIC)" : links.joined(separator: "; "))")
                network = net
            }
            shareModules(s, share)
            let pod = VMPod(spec: spec, setup: setup)
            pod.netns = request.netnsPath
            pod.network = network
            pod.netLinks = network?.links.map(\.ifindex) ?? []
            pods[s.id] = pod
            s.kind = kind
            done(.success(()))
        } catch let e as RPCError {
            done(.failure(e))
        } catch {
            done(.failure(RPCError(.internal, "sandbox \(s.id): prepare the VM's share: \(error)")))
        }
    }

    /// The VM's memory and vCPUs: the configured size, plus what the pod's resources ask
    /// for (a memory limit, a CPU quota) on top of it — the guest's own kernel and agent
    /// need the base.
    func size(_ config: Runtime_V1_PodSandboxConfig?) throws -> (UInt32, UInt32) {
        var memory = settings.memoryMiB, vcpus = settings.vcpus
        guard let r = config?.linux.resources, config?.linux.hasResources == true else { return (memory, vcpus) }
        if r.memoryLimitInBytes > 0 {
            let mib = (UInt64(r.memoryLimitInBytes) + (1 << 20) - 1) >> 20
            guard mib <= 1 << 20 else { throw RPCError(.invalidArgument, "linux.resources.memory_limit_in_bytes \(r.memoryLimitInBytes) is more than 1 TiB") }
            memory += UInt32(mib)
        }
        if r.cpuQuota > 0 && r.cpuPeriod > 0 {
            let cpus = (r.cpuQuota + r.cpuPeriod - 1) / r.cpuPeriod
            guard cpus <= 254 else { throw RPCError(.invalidArgument, "linux.resources: cpu_quota/cpu_period asks for \(cpus) CPUs") }
            vcpus = max(vcpus, UInt32(cpus))
        }
        return (memory, vcpus)
    }

    /// A NIC per interface CNI made (on its tap, with its MAC), and the agent told the
    /// interface's addresses, MTU and routes.
    static func configure(_ spec: inout VMSpec, _ setup: inout Kuasar_Agent_V1_SetupSandboxRequest, _ net: PodNetwork) {
        spec.nics = zip(net.links, net.tapFDs).map { VMSpec.NIC(tapFD: $1, mac: $0.mac) }
        setup.interfaces = net.links.map { l in
            var i = Kuasar_Agent_V1_Interface()
            i.name = l.name
            i.mac = l.mac
            i.mtu = l.mtu
            i.addresses = l.addresses
            return i
        }
        setup.routes = net.routes.map { r in
            var route = Kuasar_Agent_V1_Route()
            route.destination = r.destination
            route.gateway = r.gateway
            route.device = r.device
            return route
        }
    }

    /// What the agent is told at Start: the CRI's hostname, DNS and sysctls.
    func setupRequest(_ s: Sandbox, _ config: Runtime_V1_PodSandboxConfig?) throws -> Kuasar_Agent_V1_SetupSandboxRequest {
        var r = Kuasar_Agent_V1_SetupSandboxRequest()
        r.sandboxID = s.id
        r.hostname = config?.hostname ?? ""
        if r.hostname.isEmpty { r.hostname = String(s.id.prefix(63)) }
        try PodFiles.check(hostname: r.hostname)
        if let dns = config?.dnsConfig, config?.hasDnsConfig == true {
            r.dnsServers = dns.servers
            r.dnsSearches = dns.searches
            r.dnsOptions = dns.options
        }
        r.sysctls = config?.linux.sysctls ?? [:]
        return r
    }

    public func start(_ s: Sandbox, done: @escaping (Result<SandboxStarted, RPCError>) -> Void) {
        guard let pod = pods[s.id] else {
            done(.failure(RPCError(.failedPrecondition, "sandbox \(s.id): no VM prepared (Create first; a pod whose Start a restarted daemon did not finish must be shut down and created again)")))
            return
        }
        pod.timings = [("start", MonotonicClock.nanoseconds())]
        let deadline = MonotonicClock.nanoseconds() + settings.bootTimeoutNS
        whenAccelerator { [weak self] chosen in
            guard let self else { return }
            pod.spec.accelerator = chosen.0
            self.chooseTemplate(s, pod)
            self.launch(s, pod, deadline: deadline, done: done)
        }
    }

    /// A clone when a verified template fits the pod's size and NICs; its NICs then wake
    /// with the template's MACs, and the agent is told which pod MAC each takes.
    private func chooseTemplate(_ s: Sandbox, _ pod: VMPod) {
        guard let t = templates?.ready(memoryMiB: pod.spec.memoryMiB, vcpus: pod.spec.vcpus, nics: pod.spec.nics.count, accelerator: pod.spec.accelerator) else { return }
        pod.spec.snapshot = VMSpec.Snapshot(role: .clone(state: t.state), memoryFile: t.ram, nicSlots: t.nicSlots)
        pod.template = t.key
        for i in pod.setup.interfaces.indices { pod.setup.interfaces[i].guestMac = VMSpec.Snapshot.nicMAC(i) }
    }

    private func launch(_ s: Sandbox, _ pod: VMPod, deadline: UInt64, done: @escaping (Result<SandboxStarted, RPCError>) -> Void) {
        hypervisor.launch(pod.spec, spawned: { [weak self] state in
            // Recorded at once: a daemon that dies while the VM boots leaves a VM the next one ends.
            pod.spawnedState = state
            self?.registry.save(s)
        }) { [weak self] result in
            if case .failure(let e) = result, let key = pod.template, let self {
                // A template that does not restore is not used again; this pod boots.
                self.logger.error("sandbox \(s.id): clone of VM template \(key) failed (\(e.message)): the template is dropped and the VM boots")
                self.templates?.discard(key)
                // Built again (the default size's) for the pods after this one.
                self.prepareTemplate()
                pod.template = nil
                pod.spec.snapshot = nil
                for i in pod.setup.interfaces.indices { pod.setup.interfaces[i].guestMac = "" }
                pod.timings = [pod.timings[0]]
                return self.launch(s, pod, deadline: deadline, done: done)
            }
            // The VMM holds the taps now (or never will): the daemon's copies go, so the
            // taps vanish with the VMM.
            pod.network?.closeTaps()
            pod.spec.nics = []
            guard let self else { return }
            switch result {
            case .failure(let e):
                done(.failure(e))
            case .success(let vm):
                self.watch(s, pod, vm)
                pod.mark("vmm")
                self.connectAgent(s, pod, deadline: deadline) { r in
                    switch r {
                    case .failure(let e):
                        vm.kill()
                        done(.failure(e))
                    case .success:
                        done(.success(.tasks(self.tasks)))
                    }
                }
            }
        }
    }

    /// `vm` is the pod's; its exit ends the pod.
    private func watch(_ s: Sandbox, _ pod: VMPod, _ vm: VirtualMachine) {
        pod.vm = vm
        vm.onExit = { [weak self, weak s] status in
            guard let self, let s else { return }
            self.vmExited(s, pod, status)
        }
    }

    /// Dials the pod's agent until its first answer (tried at once when the guest opens
    /// its port); once it answered, a lost channel is dialled again.
    private func attachAgent(_ s: Sandbox, _ pod: VMPod, deadline: UInt64, done: @escaping (Result<Kuasar_Agent_V1_CheckResponse, RPCError>) -> Void) {
        let link = AgentLink(reactor: reactor, path: pod.spec.agentSocket, namespace: s.namespace, logger: logger)
        pod.agent = link
        pod.vm?.onAgentPortOpen = { [weak link, weak pod] in
            pod?.mark("port")
            link?.kick()
        }
        link.connect(deadline: deadline, alive: { [weak pod] in pod?.vm?.hasExited == false }) { [weak self, weak s] r in
            guard let self, let s else { return }
            if case .success = r {
                link.onLost = { [weak self, weak s] e in
                    guard let self, let s else { return }
                    self.agentLost(s, pod, e)
                }
            }
            done(r)
        }
    }

    /// The agent's first answer, then the pod set up in the guest and events followed.
    private func connectAgent(_ s: Sandbox, _ pod: VMPod, deadline: UInt64, done: @escaping (Result<Void, RPCError>) -> Void) {
        attachAgent(s, pod, deadline: deadline) { [weak self] r in
            guard let self, let link = pod.agent else { return }
            switch r {
            case .failure(let e):
                done(.failure(self.bootFailure(s, pod, e)))
            case .success(let check):
                pod.mark("agent")
                self.logger.info("sandbox \(s.id): guest agent \(check.version) answered, kernel \(check.kernel), \(pod.template.map { "a clone of VM template \($0)" } ?? "boot \(check.bootMs.sorted { $0.key < $1.key }.map { "\($0.key) \(Int($0.value)) ms" }.joined(separator: ", "))")")
                if pod.template != nil { self.restored(s, pod, link, done: done) } else { self.setUp(s, pod, link, done: done) }
            }
        }
    }

    /// A clone's guest first gets its own random state and its share.
    private func restored(_ s: Sandbox, _ pod: VMPod, _ link: AgentLink, done: @escaping (Result<Void, RPCError>) -> Void) {
        var r = Kuasar_Agent_V1_RestoredRequest()
        var rng = SystemRandomNumberGenerator()
        r.seed = Data((0..<64).map { _ in UInt8.random(in: 0...255, using: &rng) })
        link.call(AgentLink.agent, "Restored", r, as: Kuasar_Agent_V1_RestoredResponse.self) { [weak self] result in
            guard let self else { return }
            switch result {
            case .failure(let e):
                done(.failure(RPCError(e.code, "sandbox \(s.id): wake the clone of VM template \(pod.template ?? "?"): \(e.message)")))
            case .success:
                pod.mark("restored")
                self.setUp(s, pod, link, done: done)
            }
        }
    }

    /// The guest's clock, then the pod's identity and network (SetupSandbox).
    private func setUp(_ s: Sandbox, _ pod: VMPod, _ link: AgentLink, done: @escaping (Result<Void, RPCError>) -> Void) {
        var clock = Kuasar_Agent_V1_SyncClockRequest()
        let now = WallTime.now()
        clock.hostUnixNs = now.seconds * 1_000_000_000 + Int64(now.nanos)
        link.call(AgentLink.agent, "SyncClock", clock, as: Kuasar_Agent_V1_SyncClockResponse.self) { _ in }
        link.call(AgentLink.agent, "SetupSandbox", pod.setup, as: Google_Protobuf_Empty.self) { [weak self] r in
            guard let self else { return }
            if case .failure(let e) = r {
                done(.failure(RPCError(e.code, "sandbox \(s.id): set up the guest: \(e.message)")))
                return
            }
            pod.mark("setup")
            // The Controller saves the pod once Start has answered.
            self.tasks.followEvents(s, pod)
            done(.success(()))
        }
    }

    /// Why a boot failed, with what the guest and QEMU printed last.
    private func bootFailure(_ s: Sandbox, _ pod: VMPod, _ e: RPCError) -> RPCError {
        let console = String(((try? Files.readString(pod.spec.consoleLog)) ?? "").trimmingWhitespace.suffix(800))
        let vmm = pod.vm?.vmmLogTail ?? ""
        if pod.vm?.hasExited == true {
            return RPCError(.internal, "sandbox \(s.id): the VM exited before its agent answered; \(vmm); console: \(console.isEmpty ? "(empty)" : console)")
        }
        return RPCError(e.code == .deadlineExceeded ? .deadlineExceeded : .unavailable,
                        "sandbox \(s.id): \(e.message) within \(settings.bootTimeoutNS / 1_000_000_000) s; the VM is killed; console: \(console.isEmpty ? "(empty)" : console)")
    }

    private func agentLost(_ s: Sandbox, _ pod: VMPod, _ e: RPCError) {
        guard pod.vm?.hasExited == false, !pod.stopping else { return }
        // The guest closed its port (or the agent restarted): dial again; calls meanwhile fail.
        logger.warning("sandbox \(s.id): the agent's channel closed (\(e.message)); reconnecting")
        pod.agent?.connect(deadline: MonotonicClock.nanoseconds() + 10_000_000_000, alive: { [weak pod] in pod?.vm?.hasExited == false }) { [weak self] r in
            guard let self else { return }
            if case .failure(let e) = r {
                self.logger.error("sandbox \(s.id): the agent did not answer again (\(e.message)): the VM is killed")
                pod.vm?.kill()
            } else {
                self.tasks.followEvents(s, pod)
            }
        }
    }

    private func vmExited(_ s: Sandbox, _ pod: VMPod, _ status: ExitStatus?) {
        pod.agent?.close()
        tasks.vmGone(s, pod, status)
        pod.exitStatus = status
        guard !pod.stopping else { return }
        logger.warning("sandbox \(s.id): its VM exited on its own (\(status.map { "\($0)" } ?? "status unknown")); console: \(pod.spec.consoleLog)")
        onSandboxExit?(s, status)
    }

    public func stop(_ s: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void) {
        guard let pod = pods[s.id], let vm = pod.vm, !vm.hasExited else { done(); return }
        var stopped = false
        var safety: TimerID?
        let thenVM = { [reactor] in
            guard !stopped else { return }
            stopped = true
            if let safety { reactor.cancel(safety) }
            pod.stopping = true
            pod.agent?.close()
            // The containers are gone (or the guest stopped answering) and the guest wrote
            // through to the share: a short grace for the power button, then QEMU quits.
            vm.stop(timeoutNS: 200_000_000, done: done)
        }
        tasks.stopAll(in: s, timeoutSecs: timeoutSecs, done: thenVM)
        // A guest that reports no exit 5 s after its SIGKILLs is ended with its VM.
        if !stopped { safety = reactor.schedule(afterNS: UInt64(timeoutSecs) * 1_000_000_000 + 5_000_000_000) { thenVM() } }
    }

    public func shutdown(_ s: Sandbox) {
        guard let pod = pods[s.id] else { return }
        pod.stopping = true
        pod.agent?.close()
        if let vm = pod.vm, !vm.hasExited { vm.kill() }
        tasks.release(s)
        pod.network?.closeTaps()
        PodNetwork.detach(netnsPath: pod.netns, links: pod.netLinks)
        pods[s.id] = nil
    }

    public func update(_ s: Sandbox, resources: OCISpec.Resources) throws {
        throw RPCError(.unimplemented, "sandbox \(s.id): resizing a running VM (memory/CPU hot-plug) is not supported yet")
    }

    /// From the guest: the cgroup its containers run under (the VMM's own cost, its PSS
    /// on the host, is not in it).
    public func metrics(_ s: Sandbox, done: @escaping (Result<Google_Protobuf_Any, RPCError>) -> Void) {
        guard let agent = pods[s.id]?.agent, s.state == .ready else {
            return done(.failure(RPCError(.failedPrecondition, "sandbox \(s.id) is not running: no metrics")))
        }
        agent.call(AgentLink.agent, "Metrics", Kuasar_Agent_V1_MetricsRequest(), as: Kuasar_Agent_V1_MetricsResponse.self) { result in
            done(result.map(\.data))
        }
    }

    /// A template build cannot be finished by the next daemon: its VM and directory go.
    public func daemonExiting() {
        templates?.abandonBuilds()
    }

    public func pid(_ s: Sandbox) -> UInt32 { pods[s.id]?.vm.map { UInt32($0.pid) } ?? 0 }

    public func statusInfo(_ s: Sandbox) -> [String: Any] {
        guard let pod = pods[s.id] else { return [:] }
        var info: [String: Any] = ["hypervisor": hypervisor.name, "accelerator": pod.spec.accelerator.rawValue,
                                   "console": pod.spec.consoleLog, "memory_mib": Int(pod.spec.memoryMiB), "vcpus": Int(pod.spec.vcpus),
                                   "kernel": pod.spec.kernel, "initrd": pod.spec.initrd,
                                   "started_from": pod.template.map { "template \($0)" } ?? "cold boot"]
        if let key = pod.template, let t = templates?.info.first(where: { $0["key"] as? String == key }) { info["template"] = t }
        if let vm = pod.vm { info["vmm_pid"] = Int(vm.pid); info["vmm_running"] = !vm.hasExited; info["hypervisor_version"] = vm.vmmVersion }
        if let net = pod.network {
            info["network"] = net.links.map { ["name": $0.name, "mac": $0.mac, "addresses": $0.addresses, "tap_ifindex": Int($0.tapIndex)] as [String: Any] }
        }
        if let c = pod.agent?.check { info["agent_version"] = c.version; info["guest_kernel"] = c.kernel; info["guest_boot_ms"] = c.bootMs }
        if let t0 = pod.timings.first?.1 {
            info["start_ms"] = Dictionary(pod.timings.dropFirst().map { ($0.0, Double($0.1 - t0) / 1e6) }, uniquingKeysWith: { a, _ in a })
        }
        return info
    }

    public func persistentState(_ s: Sandbox) -> [String: String] {
        guard let pod = pods[s.id] else { return [:] }
        var state = pod.vm?.persistentState ?? pod.spawnedState
        state["memory_mib"] = String(pod.spec.memoryMiB)
        state["vcpus"] = String(pod.spec.vcpus)
        state["kernel"] = pod.spec.kernel
        state["initrd"] = pod.spec.initrd
        if let t = pod.template { state["template"] = t }
        if !pod.netns.isEmpty {
            state["netns"] = pod.netns
            state["net_links"] = pod.netLinks.map(String.init).joined(separator: ",")
        }
        state.merge(tasks.persistentState(s)) { a, _ in a }
        return state
    }

    public func recover(_ s: Sandbox, state: [String: String], exits: ExitRecords) {
        guard state["vmm_pid"] != nil else { return }
        guard s.state == .ready else {
            endLeftover(s, state: state, exits: exits)
            return
        }
        let accelerator = state["accelerator"].flatMap { Accelerator(rawValue: $0) } ?? .tcg
        var spec = VMSpec(id: s.id, stateDir: s.stateDir, kernel: state["kernel"] ?? settings.kernel, initrd: state["initrd"] ?? settings.initrd,
                          memoryMiB: state["memory_mib"].flatMap { UInt32($0) } ?? settings.memoryMiB, vcpus: state["vcpus"].flatMap { UInt32($0) } ?? settings.vcpus,
                          accelerator: accelerator, sharePath: s.stateDir + "/share")
        spec.kernelArgs = settings.kernelArgs
        let pod = VMPod(spec: spec, setup: Kuasar_Agent_V1_SetupSandboxRequest())
        pod.template = state["template"]
        pod.netns = state["netns"] ?? ""
        pod.netLinks = (state["net_links"] ?? "").split(separator: ",").compactMap { Int32($0) }
        tasks.restore(pod, from: state)
        pods[s.id] = pod
        s.taskBackend = s.sandboxer == nil ? shimTasks : tasks
        hypervisor.recover(spec, state: state, exits: exits) { [weak self, weak s] result in
            guard let self, let s else { return }
            switch result {
            case .failure(let e):
                self.logger.warning("sandbox \(s.id): \(e.message)")
                self.vmExited(s, pod, nil)
            case .success(let vm):
                self.watch(s, pod, vm)
                self.attachAgent(s, pod, deadline: MonotonicClock.nanoseconds() + 10_000_000_000) { [weak self] r in
                    guard let self else { return }
                    switch r {
                    case .failure(let e):
                        self.logger.error("sandbox \(s.id): its VM was found again but its agent did not answer (\(e.message)): the VM is killed")
                        vm.kill()
                    case .success(let check):
                        self.logger.info("sandbox \(s.id): VM re-attached (QEMU pid \(vm.pid), agent \(check.version))")
                        self.tasks.reattach(s, pod)
                    }
                }
            }
        }
    }

    /// A VM whose Start the last daemon did not finish (or a stopped pod's that outlived
    /// it): nothing serves it, so it is killed — checked by pid and start time, never a
    /// stranger that reused the pid. Its pod must be created again.
    private func endLeftover(_ s: Sandbox, state: [String: String], exits: ExitRecords) {
        guard let pid = hypervisor.kill(recorded: state, exits: exits) else { return }
        logger.warning("sandbox \(s.id): its VM (VMM pid \(pid)) was still starting when the last daemon ended: killed; shut the pod down and create it again")
    }

    public func exitRecordNames(_ s: Sandbox, state: [String: String]) -> [String] {
        guard let pid = state["vmm_pid"].flatMap({ pid_t($0) }), let start = state["vmm_start"].flatMap({ UInt64($0) }) else { return [] }
        return [ExitRecords.name(pid: pid, startTime: start)]
    }
}

/// One pod's VM, its agent, and what the host keeps of its containers.
public final class VMPod {
    /// Its accelerator is set at Start, once the KVM probe has answered.
    var spec: VMSpec
    var setup: Kuasar_Agent_V1_SetupSandboxRequest
    /// The VM template it was cloned from (nil: it booted).
    var template: String?
    var vm: VirtualMachine?
    var agent: AgentLink?
    /// containerd's netns for the pod ("": none), and what joins the VM to it.
    var netns = ""
    /// (nil after a restart: the taps are the VMM's then.)
    var network: PodNetwork?
    /// The netns's links whose ingress redirects to the VM (removed at Shutdown).
    var netLinks: [Int32] = []
    /// The VMM's record from the moment it was spawned, until `vm` is there.
    var spawnedState: [String: String] = [:]
    var stopping = false
    var exitStatus: ExitStatus?
    /// The last agent event handled (acknowledged with the next NextEvents).
    var eventSeq: UInt64 = 0
    var eventsFollowed = false
    var containers: [String: VMContainer] = [:]
    var timings: [(String, UInt64)] = []

    init(spec: VMSpec, setup: Kuasar_Agent_V1_SetupSandboxRequest) {
        self.spec = spec
        self.setup = setup
    }

    func mark(_ step: String) { timings.append((step, MonotonicClock.nanoseconds())) }
}
