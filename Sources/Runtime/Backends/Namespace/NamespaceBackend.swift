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
import KuasarContainer
import KuasarSandbox
import KuasarSandboxKinds

/// The namespace kind (the original's runc-sandboxer, without runc): a CRI pod is a
/// holder process in the pod's namespaces, pinned ns files, its hostname/DNS/hosts files
/// and /dev/shm, and a cgroup parent; its containers are Linux containers of the OCI
/// engine, served by the daemon's Task API.
public final class NamespaceBackend: SandboxBackend {
    public let kind: String
    public var unavailableReason: String? { whyUnavailable() }
    private let whyUnavailable: () -> String?
    public var onSandboxExit: ((Sandbox, ExitStatus?) -> Void)?

    let registry: SandboxRegistry
    /// What runs the pods' containers: the OCI engine, or (kind `oci:<runtime>`) an
    /// external OCI runtime. The pod itself is the same either way.
    let tasks: TaskBackend
    let reactor: Reactor
    let logger: Logger

    public init(kind: String = "namespace", registry: SandboxRegistry, tasks: TaskBackend, reactor: Reactor, logger: Logger,
                unavailableReason: @escaping () -> String? = { nil }) {
        self.kind = kind
        whyUnavailable = unavailableReason
        self.registry = registry
        self.tasks = tasks
        self.reactor = reactor
        self.logger = logger
    }

    public func create(_ s: Sandbox, _ request: SandboxCreateRequest, done: @escaping (Result<Void, RPCError>) -> Void) {
        do {
            if !request.netnsPath.isEmpty && !Files.exists(request.netnsPath) {
                throw RPCError(.invalidArgument, "netns_path \(request.netnsPath) does not exist")
            }
            let settings = try PodSettings(request.podConfig, netnsPath: request.netnsPath)
            do {
                try PodSandbox.prepare(s, settings: settings, netnsPath: request.netnsPath, supervisor: registry.engine.supervisor) { [weak self, weak s] status in
                    guard let self, let s else { return }
                    self.holderExited(s, status)
                }
            } catch {
                throw RPCError(.internal, "sandbox \(s.id): the pod's namespaces: \(error)")
            }
            done(.success(()))
        } catch {
            done(.failure(RPCError.from(error)))
        }
    }

    public func start(_ s: Sandbox, done: @escaping (Result<SandboxStarted, RPCError>) -> Void) {
        done(.success(.tasks(tasks)))
        // The sandbox's cgroup parent, made while containerd dials the Task API (its
        // first Task.Create then only makes the container's own directories).
        if let host = registry.engine.cgroups {
            reactor.schedule(afterNS: 0) { [weak s, logger] in
                guard let s, s.state == .ready else { return }
                do { _ = try host.create(s.cgroupParent) } catch { logger.debug("sandbox \(s.id): cgroup parent: \(error)") }
            }
        }
    }

    public func stop(_ s: Sandbox, timeoutSecs: UInt32, done: @escaping () -> Void) {
        tasks.stopAll(in: s, timeoutSecs: timeoutSecs) { [weak self, weak s] in
            guard let self, let s else { done(); return }
            self.stopHolder(s, then: done)
        }
    }

    /// Ends the pod's holder (SIGKILL: as a namespace init it ignores anything else);
    /// `done` once it is gone and the sandbox is marked stopped.
    private func stopHolder(_ s: Sandbox, then done: @escaping () -> Void) {
        guard s.holderPidfd >= 0 else {
            onSandboxExit?(s, nil)
            done()
            return
        }
        // Fired when the Controller marks it stopped, once holderExited has run.
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
        if !s.holderStopping && s.state != .stopped {
            logger.warning("sandbox \(s.id): its holder \(s.holder?.pid ?? 0) ended (\(status.map { "\($0)" } ?? "status unknown")); the pod is stopped")
        }
        tasks.killAll(in: s)
        onSandboxExit?(s, status ?? .exited(255))
    }

    public func shutdown(_ s: Sandbox) {
        // The holder, the pins, /dev/shm and the cgroup parent go with the registry's
        // remove, which the shim path shares.
        tasks.killAll(in: s)
    }

    public func update(_ s: Sandbox, resources: OCISpec.Resources) throws {
        guard let host = registry.engine.cgroups else { throw RPCError(.failedPrecondition, "no cgroups on this host") }
        do { try host.create(s.cgroupParent).apply(Container.resources(resources)) } catch {
            throw RPCError(.internal, "update \(s.id): resources: \(error)")
        }
    }

    public func metrics(_ s: Sandbox, done: @escaping (Result<Google_Protobuf_Any, RPCError>) -> Void) {
        guard let host = registry.engine.cgroups else { return done(.failure(RPCError(.failedPrecondition, "no cgroups on this host"))) }
        done(Result { try CgroupMetrics.any(host.existing(s.cgroupParent)) }.mapError(RPCError.from))
    }

    public func pid(_ s: Sandbox) -> UInt32 { UInt32(s.holder?.pid ?? 0) }

    public func statusInfo(_ s: Sandbox) -> [String: Any] {
        ["stateDir": s.stateDir, "cgroup": s.cgroupParent, "namespaces": s.pinned, "pid": Int(s.holder?.pid ?? 0)]
    }

    /// The holder's pid and start time are fields of the state file itself; what the
    /// pod's TaskBackend keeps of its containers rides along.
    public func persistentState(_ s: Sandbox) -> [String: String] { tasks.persistentState(s) }

    public func exitRecordNames(_ s: Sandbox, state: [String: String]) -> [String] { tasks.exitRecordNames(s, state: state) }

    public var shimTasks: TaskBackend? { tasks }

    /// Re-watches a recovered pod's holder; one that ended while no daemon ran stops the
    /// pod now, with the status the keeper recorded.
    public func recover(_ s: Sandbox, state: [String: String], exits: ExitRecords) {
        s.taskBackend = tasks
        tasks.recover(s, state: state, exits: exits)
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
}
