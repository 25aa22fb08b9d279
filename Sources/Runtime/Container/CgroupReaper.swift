#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarOCI
import KuasarSystem
import KuasarReactor

/// Removes cgroups whose processes were killed, without blocking the loop. The kernel
/// answers EBUSY to rmdir until the last task is released, usually a few milliseconds
/// after SIGKILL; each busy cgroup is tried again on a timer with a growing delay
/// (1 ms doubling to 256 ms, ~10 s in all). The first error is kept and logged once
/// when the cgroup is given up on. Cgroups are removed deepest first in every pass, so
/// a sandbox's parent queued after its containers goes once they are gone.
public final class CgroupReaper {
    struct Pending {
        let cgroup: Cgroup
        let owner: String
        let kill: Bool
        var firstError: SystemError?
        let since: UInt64
    }

    let reactor: Reactor
    let logger: Logger
    private var pending: [Pending] = []
    private var timer: TimerID?
    private var delayNS: UInt64 = 1_000_000
    static let giveUpNS: UInt64 = 10_000_000_000

    init(reactor: Reactor, logger: Logger) {
        self.reactor = reactor
        self.logger = logger
    }

    /// Kills what is left in `cgroup` and removes it (with any cgroups below it), now or
    /// later. The first pass kills what the cgroup itself holds, as that is the usual
    /// case and costs one read; the retries kill through the whole subtree.
    public func remove(_ cgroup: Cgroup, owner: String, kill: Bool = true) {
        if kill { cgroup.killAll() }
        let (busy, error) = cgroup.removeOnce()
        if !busy {
            if let error { logger.warning("\(owner): cgroup \(cgroup.path) not removed: \(error)") }
            return
        }
        pending.append(Pending(cgroup: cgroup, owner: owner, kill: kill, firstError: error, since: MonotonicClock.nanoseconds()))
        if timer == nil { delayNS = 1_000_000; arm() }
    }

    private func arm() {
        timer = reactor.schedule(afterNS: delayNS) { [weak self] in self?.retry() }
    }

    private func retry() {
        timer = nil
        let now = MonotonicClock.nanoseconds()
        var still: [Pending] = []
        // Deepest first across all of them: children before a parent queued with them.
        for var p in pending.sorted(by: { $0.cgroup.path.count > $1.cgroup.path.count }) {
            let (busy, error) = p.cgroup.removeOnce()
            if p.firstError == nil { p.firstError = error }
            if !busy {
                if let e = p.firstError { logger.warning("\(p.owner): cgroup \(p.cgroup.path) not removed: \(e)") }
                continue
            }
            if now &- p.since >= Self.giveUpNS {
                let why = p.firstError.map { "\($0)" } ?? "rmdir: still busy"
                logger.warning("\(p.owner): cgroup \(p.cgroup.path) still busy after \(Self.giveUpNS / 1_000_000_000) s; left in place (\(why))")
                continue
            }
            // Something may have been started in it since: kill again.
            if p.kill { p.cgroup.killAll(subtree: true) }
            still.append(p)
        }
        pending = still
        guard !pending.isEmpty else { return }
        delayNS = min(delayNS * 2, 256_000_000)
        arm()
    }

    /// Daemon shutdown (the loop serves no one any more): what is still busy gets up to
    /// a second more, then stays for an operator to see in the log.
    public func close() {
        if let timer { reactor.cancel(timer) }
        timer = nil
        let until = MonotonicClock.nanoseconds() + 1_000_000_000
        while !pending.isEmpty {
            pending = pending.sorted { $0.cgroup.path.count > $1.cgroup.path.count }.filter { p in
                p.cgroup.removeOnce().busy
            }
            guard !pending.isEmpty else { break }
            if MonotonicClock.nanoseconds() >= until {
                for p in pending { logger.warning("\(p.owner): cgroup \(p.cgroup.path) still busy at shutdown; left in place") }
                break
            }
            usleep(2000)
        }
        pending.removeAll()
    }
}
