import KuasarSystem
import KuasarWire
import KuasarContainer

/// A TaskBackend in front of another: every call goes to `inner` unless a subclass
/// overrides it (the guest agent's stream and share checks in front of the engine, the
/// vm kind's shim path booting its VM at the first Create).
open class TaskBackendForwarder<Inner: TaskBackend>: TaskBackend {
    public let inner: Inner

    public init(inner: Inner) { self.inner = inner }

    open var events: TaskEventSink? {
        get { inner.events }
        set { inner.events = newValue }
    }

    open func create(_ r: Containerd_Task_V2_CreateTaskRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_CreateTaskResponse>) throws { try inner.create(r, in: s, reply: reply) }
    open func start(_ r: Containerd_Task_V2_StartRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StartResponse>) throws { try inner.start(r, in: s, reply: reply) }
    open func delete(_ r: Containerd_Task_V2_DeleteRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_DeleteResponse>) throws { try inner.delete(r, in: s, reply: reply) }
    open func exec(_ r: Containerd_Task_V2_ExecProcessRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws { try inner.exec(r, in: s, reply: reply) }
    open func state(_ r: Containerd_Task_V2_StateRequest, in s: Sandbox) throws -> Containerd_Task_V2_StateResponse { try inner.state(r, in: s) }
    open func pids(_ r: Containerd_Task_V2_PidsRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_PidsResponse>) throws { try inner.pids(r, in: s, reply: reply) }
    open func pause(_ r: Containerd_Task_V2_PauseRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws { try inner.pause(r, in: s, reply: reply) }
    open func resume(_ r: Containerd_Task_V2_ResumeRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws { try inner.resume(r, in: s, reply: reply) }
    open func kill(_ r: Containerd_Task_V2_KillRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws { try inner.kill(r, in: s, reply: reply) }
    open func resizePty(_ r: Containerd_Task_V2_ResizePtyRequest, in s: Sandbox) throws { try inner.resizePty(r, in: s) }
    open func closeIO(_ r: Containerd_Task_V2_CloseIORequest, in s: Sandbox) throws { try inner.closeIO(r, in: s) }
    open func update(_ r: Containerd_Task_V2_UpdateTaskRequest, in s: Sandbox, reply: @escaping Reply<Void>) throws { try inner.update(r, in: s, reply: reply) }
    open func wait(_ r: Containerd_Task_V2_WaitRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_WaitResponse>) throws -> (() -> Void)? { try inner.wait(r, in: s, reply: reply) }
    open func stats(_ r: Containerd_Task_V2_StatsRequest, in s: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StatsResponse>) throws { try inner.stats(r, in: s, reply: reply) }
    open func taskPid(_ id: String, in s: Sandbox) -> UInt32 { inner.taskPid(id, in: s) }
    open func isEmpty(_ s: Sandbox) -> Bool { inner.isEmpty(s) }
    open func stopAll(in s: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void) { inner.stopAll(in: s, timeoutSecs: timeoutSecs, done: done) }
    open func killAll(in s: Sandbox) { inner.killAll(in: s) }
    open func release(_ s: Sandbox) { inner.release(s) }
    open func persistentState(_ s: Sandbox) -> [String: String] { inner.persistentState(s) }
    open func exitRecordNames(_ s: Sandbox, state: [String: String]) -> [String] { inner.exitRecordNames(s, state: state) }
    open func recover(_ s: Sandbox, state: [String: String], exits: ExitRecords) { inner.recover(s, state: state, exits: exits) }
}
