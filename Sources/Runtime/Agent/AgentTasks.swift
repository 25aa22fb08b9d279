#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarSystem
import KuasarWire
import KuasarContainer
import KuasarSandbox

/// The agent's Task backend: the container engine's (ContainerTaskBackend), with what a
/// guest adds in front of it — `stream:` stdio kept in the agent for the host to pull,
/// and bundles confined to the host's share (a path outside it is refused before
/// anything is read).
final class AgentTasks: TaskBackendForwarder<ContainerTaskBackend>, TaskEventSink {
    let streams: StdioStreams
    /// Bundles must resolve below this directory (nil: anywhere, `--listen` on a host).
    let bundleRoot: String?
    /// The engine reports to the agent, which reports here.
    private weak var sink: TaskEventSink?
    override var events: TaskEventSink? {
        get { sink }
        set { sink = newValue }
    }

    init(inner: ContainerTaskBackend, streams: StdioStreams, bundleRoot: String?) {
        self.streams = streams
        self.bundleRoot = bundleRoot.map { Self.resolved($0) ?? $0 }
        super.init(inner: inner)
        inner.events = self
    }

    static func resolved(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// Runs before a bundle is looked at: the guest's share may still be on its way.
    var beforeBundle: (() -> Void)?

    /// The bundle, symlinks resolved, must be the share or below it.
    func checkBundle(_ bundle: String) throws {
        beforeBundle?()
        guard let root = bundleRoot else { return }
        guard bundle.hasPrefix("/") else { throw RPCError(.invalidArgument, "bundle \"\(bundle)\" must be an absolute path") }
        guard let real = Self.resolved(bundle) else {
            throw RPCError(.notFound, "bundle \(bundle) does not exist in the guest (the host places bundles under \(root))")
        }
        guard real == root || real.hasPrefix(root + "/") else {
            throw RPCError(.permissionDenied, "bundle \(bundle) (\(real)) is outside the host's share \(root): the agent runs only bundles the host placed there")
        }
    }

    // MARK: TaskEventSink (from the engine)

    func taskExited(_ sandbox: Sandbox, containerID: String, execID: String, pid: UInt32, status: ExitStatus, at: WallTime?) {
        // The engine reports an exit after its own holds on the output went: now the
        // agent's go too, and the host's reads reach EOF once the bytes are out.
        streams.processExited(containerID, execID)
        events?.taskExited(sandbox, containerID: containerID, execID: execID, pid: pid, status: status, at: at)
    }

    func taskOOM(_ sandbox: Sandbox, containerID: String) { events?.taskOOM(sandbox, containerID: containerID) }

    // MARK: TaskBackend

    override func create(_ r: Containerd_Task_V2_CreateTaskRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_CreateTaskResponse>) throws {
        try Identifier.validate(r.id, what: "container")
        try checkBundle(r.bundle)
        guard sandbox.containers[r.id] == nil, !sandbox.pendingCreates.contains(r.id) else {
            throw RPCError(.alreadyExists, "container \(r.id) already exists")
        }
        // A rootfs the host gives as an overlay needs the module, loaded on first use.
        if getpid() == 1, r.rootfs.contains(where: { $0.type == "overlay" }) {
            do { try GuestInit.ensureModule("overlay") } catch { throw RPCError(.failedPrecondition, "overlay rootfs: the guest cannot load overlay: \(error)") }
        }
        // A disk the host hot-plugged: its driver and filesystem loaded, then found by
        // serial once the guest has probed it.
        if let i = r.rootfs.firstIndex(where: { $0.source.hasPrefix(AgentProtocol.diskSourceScheme) }) {
            let serial = String(r.rootfs[i].source.dropFirst(AgentProtocol.diskSourceScheme.count))
            if getpid() == 1 {
                for m in ["virtio_blk", r.rootfs[i].type] {
                    do { try GuestInit.ensureModule(m) } catch { throw RPCError(.failedPrecondition, "rootfs disk \(serial): the guest cannot load \(m): \(error)") }
                }
            }
            let deadline = MonotonicClock.nanoseconds() + Self.diskProbeTimeoutNS
            func resolve() {
                if let dev = Self.disk(serial: serial) {
                    var r = r
                    r.rootfs[i].source = dev
                    do { try createNow(r, in: sandbox, reply: reply) } catch { reply(.failure(RPCError.from(error))) }
                } else if MonotonicClock.nanoseconds() > deadline {
                    reply(.failure(RPCError(.deadlineExceeded, "rootfs disk \(serial): no virtio disk with that serial appeared within \(Self.diskProbeTimeoutNS / 1_000_000_000) s")))
                } else {
                    _ = streams.reactor.schedule(afterNS: 10_000_000) { resolve() }
                }
            }
            return resolve()
        }
        try createNow(r, in: sandbox, reply: reply)
    }

    static let diskProbeTimeoutNS: UInt64 = 20_000_000_000

    /// The block device whose virtio serial is `serial` (/dev/vdX), once the guest has it.
    static func disk(serial: String) -> String? {
        for name in Files.list("/sys/block").sorted() where name.hasPrefix("vd") {
            if (try? Files.readString("/sys/block/\(name)/serial"))?.trimmingWhitespace == serial, Files.exists("/dev/" + name) { return "/dev/" + name }
        }
        return nil
    }

    private func createNow(_ r: Containerd_Task_V2_CreateTaskRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_CreateTaskResponse>) throws {
        var r = r
        try streams.resolve(container: r.id, exec: "", stdin: &r.stdin, stdout: &r.stdout, stderr: &r.stderr, terminal: r.terminal)
        let id = r.id
        do {
            try inner.create(r, in: sandbox) { [weak self] result in
                if case .failure = result { self?.streams.remove(container: id, exec: nil) }
                reply(result)
            }
        } catch {
            streams.remove(container: id, exec: nil)
            throw error
        }
    }

    override func exec(_ r: Containerd_Task_V2_ExecProcessRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws {
        try Identifier.validate(r.execID, what: "exec")
        guard let c = sandbox.containers[r.id] else { throw RPCError(.notFound, "container \(r.id) not found in sandbox \(sandbox.id)") }
        guard c.execs[r.execID] == nil else { throw RPCError(.alreadyExists, "exec \(r.execID) already exists in container \(r.id)") }
        var r = r
        try streams.resolve(container: r.id, exec: r.execID, stdin: &r.stdin, stdout: &r.stdout, stderr: &r.stderr, terminal: r.terminal)
        let (id, execID) = (r.id, r.execID)
        do {
            try inner.exec(r, in: sandbox) { [weak self] result in
                if case .failure = result { self?.streams.remove(container: id, exec: execID) }
                reply(result)
            }
        } catch {
            streams.remove(container: id, exec: execID)
            throw error
        }
    }

    override func delete(_ r: Containerd_Task_V2_DeleteRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_DeleteResponse>) throws {
        try inner.delete(r, in: sandbox) { [weak self] result in
            if case .success = result { self?.streams.remove(container: r.id, exec: r.execID.isEmpty ? nil : r.execID) }
            reply(result)
        }
    }

    override func release(_ sandbox: Sandbox) {
        inner.release(sandbox)
        streams.closeAll()
    }
}
