#if canImport(Glibc)
import Glibc
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

// The daemon's side of the sandbox layer: how a kind is asked for a sandbox. Apart from
// KuasarSandbox (the sandboxes, their tasks and state), which the guest agent links too:
// a Create carries containerd's CRI PodSandboxConfig, the host's wire, which the agent
// never decodes.

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
