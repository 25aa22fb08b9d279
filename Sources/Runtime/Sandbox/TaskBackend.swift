#if canImport(Glibc)
import Glibc
#endif
import Logging
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer

/// What runs the containers of a sandbox behind the Task API (`containerd.task.v2/v3`).
/// The Task service decodes, validates the namespace, answers and publishes the events
/// of every call in the shim protocol's order; the backend does the work and keeps the
/// sandbox's state file current. Calls that finish later answer through `reply`.
public protocol TaskBackend: AnyObject {
    typealias Reply<Response> = (Result<Response, RPCError>) -> Void

    /// Where the backend reports exits and OOM kills, each once, an exit only after the
    /// process's output reached its FIFOs.
    var events: TaskEventSink? { get set }

    func create(_ r: Containerd_Task_V2_CreateTaskRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_CreateTaskResponse>) throws
    func start(_ r: Containerd_Task_V2_StartRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StartResponse>) throws
    func delete(_ r: Containerd_Task_V2_DeleteRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_DeleteResponse>) throws
    /// The calls below may need a process of their own (an external runtime's): each
    /// answers through `reply`, at once or later.
    func exec(_ r: Containerd_Task_V2_ExecProcessRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws
    func state(_ r: Containerd_Task_V2_StateRequest, in sandbox: Sandbox) throws -> Containerd_Task_V2_StateResponse
    func pids(_ r: Containerd_Task_V2_PidsRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_PidsResponse>) throws
    func pause(_ r: Containerd_Task_V2_PauseRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws
    func resume(_ r: Containerd_Task_V2_ResumeRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws
    func kill(_ r: Containerd_Task_V2_KillRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws
    func resizePty(_ r: Containerd_Task_V2_ResizePtyRequest, in sandbox: Sandbox) throws
    func closeIO(_ r: Containerd_Task_V2_CloseIORequest, in sandbox: Sandbox) throws
    func update(_ r: Containerd_Task_V2_UpdateTaskRequest, in sandbox: Sandbox, reply: @escaping Reply<Void>) throws
    /// Answers once the process has exited; returns what cancels the wait (a client that
    /// went away), nil when it was answered at once.
    func wait(_ r: Containerd_Task_V2_WaitRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_WaitResponse>) throws -> (() -> Void)?
    func stats(_ r: Containerd_Task_V2_StatsRequest, in sandbox: Sandbox, reply: @escaping Reply<Containerd_Task_V2_StatsResponse>) throws
    /// The pid of the task's init, for Connect (0: none).
    func taskPid(_ id: String, in sandbox: Sandbox) -> UInt32
    /// True when the sandbox runs no container (Task.Shutdown may then end a shim-path sandbox).
    func isEmpty(_ sandbox: Sandbox) -> Bool
    /// Controller.Stop: every container gets SIGTERM (SIGKILL when `timeoutSecs` is 0),
    /// SIGKILL after `timeoutSecs`; `done` once all have exited.
    func stopAll(in sandbox: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void)
    /// SIGKILL to everything the sandbox runs (its pod ended, Shutdown).
    func killAll(in sandbox: Sandbox)
    /// The sandbox is being removed: release what its containers hold.
    func release(_ sandbox: Sandbox)
    /// Its own state of the sandbox's containers, saved in the sandbox's state file (for
    /// backends whose containers the registry does not record itself).
    func persistentState(_ sandbox: Sandbox) -> [String: String]
    /// The keeper's exit records that state names (kept at recovery, not swept away).
    func exitRecordNames(_ sandbox: Sandbox, state: [String: String]) -> [String]
    /// After a restart: its containers from `state`, watched again.
    func recover(_ sandbox: Sandbox, state: [String: String], exits: ExitRecords)
}

extension TaskBackend {
    public func persistentState(_ sandbox: Sandbox) -> [String: String] { [:] }
    public func exitRecordNames(_ sandbox: Sandbox, state: [String: String]) -> [String] { [] }
    public func recover(_ sandbox: Sandbox, state: [String: String], exits: ExitRecords) {}
}

/// Where task events go (the Task service publishes them to containerd).
public protocol TaskEventSink: AnyObject {
    func taskExited(_ sandbox: Sandbox, containerID: String, execID: String, pid: UInt32, status: ExitStatus, at: WallTime?)
    func taskOOM(_ sandbox: Sandbox, containerID: String)
}
