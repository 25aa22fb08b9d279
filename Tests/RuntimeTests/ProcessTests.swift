import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct ProcessTests {
    /// 200 children at once; each exit status arrives exactly once, through its pidfd.
    @Test(arguments: BackendKind.allCases)
    func twoHundredChildrenEachReportedOnce(kind: BackendKind) throws {
        let childrenBefore = childCount()
        try withReactor(kind) { reactor in
            let supervisor = ProcessSupervisor(reactor: reactor)
            var recorders: [pid_t: Recorder] = [:]
            var expected: [pid_t: ExitStatus] = [:]
            var toKill: [pid_t] = []
            for i in 0..<200 {
                // Every tenth child waits to be killed; the rest exit with their own code.
                let killed = i % 10 == 0
                let script = killed ? "exec sleep 30" : "exit \(i)"
                let recorder = Recorder()
                let pid = try supervisor.spawn(ProcessSpec(executable: "/bin/sh", arguments: ["sh", "-c", script])) { status in
                    recorder.statuses.append(status)
                }
                recorders[pid] = recorder
                expected[pid] = killed ? .signaled(SIGKILL, coreDumped: false) : .exited(Int32(i))
                if killed { toKill.append(pid) }
            }
            #expect(supervisor.runningCount == 200)
            for pid in toKill { try supervisor.signal(pid, SIGKILL) }
            try spin(reactor, timeoutMS: 30_000, "200 exits") { supervisor.runningCount == 0 }
            // Let anything late arrive: nothing may.
            try settle(reactor, ms: 20)
            for (pid, want) in expected {
                #expect(recorders[pid]?.statuses == [want], "pid \(pid)")
            }
            #expect(throws: SystemError.self) { try supervisor.signal(toKill[0], SIGKILL) }
        }
        #expect(childCount() == childrenBefore, "children left behind")
    }

    /// A child nobody supervises is reaped by the SIGCHLD fallback; a supervised one
    /// keeps its status for its own pidfd.
    @Test(arguments: BackendKind.allCases)
    func sigchldFallbackReapsOnlyStrays(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let supervisor = ProcessSupervisor(reactor: reactor)
            try supervisor.enableSIGCHLDFallback()
            defer { try? Signals.unblock([SIGCHLD]) }
            // A stray: started, then its pidfd dropped, as a library might do.
            let stray = try Spawner.spawn(ProcessSpec(executable: "/bin/true"))
            let strayPID = stray.pid
            stray.pidfd.close()
            var supervisedStatus: [ExitStatus] = []
            try supervisor.spawn(ProcessSpec(executable: "/bin/sh", arguments: ["sh", "-c", "exit 7"])) {
                supervisedStatus.append($0)
            }
            // SIGCHLD is process-directed and may land on any thread of the test runner;
            // direct one at the loop thread so the signalfd sees it.
            usleep(50_000)
            try Signals.sendToThread(Signals.currentThreadID(), SIGCHLD)
            try spin(reactor, "stray reaped and supervised child reported") {
                supervisor.strayChildrenReaped == 1 && supervisedStatus.count == 1
            }
            #expect(supervisedStatus == [.exited(7)])
            #expect(kill(strayPID, 0) != 0)  // gone, not a zombie
        }
        #expect(childCount() == 0)
    }

    /// Both clone paths (vfork-style on our memory, clone3 on a copy) report why a
    /// child could not start, name the call, and leave no child or fd behind.
    @Test(arguments: [false, true])
    func execFailureIsAnErrorNamingTheCall(forkStyle: Bool) throws {
        let fdsBefore = openFDCount()
        var missing = ProcessSpec(executable: "/nonexistent/binary")
        missing.forkStyle = forkStyle
        #expect {
            _ = try Spawner.spawn(missing)
        } throws: { error in
            let e = error as? SystemError
            return e?.call == "execve" && e?.errno == .ENOENT && e?.subject == "/nonexistent/binary"
        }
        var badDir = ProcessSpec(executable: "/bin/true", workingDirectory: "/nonexistent-dir")
        badDir.forkStyle = forkStyle
        #expect {
            _ = try Spawner.spawn(badDir)
        } throws: { error in
            (error as? SystemError)?.call == "chdir"
        }
        var bare = ProcessSpec(executable: "sh", arguments: ["sh", "-c", "exit 42"])  // PATH lookup
        bare.forkStyle = forkStyle
        #expect(try Spawner.wait(try Spawner.spawn(bare)) == .exited(42))
        #expect(openFDCount() == fdsBefore)
        #expect(childCount() == 0)
    }

    @Test func fdMapGivesTheChildExactlyTheMappedDescriptors() throws {
        let pipe = try makePipe(nonBlocking: false)
        let devnull = OwnedFD(adopting: open("/dev/null", O_RDONLY | O_CLOEXEC))
        // An inheritable descriptor (no close-on-exec) that is not in the map must not
        // reach the child either.
        let extra = try makePipe()
        _ = fcntl(extra.first.rawValue, F_SETFD, 0)
        var spec = ProcessSpec(executable: "/bin/ls", arguments: ["ls", "/proc/self/fd"])
        spec.fdMap = [(from: devnull.rawValue, to: 0), (from: pipe.second.rawValue, to: 1), (from: pipe.second.rawValue, to: 2)]
        let child = try Spawner.spawn(spec)
        pipe.second.close()
        let out = try pipe.first.readExactly(4096)
        #expect(try Spawner.wait(child) == .exited(0))
        // 0-2 as mapped, 3 is the directory ls is reading; nothing else.
        let fds = String(decoding: out, as: UTF8.self).split(separator: "\n").map(String.init)
        #expect(fds == ["0", "1", "2", "3"])
        pipe.first.close()
        devnull.close()
        extra.first.close()
        extra.second.close()
    }

    @Test func childDoesNotInheritBlockedSignals() throws {
        try Signals.block([SIGTERM])
        defer { try? Signals.unblock([SIGTERM]) }
        let child = try Spawner.spawn(ProcessSpec(executable: "/bin/sleep", arguments: ["sleep", "30"]))
        try sendSignal(pidfd: child.pidfd.rawValue, SIGTERM)
        #expect(try Spawner.wait(child) == .signaled(SIGTERM, coreDumped: false))
    }
}
}

final class Recorder {
    var statuses: [ExitStatus] = []
}
