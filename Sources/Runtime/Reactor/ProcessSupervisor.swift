#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarSystem

/// Children of the daemon, each watched through its pidfd on the reactor.
///
/// A child's exit is reaped with `waitid(P_PIDFD)` and reported to its `onExit`
/// exactly once. As a fallback for children that were not started here (re-parented
/// orphans when the daemon is a subreaper, helpers of libraries), SIGCHLD triggers a
/// peek with `WNOWAIT`: unknown children are reaped and logged, known ones are left to
/// their pidfd so their status is never stolen.
public final class ProcessSupervisor {
    public typealias ExitHandler = (ExitStatus) -> Void

    final class Child {
        let pid: pid_t
        var pidfd: OwnedFD?
        var registration: Reactor.Registration?
        let onExit: ExitHandler
        init(pid: pid_t, pidfd: consuming OwnedFD, onExit: @escaping ExitHandler) {
            self.pid = pid
            self.pidfd = consume pidfd
            self.onExit = onExit
        }
    }

    let reactor: Reactor
    var children: [pid_t: Child] = [:]
    public private(set) var strayChildrenReaped = 0
    /// A guest's PID 1 reaps every orphan of the guest: routine there, worth a line here.
    public var strayLogLevel: Logger.Level = .info

    public init(reactor: Reactor) {
        self.reactor = reactor
    }

    public var runningCount: Int { children.count }

    /// Starts `spec` and watches it; `onExit` runs on the loop once it has exited.
    @discardableResult
    public func spawn(_ spec: ProcessSpec, onExit: @escaping ExitHandler) throws(SystemError) -> pid_t {
        try adopt(try Spawner.spawn(spec), onExit: onExit)
    }

    /// Watches an already started child (or any process we hold a pidfd for).
    @discardableResult
    public func adopt(_ process: consuming SpawnedProcess, onExit: @escaping ExitHandler) throws(SystemError) -> pid_t {
        let pid = process.pid
        let raw = process.pidfd.rawValue
        let child = Child(pid: pid, pidfd: process.pidfd.take().adopted(), onExit: onExit)
        do {
            child.registration = try reactor.register(fd: raw, interest: .readable) { [unowned self, unowned child] _ in
                self.collect(child)
            }
        } catch {
            child.pidfd.take()?.close()
            throw error
        }
        children[pid] = child
        return pid
    }

    /// Sends `signal` to a supervised child, or to a process watched with `watchForeign`,
    /// through the pidfd we hold for it (never a recycled pid). ESRCH names a pid that is
    /// not watched (or has been reaped).
    public func signal(_ pid: pid_t, _ signal: Int32) throws(SystemError) {
        guard let child = children[pid] ?? foreign[pid], let raw = child.pidfd?.rawValue else {
            throw SystemError("pidfd_send_signal", "pid \(pid)", errno: .ESRCH)
        }
        try sendSignal(pidfd: raw, signal)
    }

    /// Reaps `child` if it has exited; a spurious wake-up leaves it alone.
    private func collect(_ child: Child) {
        guard let raw = child.pidfd?.rawValue else { return }
        let result: ExitStatus
        switch ChildReaper.collect(pidfd: raw) {
        case .running:
            return
        case .exited(let status):
            result = status
        case .gone(let errno):
            // ECHILD: someone else reaped it (a stray waitpid(-1) in a library). The
            // status is gone; say so rather than inventing a success.
            reactor.logger.error("pid \(child.pid): waitid(P_PIDFD) failed: \(errno); reporting exit 255")
            result = .exited(255)
        }
        finish(child)
        child.onExit(result)
    }

    private func finish(_ child: Child) {
        if let reg = child.registration { reactor.deregister(reg) }
        child.registration = nil
        child.pidfd.take()?.close()
        if children[child.pid] === child { children[child.pid] = nil }
    }

    /// While positive, exited children that are not supervised are left as zombies: an
    /// OCI runtime's detached process may exit before its pid file is read and it is
    /// adopted, and reaping it as a stray would lose its status. Release with `releaseStrays`.
    public private(set) var strayHolds = 0

    public func holdStrays() { strayHolds += 1 }

    public func releaseStrays() {
        strayHolds -= 1
        if strayHolds == 0 { reapStrays() }
    }

    /// Reaps exited children that are not supervised here. Wire it to SIGCHLD.
    public func reapStrays() {
        // Supervised children are collected through their pidfds either way.
        guard strayHolds == 0 else { return }
        while let pid = ChildReaper.peekExited() {
            if let child = children[pid] {
                collect(child)
                continue
            }
            guard let status = ChildReaper.reap(pid) else { return }
            strayChildrenReaped += 1
            reactor.logger.log(level: strayLogLevel, "reaped unsupervised child \(pid): \(status)")
        }
    }

    /// Makes SIGCHLD run `reapStrays` on the loop.
    public func enableSIGCHLDFallback() throws(SystemError) {
        try reactor.onSignals([SIGCHLD]) { [unowned self] _ in self.reapStrays() }
    }

    /// Watches a process that is not our child: one that outlived the previous daemon,
    /// re-parented to the keeper, which reaps it and records its status. Returns the
    /// pidfd (owned here until the exit; for signals and setns), or nil when the process
    /// is gone already (or `pid` now names another process: the start time differs).
    public func watchForeign(pid: pid_t, startTime: UInt64, exits: ExitRecords,
                             onExit: @escaping (ExitStatus?) -> Void) -> Int32? {
        guard let fd = openPidfd(pid) else { return nil }
        // Checked after the open: if it still matches, the pidfd is that process.
        guard ExitRecords.startTime(of: pid) == startTime else { _ = Glibc.close(fd); return nil }
        let child = Child(pid: pid, pidfd: OwnedFD(adopting: fd), onExit: { _ in })
        do {
            child.registration = try reactor.register(fd: fd, interest: .readable) { [unowned self, unowned child] _ in
                self.finish(child)
                self.awaitRecord(pid: pid, startTime: startTime, exits: exits, deadline: MonotonicClock.nanoseconds() + 2_000_000_000, onExit)
            }
        } catch {
            _ = child.pidfd.take()?.close()
            return nil
        }
        foreign[pid] = child
        return fd
    }

    private var foreign: [pid_t: Child] = [:]

    /// The keeper writes the record just after it reaps: a wake-up can beat it by a
    /// moment. Past the deadline the status is unknown (the keeper is gone too).
    private func awaitRecord(pid: pid_t, startTime: UInt64, exits: ExitRecords, deadline: UInt64,
                             _ onExit: @escaping (ExitStatus?) -> Void) {
        if let status = exits.take(pid: pid, startTime: startTime) {
            foreign[pid] = nil
            onExit(status)
            return
        }
        guard MonotonicClock.nanoseconds() < deadline else {
            foreign[pid] = nil
            reactor.logger.error("pid \(pid) exited but no keeper recorded its status")
            onExit(nil)
            return
        }
        reactor.schedule(afterNS: 2_000_000) { [weak self] in
            self?.awaitRecord(pid: pid, startTime: startTime, exits: exits, deadline: deadline, onExit)
        }
    }

    /// Stops watching every child (they keep running) and closes their pidfds.
    public func close() {
        for child in Array(children.values) { finish(child) }
        for child in Array(foreign.values) { finish(child) }
        foreign.removeAll()
    }
}

extension Int32 {
    /// Wraps a raw descriptor just handed off by `take()` in a new owner.
    package func adopted() -> OwnedFD { OwnedFD(adopting: self) }
}
