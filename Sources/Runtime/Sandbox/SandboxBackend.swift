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

/// The seam every sandbox kind plugs into (namespace pods, microVMs, wasm, external
/// runtimes). The Controller keeps what all kinds share — ids, the registry, state files,
/// Wait and its waiters, Status, Shutdown's bookkeeping — and asks the kind for the rest.
///
/// Every method runs on the loop. Create, Start and Stop complete through their
/// callback, because a kind may have to wait (a VM boots, an agent answers); a backend
/// must call each completion exactly once and may call it before returning.
public protocol SandboxBackend: AnyObject {
    /// The kind's name, as `[sandboxers]` in the config maps names to it.
    var kind: String { get }
    /// Why this kind cannot make sandboxes on this host now (nil: it can).
    var unavailableReason: String? { get }
    /// Told by the backend when a sandbox ended on its own (its holder, its VMM, its
    /// program exited): the Controller then marks it stopped with this status.
    var onSandboxExit: ((Sandbox, ExitStatus?) -> Void)? { get set }

    /// Makes the sandbox's resources (namespaces, a VM's share, ...). The sandbox is
    /// registered with its state directory; on failure the Controller removes it.
    func create(_ sandbox: Sandbox, _ request: SandboxCreateRequest, done: @escaping (Result<Void, RPCError>) -> Void)
    /// Brings the sandbox up; answers how containerd reaches its Task API.
    func start(_ sandbox: Sandbox, done: @escaping (Result<SandboxStarted, RPCError>) -> Void)
    /// Stops what runs in the sandbox (its containers get `timeoutSecs` after SIGTERM, 0:
    /// SIGKILL at once), then the sandbox itself; `done` once all of it is gone.
    func stop(_ sandbox: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void)
    /// Releases whatever the kind holds for the sandbox beyond its state directory (the
    /// registry removes that); called by Shutdown after Stop, or instead of it.
    func shutdown(_ sandbox: Sandbox)
    /// Controller.Update's resources (the sandbox spec's linux.resources).
    func update(_ sandbox: Sandbox, resources: OCISpec.Resources) throws
    /// Controller.Metrics: the sandbox's usage as containerd's typed Any.
    func metrics(_ sandbox: Sandbox, done: @escaping (Result<Google_Protobuf_Any, RPCError>) -> Void)
    /// The pid containerd is told (Start, Status), 0 when the kind has none to give.
    func pid(_ sandbox: Sandbox) -> UInt32
    /// Controller.Status verbose: what the kind can say about the sandbox (JSON values).
    func statusInfo(_ sandbox: Sandbox) -> [String: Any]
    /// The kind's own state, saved in the sandbox's state file with it and handed back
    /// to `recover` (strings only: the file stays readable and stable across releases).
    func persistentState(_ sandbox: Sandbox) -> [String: String]
    /// After a daemon restart: re-attach to what the sandbox's `state` names (processes,
    /// VMs). Called once per recovered sandbox of this kind, after its containers.
    func recover(_ sandbox: Sandbox, state: [String: String], exits: ExitRecords)
    /// The keeper's exit records the sandbox's `state` names (kept at recovery).
    func exitRecordNames(_ sandbox: Sandbox, state: [String: String]) -> [String]
    /// The daemon is exiting (its pods stay or go by on_exit, elsewhere): work of the kind's
    /// own that no next daemon could finish ends now.
    func daemonExiting()
    /// What runs the containers of a sandbox of this kind that containerd 1.6/1.7 makes
    /// through the shim v2 protocol (no Controller, no pod holder); nil: no shim path.
    var shimTasks: TaskBackend? { get }
}

extension SandboxBackend {
    public func exitRecordNames(_ sandbox: Sandbox, state: [String: String]) -> [String] { [] }
    public var shimTasks: TaskBackend? { nil }
    public func daemonExiting() {}
}

/// Controller.Create, as a kind sees it.
public struct SandboxCreateRequest {
    public var id: String
    public var namespace: String
    /// containerd's CNI network namespace, when it made one.
    public var netnsPath: String
    /// The CRI's PodSandboxConfig (hostname, DNS, sysctls, ...), when containerd sent one.
    public var podConfig: Runtime_V1_PodSandboxConfig?
    public var labels: [String: String]

    public init(id: String, namespace: String, netnsPath: String = "", podConfig: Runtime_V1_PodSandboxConfig? = nil, labels: [String: String] = [:]) {
        self.id = id
        self.namespace = namespace
        self.netnsPath = netnsPath
        self.podConfig = podConfig
        self.labels = labels
    }
}

/// How a started sandbox serves its containers.
public enum SandboxStarted {
    /// The daemon serves the Task API at `<state dir>/task.sock` with this backend.
    case tasks(TaskBackend)
    /// Something else serves it (a task-serving sandbox program): containerd dials this.
    case address(String, version: UInt32)
}

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

/// What the daemon hands the code that builds its backends (the executable's wiring).
public struct BackendContext {
    public let registry: SandboxRegistry
    /// Linux containers behind the Task API, for kinds that run their containers so.
    public let containers: ContainerTaskBackend
    public let reactor: Reactor
    public let logger: Logger

    public init(registry: SandboxRegistry, containers: ContainerTaskBackend, reactor: Reactor, logger: Logger) {
        self.registry = registry
        self.containers = containers
        self.reactor = reactor
        self.logger = logger
    }
}

/// Builds the kinds a daemon serves, once its registry and reactor exist.
public typealias BackendFactory = (BackendContext) -> [SandboxBackend]
