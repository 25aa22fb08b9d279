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
import KuasarContainer
import KuasarSandbox

/// A container of a VM pod, as the host keeps it: where its bundle went in the share,
/// what the host mounted for it, and its processes.
final class VMContainer {
    let id: String
    /// containerd's bundle on the host (State answers it).
    let bundle: String
    /// `<share>/<id>`: the bundle the guest sees at `<guest share>/<id>`.
    let shareDir: String
    /// Host mounts made for it (its rootfs, its bind mounts), unmounted at Delete.
    var mounts: [String] = []
    var processes: [String: VMProcess] = [:]
    var paused = false
    /// The hot-plugged disk of its block rootfs (its QMP id and virtio serial), unplugged at Delete.
    var disk: String?
    /// Run once its init has exited (stopAll).
    var initExitWaiters: [() -> Void] = []
    init(id: String, bundle: String, shareDir: String) {
        self.id = id
        self.bundle = bundle
        self.shareDir = shareDir
    }
    var initProcess: VMProcess? { processes[""] }
}

/// One process (a container's init, or an exec) of a VM pod.
final class VMProcess {
    let execID: String
    let stdio: StdioPaths
    var pid: UInt32 = 0
    var started = false
    /// The exit the agent reported; `finished` once its output has reached the FIFOs too.
    var exit: (ExitStatus, WallTime?)?
    var finished = false
    var bridge: StdioBridge?
    var waiters: [(UInt64, (Result<Containerd_Task_V2_WaitResponse, RPCError>) -> Void)] = []
    var nextWaiter: UInt64 = 0
    init(execID: String, stdio: StdioPaths) {
        self.execID = execID
        self.stdio = stdio
    }
}

/// containerd's Task API for the containers of VM pods: each call is checked and
/// prepared on the host — the bundle and rootfs made visible through the share, paths
/// rewritten for the guest, containerd's FIFOs bridged to the agent's stdio streams —
/// and forwarded to the pod's agent. Exits come from the agent's event queue and are
/// reported (and Wait answered) only once the process's output has reached its FIFOs.
public final class VMTasks: TaskBackend {
    public weak var events: TaskEventSink?
    let registry: SandboxRegistry
    let reactor: Reactor
    let logger: Logger
    var podOf: (Sandbox) -> VMPod? = { _ in nil }
    /// Where the guest sees the share (GuestInit.sharePath in the agent).
    static let guestShare = "/run/kuasar/share"

    init(registry: SandboxRegistry, reactor: Reactor, logger: Logger) {
        self.registry = registry
        self.reactor = reactor
        self.logger = logger
    }

    private func running(_ s: Sandbox) throws -> VMPod {
        guard let p = podOf(s), let vm = p.vm, !vm.hasExited, let agent = p.agent, !agent.isClosed else {
            throw RPCError(.failedPrecondition, "sandbox \(s.id): its VM is not running")
        }
        return p
    }

    private func container(_ p: VMPod, _ id: String) throws -> VMContainer {
        guard let c = p.containers[id] else { throw RPCError(.notFound, "container \(id) not found") }
        return c
    }

    private func process(_ p: VMPod, _ id: String, _ execID: String) throws -> VMProcess {
        let c = try container(p, id)
        guard let proc = c.processes[execID] else {
            throw RPCError(.notFound, execID.isEmpty ? "container \(id) has no task" : "exec \(execID) not found in container \(id)")
        }
        return proc
    }

    /// An agent answer, with the container named in its error.
    private func forward<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ p: VMPod, _ method: String, _ r: Req, as: Resp.Type,
                                                                                 _ done: @escaping (Result<Resp, RPCError>) -> Void) {
        guard let agent = p.agent else { done(.failure(RPCError(.unavailable, "the VM's agent is not connected"))); return }
        agent.task(method, r, as: Resp.self, done: done)
    }

    // MARK: Create

    public func create(_ r: Containerd_Task_V2_CreateTaskRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_CreateTaskResponse>) throws {
        try Identifier.validate(r.id, what: "container")
        let p = try running(s)
        guard p.containers[r.id] == nil else { throw RPCError(.alreadyExists, "container \(r.id) already exists") }
        if !r.checkpoint.isEmpty { throw RPCError(.unimplemented, "restore from a checkpoint is not supported by kuasar") }
        guard r.bundle.hasPrefix("/") else { throw RPCError(.invalidArgument, "bundle \"\(r.bundle)\" must be an absolute path") }
        let spec = try OCISpec.decode(try Files.read(r.bundle + "/config.json"))
        let c = VMContainer(id: r.id, bundle: r.bundle, shareDir: p.spec.sharePath + "/" + r.id)
        // A block rootfs (devmapper-style) goes to the guest as a disk where the VMM can
        // hot-plug one; elsewhere it is mounted here and shared like any other.
        let block = Self.blockRootfs(r.rootfs).flatMap { p.vm?.canHotplugDisks == true ? $0 : nil }
        do {
            try prepare(c, spec, rootfs: block == nil ? r.rootfs : [], guestMountsRootfs: block != nil)
        } catch {
            unprepare(c)
            throw error
        }
        var fwd = r
        fwd.bundle = Self.guestShare + "/" + r.id
        fwd.rootfs = []
        let stdio = StdioPaths(stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, terminal: r.terminal)
        (fwd.stdin, fwd.stdout, fwd.stderr) = Self.streams(stdio)
        p.containers[r.id] = c
        let proc = VMProcess(execID: "", stdio: stdio)
        c.processes[""] = proc
        func undo(_ e: RPCError) {
            p.containers[r.id] = nil
            unprepare(c)
            if let disk = c.disk { p.vm?.unplugDisk(id: disk) { [logger] r in
                if case .failure(let u) = r { logger.warning("container \(c.id): unplug its disk after a failed Create: \(u.message)") }
            } }
            reply(.failure(e))
        }
        func send(_ fwd: Containerd_Task_V2_CreateTaskRequest) {
            forward(p, "Create", fwd, as: Containerd_Task_V2_CreateTaskResponse.self) { [weak self] result in
                guard let self else { return }
                switch result {
                case .failure(let e):
                    undo(e)
                case .success(let resp):
                    proc.pid = resp.pid
                    self.bridge(s, p, c, proc)
                    self.registry.save(s)
                    reply(.success(resp))
                }
            }
        }
        guard let block, let vm = p.vm else { return send(fwd) }
        let disk = Self.diskID(r.id)
        vm.hotplugDisk(id: disk, path: block.source, readOnly: block.options.contains("ro")) { result in
            switch result {
            case .failure(let e):
                undo(RPCError(e.code, "container \(r.id): its rootfs \(block.source): \(e.message)"))
            case .success:
                c.disk = disk
                var m = block
                m.source = AgentProtocol.diskSourceScheme + disk
                fwd.rootfs = [m]
                send(fwd)
            }
        }
    }

    /// containerd's rootfs when it is one filesystem on a block device (the devmapper
    /// snapshotter's), nil for overlay and bind snapshots.
    static func blockRootfs(_ rootfs: [Containerd_Types_Mount]) -> Containerd_Types_Mount? {
        guard rootfs.count == 1, let m = rootfs.first, ["ext4", "ext3", "ext2", "xfs", "btrfs"].contains(m.type) else { return nil }
        var st = stat()
        guard stat(m.source, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else { return nil }
        return m
    }

    /// A disk id from the container id: stable (recovery), within virtio-blk's 20-byte
    /// serial and QMP's id syntax.
    static func diskID(_ containerID: String) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in containerID.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        let hex = String(h, radix: 16)
        return "kd" + String(repeating: "0", count: 16 - hex.count) + hex
    }

    /// `stream:` for each stdio the host will bridge (the agent's side of a FIFO).
    static func streams(_ io: StdioPaths) -> (String, String, String) {
        (io.stdin.isEmpty ? "" : "stream:", io.stdout.isEmpty ? "" : "stream:", io.stderr.isEmpty || io.terminal ? "" : "stream:")
    }

    /// Makes the container's bundle in the share: its rootfs mounted there (containerd's
    /// snapshot mounts, or the bundle's own rootfs bound), its host bind mounts bound
    /// beside it, and a config.json whose paths are the guest's.
    /// `guestMountsRootfs`: the rootfs is a disk the guest mounts itself over the
    /// (empty) rootfs directory.
    func prepare(_ c: VMContainer, _ spec: OCISpec, rootfs: [Containerd_Types_Mount], guestMountsRootfs: Bool = false) throws {
        try makeDirectories(c.shareDir, mode: 0o711)
        let rootTarget = c.shareDir + "/rootfs"
        try makeDirectories(rootTarget, mode: 0o755)
        if guestMountsRootfs {
            // Nothing here: the guest's mount covers the directory.
        } else if !rootfs.isEmpty {
            let n = try RootfsMounts.mountAll(rootfs, at: rootTarget)
            c.mounts += Array(repeating: rootTarget, count: n)
        } else {
            guard let rootPath = spec.root?.path, !rootPath.isEmpty else { throw SpecError("root.path", "required") }
            let source = rootPath.hasPrefix("/") ? rootPath : c.bundle + "/" + rootPath
            guard Files.isDirectory(source) else { throw RPCError(.invalidArgument, "root.path \(source) is not a directory (and containerd passed no rootfs mounts)") }
            // Bound writable: the guest's engine makes its mount points in it first and then
            // turns it read-only itself when root.readonly says so.
            try RootfsMounts.mount("bind", source: source, options: ["rbind"], at: rootTarget)
            c.mounts.append(rootTarget)
        }
        var out = spec
        out.root = OCISpec.Root(path: "rootfs", readonly: spec.root?.readonly)
        // The VM is the pod: the pod's network, IPC, UTS are the guest's own, so entries
        // that name the host's pod (a /proc/<pid>/ns path) join the guest's; a pod-wide
        // PID namespace becomes the container's own (PID 1 of the guest stays hidden).
        if var linux = out.linux, let ns = linux.namespaces {
            linux.namespaces = ns.compactMap { n in
                guard n.path != nil else { return n }
                if n.type == "pid" || n.type == "mount" || n.type == "cgroup" || n.type == "user" { return OCISpec.Namespace(type: n.type, path: nil) }
                return nil
            }
            out.linux = linux
        }
        // Hooks name host programs: they do not exist in the guest.
        if out.hooks != nil {
            logger.warning("container \(c.id): OCI hooks are not run inside a VM; dropped")
            out.hooks = nil
        }
        var mounts = out.mounts ?? []
        for i in mounts.indices {
            let m = mounts[i]
            let options = m.options ?? []
            let isBind = m.type == "bind" || options.contains("bind") || options.contains("rbind")
            guard isBind, let source = m.source, source.hasPrefix("/") else { continue }
            // The guest's own /proc, /sys and /dev are the VM's: those stay as they are.
            if ["/proc", "/sys", "/dev"].contains(where: { source == $0 || source.hasPrefix($0 + "/") }) { continue }
            var st = stat()
            guard stat(source, &st) == 0 else { throw RPCError(.invalidArgument, "mounts[\(i)]: source \(source): \(Errno(rawValue: errno))") }
            let name = "m\(i)"
            let dir = c.shareDir + "/mounts"
            try makeDirectories(dir, mode: 0o711)
            let target = dir + "/" + name
            if (st.st_mode & S_IFMT) == S_IFDIR {
                try makeDirectories(target, mode: 0o755)
            } else {
                try Files.write(target, "", create: true, mode: 0o644)
            }
            try RootfsMounts.mount("bind", source: source, options: ["rbind"] + (options.contains("ro") ? ["ro"] : []), at: target)
            c.mounts.append(target)
            mounts[i].source = Self.guestShare + "/" + c.id + "/mounts/" + name
        }
        out.mounts = mounts
        let json: Data
        do { json = try JSONEncoder().encode(out) } catch { throw RPCError(.internal, "container \(c.id): encode its spec for the guest: \(error)") }
        try Files.write(c.shareDir + "/config.json", String(decoding: json, as: UTF8.self), create: true, mode: 0o600)
    }

    /// Undoes `prepare` (newest mount first) and removes the container's share directory.
    func unprepare(_ c: VMContainer) {
        for m in c.mounts.reversed() { try? Mounts.unmount(m, lazy: true) }
        c.mounts.removeAll()
        Mounts.unmountAll(under: c.shareDir)
        Files.removeTree(c.shareDir)
    }

    // MARK: stdio

    /// containerd's FIFOs joined to the agent's streams of `proc`; its exit is reported once
    /// both outputs reached their end.
    private func bridge(_ s: Sandbox, _ p: VMPod, _ c: VMContainer, _ proc: VMProcess, resume: Bool = false) {
        guard let agent = p.agent else { return }
        do {
            let b = try StdioBridge(reactor: reactor, agent: agent, containerID: c.id, execID: proc.execID, stdio: proc.stdio, resume: resume, logger: logger)
            proc.bridge = b
            b.onDrained = { [weak self, weak proc] in
                guard let self, let proc else { return }
                self.finishIfDone(s, c, proc)
            }
            b.start()
        } catch {
            logger.error("container \(c.id)\(proc.execID.isEmpty ? "" : " exec \(proc.execID)"): its stdio: \(error); output is lost")
        }
    }

    // MARK: events and exits

    /// Follows the agent's event queue (a long poll, each batch acknowledged by the next
    /// call): exits and OOM kills become the host's events.
    func followEvents(_ s: Sandbox, _ p: VMPod) {
        guard let agent = p.agent, !agent.isClosed else { return }
        var r = Kuasar_Agent_V1_NextEventsRequest()
        r.after = p.eventSeq
        r.max = 64
        agent.call(AgentLink.agent, "NextEvents", r, as: Kuasar_Agent_V1_NextEventsResponse.self, timeoutNS: nil) { [weak self, weak s] result in
            guard let self, let s else { return }
            switch result {
            case .failure(let e):
                // The channel went away (reconnecting, or the VM is gone).
                guard e.code != .unavailable else { return }
                self.logger.warning("sandbox \(s.id): agent events: \(e.message)")
                self.reactor.schedule(afterNS: 100_000_000) { [weak self] in self?.followEvents(s, p) }
            case .success(let batch):
                var handled = false
                for event in batch.events where event.seq > p.eventSeq {
                    p.eventSeq = event.seq
                    self.handle(s, p, event.envelope)
                    handled = true
                }
                // Saved before the next poll acknowledges them to the agent.
                if handled { self.registry.save(s) }
                self.followEvents(s, p)
            }
        }
    }

    private func handle(_ s: Sandbox, _ p: VMPod, _ envelope: Containerd_Services_Events_Ttrpc_V1_Envelope) {
        switch envelope.topic {
        case "/tasks/exit":
            guard let e = try? Containerd_Events_TaskExit(serializedBytes: envelope.event.value) else { return }
            let execID = e.id == e.containerID ? "" : e.id
            guard let c = p.containers[e.containerID], let proc = c.processes[execID], proc.exit == nil else { return }
            let at = e.hasExitedAt ? WallTime(seconds: e.exitedAt.seconds, nanos: e.exitedAt.nanos) : WallTime.now()
            exited(s, p, c, proc, Self.status(e.exitStatus), at: at, save: false)
        case "/tasks/oom":
            guard let e = try? Containerd_Events_TaskOOM(serializedBytes: envelope.event.value) else { return }
            events?.taskOOM(s, containerID: e.containerID)
        default:
            break
        }
    }

    static func status(_ code: UInt32) -> ExitStatus {
        code > 128 && code < 128 + 65 ? .signaled(Int32(code) - 128, coreDumped: false) : .exited(Int32(bitPattern: code))
    }

    /// `proc` has exited (the agent said so, or the VM is gone): reported once its output
    /// is all out; stopAll hears of an init's exit at once.
    private func exited(_ s: Sandbox, _ p: VMPod, _ c: VMContainer, _ proc: VMProcess, _ status: ExitStatus, at: WallTime?, save: Bool) {
        proc.exit = (status, at)
        reportExit(s, c, proc, save: save)
        if proc.execID.isEmpty {
            let waiters = c.initExitWaiters
            c.initExitWaiters.removeAll()
            for w in waiters { w() }
        }
    }

    /// How long after an exit its output may take to reach the FIFOs before the exit is
    /// reported without it. The agent ends a stream at most 2 s after the exit, and the
    /// bytes then on their way are a round trip or two; what holds them longer is a FIFO
    /// nobody reads (`ctr run -d` gone), which must not keep the exit from Wait, State and
    /// Delete for ever. As the container engine's drain of a pipe: bounded, then reported.
    static let exitReportBoundNS: UInt64 = 10_000_000_000

    /// `proc`'s exit is known: reported now if its output is all out, else once it is — or
    /// at the bound, the bridge then delivering the rest while the FIFO is read, until Delete.
    private func reportExit(_ s: Sandbox, _ c: VMContainer, _ proc: VMProcess, save: Bool = true) {
        finishIfDone(s, c, proc, save: save)
        guard !proc.finished else { return }
        reactor.schedule(afterNS: Self.exitReportBoundNS) { [weak self, weak s, weak proc] in
            guard let self, let s, let proc, !proc.finished, proc.exit != nil else { return }
            self.logger.warning("container \(c.id)\(proc.execID.isEmpty ? "" : " exec \(proc.execID)"): its output has not all reached the FIFOs \(Self.exitReportBoundNS / 1_000_000_000) s after the exit (is anyone reading them?); the exit is reported, the rest follows while they are read, until Delete")
            self.finishIfDone(s, c, proc, force: true)
        }
    }

    /// Reports the exit (event, waiters) once it is known and the output is all out (or
    /// `force`, at the bound). `save: false` when the caller saves once for a batch.
    private func finishIfDone(_ s: Sandbox, _ c: VMContainer, _ proc: VMProcess, save: Bool = true, force: Bool = false) {
        guard !proc.finished, let (status, at) = proc.exit, force || proc.bridge?.drained ?? true else { return }
        proc.finished = true
        if save { registry.save(s) }
        events?.taskExited(s, containerID: c.id, execID: proc.execID, pid: proc.pid, status: status, at: at)
        let resp = Containerd_Task_V2_WaitResponse(status, at: at)
        let waiters = proc.waiters
        proc.waiters.removeAll()
        for (_, w) in waiters { w(.success(resp)) }
        if proc.execID.isEmpty {
            // The init is gone: so is every exec of the container (the guest killed them).
            for other in c.processes.values where other !== proc && other.started && other.exit == nil {
                other.exit = (.signaled(SIGKILL, coreDumped: false), at)
                reportExit(s, c, other, save: save)
            }
        }
    }

    /// The VM is gone: every process still running ends with it (SIGKILL), after its
    /// output so far.
    func vmGone(_ s: Sandbox, _ p: VMPod, _ status: ExitStatus?) {
        let now = WallTime.now()
        var ended = false
        for c in p.containers.values {
            for proc in c.processes.values where proc.exit == nil && proc.started {
                proc.bridge?.abandon()
                exited(s, p, c, proc, .signaled(SIGKILL, coreDumped: false), at: now, save: false)
                ended = true
            }
        }
        if ended { registry.save(s) }
    }

    // MARK: the rest, forwarded

    public func start(_ r: Containerd_Task_V2_StartRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StartResponse>) throws {
        let p = try running(s)
        let proc = try process(p, r.id, r.execID)
        forward(p, "Start", r, as: Containerd_Task_V2_StartResponse.self) { [weak self] result in
            if case .success(let resp) = result {
                proc.started = true
                proc.pid = resp.pid
                self?.registry.save(s)
            }
            reply(result)
        }
    }

    public func delete(_ r: Containerd_Task_V2_DeleteRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_DeleteResponse>) throws {
        let p = try running(s)
        let c = try container(p, r.id)
        let proc = try process(p, r.id, r.execID)
        guard !proc.started || proc.exit != nil else {
            throw RPCError(.failedPrecondition, "\(r.execID.isEmpty ? "container \(r.id)" : "exec \(r.execID)") is still running; kill it first")
        }
        guard !proc.started || proc.finished else {
            // It exited and its last output is on its way (the agent ends a stream at most
            // OutputStream.exitDrainNS after the exit): Delete waits for it, as a runc
            // shim's Delete waits for its copies, rather than refuse or drop those bytes.
            let token = proc.nextWaiter
            proc.nextWaiter += 1
            proc.waiters.append((token, { [weak self] _ in
                guard let self else { return }
                do { try self.delete(r, in: s, reply: reply) } catch { reply(.failure(RPCError.from(error))) }
            }))
            return
        }
        forward(p, "Delete", r, as: Containerd_Task_V2_DeleteResponse.self) { [weak self] result in
            guard let self else { return }
            guard case .success = result else { return reply(result) }
            proc.bridge?.close()
            guard r.execID.isEmpty else {
                c.processes[r.execID] = nil
                self.registry.save(s)
                return reply(result)
            }
            for other in c.processes.values { other.bridge?.close() }
            p.containers[r.id] = nil
            self.unprepare(c)
            self.registry.save(s)
            // The guest unmounted its disk: unplugged before containerd is told, so the
            // snapshotter can take the device back.
            guard let disk = c.disk, let vm = p.vm else { return reply(result) }
            vm.unplugDisk(id: disk) { [logger = self.logger] u in
                if case .failure(let e) = u { logger.warning("container \(r.id): unplug disk \(disk): \(e.message)") }
                reply(result)
            }
        }
    }

    public func exec(_ r: Containerd_Task_V2_ExecProcessRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let p = try running(s)
        let c = try container(p, r.id)
        try Identifier.validate(r.execID, what: "exec")
        guard c.processes[r.execID] == nil else { throw RPCError(.alreadyExists, "exec \(r.execID) already exists in container \(r.id)") }
        let stdio = StdioPaths(stdin: r.stdin, stdout: r.stdout, stderr: r.stderr, terminal: r.terminal)
        var fwd = r
        (fwd.stdin, fwd.stdout, fwd.stderr) = Self.streams(stdio)
        let proc = VMProcess(execID: r.execID, stdio: stdio)
        c.processes[r.execID] = proc
        forward(p, "Exec", fwd, as: Google_Protobuf_Empty.self) { [weak self] result in
            guard let self else { return }
            switch result {
            case .failure(let e):
                c.processes[r.execID] = nil
                reply(.failure(e))
            case .success:
                self.bridge(s, p, c, proc)
                reply(.success(()))
            }
        }
    }

    public func state(_ r: Containerd_Task_V2_StateRequest, in s: Sandbox) throws -> Containerd_Task_V2_StateResponse {
        guard let p = podOf(s) else { throw RPCError(.notFound, "container \(r.id) not found") }
        let c = try container(p, r.id)
        let proc = try process(p, r.id, r.execID)
        // Stopped once the exit is reported — after the output reached the FIFOs, as the
        // container engine's processes stop only after their drain: a client that sees
        // STOPPED and deletes (ctr) never deletes before the last bytes are out.
        let status: Containerd_V1_Types_Status = proc.finished ? .stopped : !proc.started ? .created : (proc.execID.isEmpty && c.paused) ? .paused : .running
        let exit = proc.finished ? proc.exit : nil
        return Containerd_Task_V2_StateResponse(r, bundle: c.bundle, pid: pid_t(proc.pid), status: status, stdio: proc.stdio, exit: exit?.0, exitedAt: exit?.1)
    }

    public func pids(_ r: Containerd_Task_V2_PidsRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_PidsResponse>) throws {
        let p = try running(s)
        _ = try container(p, r.id)
        forward(p, "Pids", r, as: Containerd_Task_V2_PidsResponse.self, reply)
    }

    public func pause(_ r: Containerd_Task_V2_PauseRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let p = try running(s)
        let c = try container(p, r.id)
        forward(p, "Pause", r, as: Google_Protobuf_Empty.self) { result in
            if case .success = result { c.paused = true }
            reply(result.map { _ in () })
        }
    }

    public func resume(_ r: Containerd_Task_V2_ResumeRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let p = try running(s)
        let c = try container(p, r.id)
        forward(p, "Resume", r, as: Google_Protobuf_Empty.self) { result in
            if case .success = result { c.paused = false }
            reply(result.map { _ in () })
        }
    }

    public func kill(_ r: Containerd_Task_V2_KillRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let p = try running(s)
        _ = try process(p, r.id, r.execID)
        forward(p, "Kill", r, as: Google_Protobuf_Empty.self) { reply($0.map { _ in () }) }
    }

    public func resizePty(_ r: Containerd_Task_V2_ResizePtyRequest, in s: Sandbox) throws {
        let p = try running(s)
        _ = try process(p, r.id, r.execID)
        forward(p, "ResizePty", r, as: Google_Protobuf_Empty.self) { [logger] result in
            if case .failure(let e) = result { logger.warning("container \(r.id): resize its terminal: \(e.message)") }
        }
    }

    public func closeIO(_ r: Containerd_Task_V2_CloseIORequest, in s: Sandbox) throws {
        let p = try running(s)
        let proc = try process(p, r.id, r.execID)
        guard r.stdin else { return }
        proc.bridge?.closeStdin()
    }

    public func update(_ r: Containerd_Task_V2_UpdateTaskRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws {
        let p = try running(s)
        _ = try container(p, r.id)
        forward(p, "Update", r, as: Google_Protobuf_Empty.self) { reply($0.map { _ in () }) }
    }

    public func wait(_ r: Containerd_Task_V2_WaitRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_WaitResponse>) throws -> (() -> Void)? {
        guard let p = podOf(s) else { throw RPCError(.notFound, "container \(r.id) not found") }
        let proc = try process(p, r.id, r.execID)
        if proc.finished, let (status, at) = proc.exit {
            reply(.success(Containerd_Task_V2_WaitResponse(status, at: at)))
            return nil
        }
        let token = proc.nextWaiter
        proc.nextWaiter += 1
        proc.waiters.append((token, reply))
        return { [weak proc] in proc?.waiters.removeAll { $0.0 == token } }
    }

    public func stats(_ r: Containerd_Task_V2_StatsRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StatsResponse>) throws {
        let p = try running(s)
        _ = try container(p, r.id)
        forward(p, "Stats", r, as: Containerd_Task_V2_StatsResponse.self, reply)
    }

    public func taskPid(_ id: String, in s: Sandbox) -> UInt32 { podOf(s)?.containers[id]?.initProcess?.pid ?? 0 }

    public func isEmpty(_ s: Sandbox) -> Bool { podOf(s)?.containers.isEmpty ?? true }

    /// Containers whose init runs.
    private func running(_ p: VMPod) -> [VMContainer] {
        p.containers.values.filter { c in c.initProcess.map { $0.started && $0.exit == nil } ?? false }
    }

    /// `sig` to every process of each container, through the agent.
    private func signal(_ p: VMPod, _ containers: [VMContainer], _ sig: Int32) {
        guard let agent = p.agent, !agent.isClosed else { return }
        for c in containers where c.initProcess?.exit == nil {
            var k = Containerd_Task_V2_KillRequest()
            k.id = c.id
            k.signal = UInt32(sig)
            k.all = true
            agent.task("Kill", k, as: Google_Protobuf_Empty.self) { _ in }
        }
    }

    /// Through the agent, as the namespace kind stops its containers (`stopGroup`); a guest
    /// that never answers is VMBackend.stop's to end.
    public func stopAll(in s: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void) {
        guard let p = podOf(s), let agent = p.agent, !agent.isClosed else { done(); return }
        stopGroup(running(p), timeoutSecs: timeoutSecs, reactor: reactor,
                  signal: { [weak self] c, sig in self?.signal(p, [c], sig) },
                  isGone: { $0.initProcess?.exit != nil },
                  whenGone: { c, gone in if c.initProcess?.exit != nil { gone() } else { c.initExitWaiters.append(gone) } },
                  done: done)
    }

    public func killAll(in s: Sandbox) {
        guard let p = podOf(s) else { return }
        signal(p, running(p), SIGKILL)
    }

    // MARK: persistence

    /// A container as the state file keeps it.
    struct Record: Codable {
        struct Process: Codable {
            var execID: String
            var pid: UInt32
            var stdin: String
            var stdout: String
            var stderr: String
            var terminal: Bool
            var started: Bool
            var exitStatus: UInt32?
            var exitedAt: WallTime?
            var finished: Bool
        }
        var id: String
        var bundle: String
        var mounts: [String]
        var paused: Bool
        var disk: String?
        var processes: [Process]
    }

    public func persistentState(_ s: Sandbox) -> [String: String] {
        guard let p = podOf(s) else { return [:] }
        let records = p.containers.values.sorted { $0.id < $1.id }.map { c in
            Record(id: c.id, bundle: c.bundle, mounts: c.mounts, paused: c.paused, disk: c.disk, processes: c.processes.values.sorted { $0.execID < $1.execID }.map { proc in
                Record.Process(execID: proc.execID, pid: proc.pid, stdin: proc.stdio.stdin, stdout: proc.stdio.stdout, stderr: proc.stdio.stderr,
                               terminal: proc.stdio.terminal, started: proc.started, exitStatus: proc.exit.map { UInt32(bitPattern: $0.0.code) },
                               exitedAt: proc.exit?.1, finished: proc.finished)
            })
        }
        let json = (try? JSONEncoder().encode(records)).map { String(decoding: $0, as: UTF8.self) } ?? "[]"
        return ["containers": json, "event_seq": String(p.eventSeq)]
    }

    /// The containers a previous daemon recorded (their bridges are made again once the
    /// agent answers: `reattach`).
    func restore(_ p: VMPod, from state: [String: String]) {
        p.eventSeq = state["event_seq"].flatMap { UInt64($0) } ?? 0
        guard let json = state["containers"], let records = try? JSONDecoder().decode([Record].self, from: Data(json.utf8)) else { return }
        for r in records {
            let c = VMContainer(id: r.id, bundle: r.bundle, shareDir: p.spec.sharePath + "/" + r.id)
            c.mounts = r.mounts
            c.paused = r.paused
            c.disk = r.disk
            for rp in r.processes {
                let proc = VMProcess(execID: rp.execID, stdio: StdioPaths(stdin: rp.stdin, stdout: rp.stdout, stderr: rp.stderr, terminal: rp.terminal))
                proc.pid = rp.pid
                proc.started = rp.started
                if let code = rp.exitStatus { proc.exit = (Self.status(code), rp.exitedAt) }
                proc.finished = rp.finished
                c.processes[rp.execID] = proc
            }
            p.containers[r.id] = c
        }
    }

    /// After a restart, once the agent answers: output bridges for the processes whose
    /// output had not all arrived, then the agent's events from where the last daemon
    /// stopped (an exit in between is reported now, once).
    func reattach(_ s: Sandbox, _ p: VMPod) {
        for c in p.containers.values {
            for proc in c.processes.values where !proc.finished {
                bridge(s, p, c, proc, resume: true)
                if proc.exit != nil { reportExit(s, c, proc) }
            }
        }
        followEvents(s, p)
    }

    public func release(_ s: Sandbox) {
        guard let p = podOf(s) else { return }
        for c in p.containers.values {
            for proc in c.processes.values { proc.bridge?.close() }
            unprepare(c)
        }
        p.containers.removeAll()
        Mounts.unmountAll(under: p.spec.sharePath)
    }
}
