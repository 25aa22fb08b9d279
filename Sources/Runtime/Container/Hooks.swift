#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KuasarOCI
import KuasarSystem
import KuasarReactor

/// OCI lifecycle hooks. Each gets the container's state JSON on stdin and runs with a
/// timeout (its own `timeout`, else 30 s). prestart/createRuntime/poststart/poststop run
/// in the runtime's namespaces, started by the daemon; createContainer/startContainer
/// run inside the container's namespaces (joined like an exec, so the path resolves in
/// the container's root). Hooks run one after another, on the reactor: nothing blocks.
public enum HookPhase: String, Sendable, CaseIterable {
    case prestart, createRuntime, createContainer, startContainer, poststart, poststop

    var inContainer: Bool { self == .createContainer || self == .startContainer }
}

struct HookRunner {
    static func hooks(_ spec: OCISpec, _ phase: HookPhase) -> [OCISpec.Hook] {
        switch phase {
        case .prestart: return spec.hooks?.prestart ?? []
        case .createRuntime: return spec.hooks?.createRuntime ?? []
        case .createContainer: return spec.hooks?.createContainer ?? []
        case .startContainer: return spec.hooks?.startContainer ?? []
        case .poststart: return spec.hooks?.poststart ?? []
        case .poststop: return spec.hooks?.poststop ?? []
        }
    }

    /// The state document the runtime spec gives hooks on stdin.
    static func state(_ c: Container, status: String) -> [UInt8] {
        var obj: [String: Any] = ["ociVersion": c.spec.ociVersion, "id": c.id, "status": status, "bundle": c.bundle]
        if c.initProcess.pid > 0 { obj["pid"] = Int(c.initProcess.pid) }
        if let a = c.spec.annotations { obj["annotations"] = a }
        return JSONWriter.bytes(obj)
    }

    /// Runs the hooks of `phases` in order; `done` gets the first failure (nil: all ran).
    static func run(_ phases: [HookPhase], container c: Container, status: String, done: @escaping (ContainerError?) -> Void) {
        let list = phases.flatMap { p in hooks(c.spec, p).map { (p, $0) } }
        guard !list.isEmpty else { done(nil); return }
        let state = state(c, status: status)
        func next(_ i: Int) {
            guard i < list.count else { done(nil); return }
            runOne(list[i].1, phase: list[i].0, container: c, state: state) { err in
                if let err { done(err) } else { next(i + 1) }
            }
        }
        next(0)
    }

    static func runOne(_ hook: OCISpec.Hook, phase: HookPhase, container c: Container, state: [UInt8],
                       done: @escaping (ContainerError?) -> Void) {
        let engine = c.engine
        let name = "\(phase.rawValue) hook \(hook.path)"
        do {
            let pipe = try makePipe(nonBlocking: false)
            let inRead = pipe.first.take(), inWrite = pipe.second.take()
            var inReadOpen = true
            defer { if inReadOpen { _ = close(inRead) } }
            // The state goes in as the hook reads it (annotations can make it larger than
            // a pipe holds; a hook that never reads must not stall the loop).
            let feeder = PipeFeeder(reactor: engine.reactor, fd: inWrite, bytes: state)
            let null = try sys("open", "/dev/null") { open("/dev/null", O_WRONLY | O_CLOEXEC) }
            defer { _ = close(null) }
            let onExit: (ExitStatus) -> Void = { status in
                feeder.close()
                done(status == .exited(0) ? nil : ContainerError(.failed, "\(name) \(status)"))
            }
            var finished = false
            var timer: TimerID?
            let pid: pid_t
            // `"args": []` is valid JSON for a hook: argv[0] is then its path.
            let argv = (hook.args ?? []).isEmpty ? [hook.path] : hook.args!
            if phase.inContainer {
                guard c.initProcess.pidfdRaw >= 0 else { throw ContainerError(.failedPrecondition, "\(name): the container is not running") }
                var process = OCISpec.Process(args: argv, env: hook.env ?? [], cwd: "/")
                process.args![0] = hook.path
                let child = try ContainerLauncher.launch(
                    spec: c.spec, process: process, target: .exec(pidfd: c.initProcess.pidfdRaw, namespaces: c.execNamespaces & ~NamespaceFlag.user),
                    bundle: c.bundle, stdio: [(inRead, 0), (null, 1), (null, 2)], console: false, cgroup: c.cgroup,
                    selfPidNamespace: engine.selfPidNamespace)
                pid = child.pid
                var go = UInt8(ascii: "G")
                _ = send(child.sync.rawValue, &go, 1, Int32(MSG_NOSIGNAL))
                child.sync.close()
                try engine.supervisor.adopt(SpawnedProcess(pid: child.pid, pidfd: child.pidfd.take().adopted())) { [weak reactor = engine.reactor] s in
                    finished = true
                    if let timer { reactor?.cancel(timer) }
                    onExit(s)
                }
            } else {
                var spec = ProcessSpec(executable: hook.path, arguments: argv, environment: hook.env ?? [],
                                       fdMap: [(inRead, 0), (null, 1), (null, 2)])
                spec.forkStyle = false
                pid = try engine.supervisor.spawn(spec) { [weak reactor = engine.reactor] s in
                    finished = true
                    if let timer { reactor?.cancel(timer) }
                    onExit(s)
                }
            }
            _ = close(inRead)
            inReadOpen = false
            feeder.start()
            // A timeout of 18446744074 s or more does not fit in nanoseconds: it waits forever.
            let (scaled, overflow) = UInt64(max(1, hook.timeout ?? 30)).multipliedReportingOverflow(by: 1_000_000_000)
            let timeout = overflow ? UInt64.max : scaled
            let logger = engine.logger
            timer = engine.reactor.schedule(afterNS: timeout) {
                if !finished {
                    logger.warning("\(name) timed out after \(timeout / 1_000_000_000) s; killing it")
                    kill(pid, SIGKILL)
                }
            }
        } catch let e as ContainerError {
            done(e)
        } catch {
            done(ContainerError("\(name): \(error)", cause: error))
        }
    }
}
