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

/// The namespace kind (the original's runc-sandboxer, without runc): a CRI pod is a
/// holder process in the pod's namespaces, pinned ns files, its hostname/DNS/hosts files
/// and /dev/shm, and a cgroup parent; its containers are Linux containers of the OCI
/// engine, served by the daemon's Task API.
public final class NamespaceBackend: SandboxBackend {
    public let kind = "namespace"
    public var unavailableReason: String? { nil }
    public var onSandboxExit: ((Sandbox, ExitStatus?) -> Void)?

    let registry: SandboxRegistry
    let containers: ContainerTaskBackend
    let reactor: Reactor
    let logger: Logger

    public init(registry: SandboxRegistry, containers: ContainerTaskBackend, reactor: Reactor, logger: Logger) {
        self.registry = registry
        self.containers = containers
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
        done(.success(.tasks(containers)))
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
        let running = s.containers.values.filter { $0.state == .running || $0.state == .paused || $0.state == .created }
        guard !running.isEmpty else {
            stopHolder(s, then: done)
            return
        }
        for c in running {
            if c.state == .paused { try? c.resume() }
            try? c.kill(signal: timeoutSecs == 0 ? SIGKILL : SIGTERM, all: false)
        }
        var remaining = running.count
        var timer: TimerID?
        for c in running {
            c.initProcess.wait { [weak self] _, _ in
                remaining -= 1
                guard remaining == 0, let self else { return }
                if let timer { self.reactor.cancel(timer) }
                self.stopHolder(s, then: done)
            }
        }
        if timeoutSecs > 0 {
            timer = reactor.schedule(afterNS: UInt64(timeoutSecs) * 1_000_000_000) {
                for c in running where c.state != .stopped { try? c.kill(signal: SIGKILL, all: true) }
            }
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
        for c in s.containers.values where c.state == .running || c.state == .paused || c.state == .created {
            try? c.kill(signal: SIGKILL, all: true)
        }
        onSandboxExit?(s, status ?? .exited(255))
    }

    public func shutdown(_ s: Sandbox) {
        // The holder, the pins, /dev/shm and the cgroup parent go with the registry's
        // remove, which the shim path shares.
        for c in s.containers.values { try? c.kill(signal: SIGKILL, all: true) }
    }

    public func update(_ s: Sandbox, resources: OCISpec.Resources) throws {
        guard let host = registry.engine.cgroups else { throw RPCError(.failedPrecondition, "no cgroups on this host") }
        do { try host.create(s.cgroupParent).apply(Container.resources(resources)) } catch {
            throw RPCError(.internal, "update \(s.id): resources: \(error)")
        }
    }

    public func metrics(_ s: Sandbox) throws -> Google_Protobuf_Any {
        guard let host = registry.engine.cgroups else { throw RPCError(.failedPrecondition, "no cgroups on this host") }
        return try CgroupMetrics.any(host.existing(s.cgroupParent))
    }

    public func pid(_ s: Sandbox) -> UInt32 { UInt32(s.holder?.pid ?? 0) }

    public func statusInfo(_ s: Sandbox) -> [String: Any] {
        ["stateDir": s.stateDir, "cgroup": s.cgroupParent, "namespaces": s.pinned, "pid": Int(s.holder?.pid ?? 0)]
    }

    /// The holder's pid and start time are fields of the state file itself.
    public func persistentState(_ s: Sandbox) -> [String: String] { [:] }

    /// Re-watches a recovered pod's holder; one that ended while no daemon ran stops the
    /// pod now, with the status the keeper recorded.
    public func recover(_ s: Sandbox, state: [String: String], exits: ExitRecords) {
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
