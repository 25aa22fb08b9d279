import Foundation
import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// Debian's containerd 1.6.20 driving kuasar through the shim v2 protocol, with `ctr`.
extension AllTests {
@Suite struct ContainerdTests {
    @Test func ctrRunPropagatesOutputAndExitCodes() throws {
        let ctd = try ContainerdFixture("run")
        defer { try? ctd.stop() }
        var r = try ctd.run("--rm \(ContainerdFixture.image) r0 sh -c 'echo hello from kuasar; echo to stderr >&2'")
        #expect(r.code == 0)
        #expect(r.out.contains("hello from kuasar\n"), "\(r.out)")
        #expect(r.out.contains("to stderr\n"), "\(r.out)")
        r = try ctd.run("--rm \(ContainerdFixture.image) r3 sh -c 'exit 3'")
        #expect(r.code == 3, "\(r.out)")
        // SIGKILL from outside (a pid namespace's init ignores it from inside).
        r = try shell("\(ctd.ctr) run --rm --runtime \(ContainerdFixture.runtime) \(ContainerdFixture.image) r137 sleep 30 & sleep 0.5; \(ctd.ctr) task kill -s SIGKILL r137; wait $!")
        #expect(r.code == 137, "\(r.out)")
        // Everything written before the exit arrives, also a lot of it at once.
        r = try ctd.run("--rm \(ContainerdFixture.image) big sh -c 'seq 1 100000; exit 7'")
        #expect(r.code == 7)
        #expect(r.out.hasSuffix("99999\n100000\n") && r.out.split(separator: "\n").count == 100000, "tail: \(r.out.suffix(40))")
        // A tty: the process sees a terminal from its own devpts.
        r = try shell("script -qec \"\(ctd.ctr) run -t --rm --runtime \(ContainerdFixture.runtime) \(ContainerdFixture.image) tty1 sh -c 'tty; exit 5'\" /dev/null")
        #expect(r.code == 5, "\(r.out)")
        #expect(r.out.contains("/dev/pts/0"), "\(r.out)")
        // containerd's binary logging protocol: the logger reads fd 3/4, closes fd 5 when ready.
        let logger = ctd.dir + "/logger.sh"
        try Files.write(logger, """
            #!/bin/sh
            exec 5>&-
            echo "$CONTAINER_ID $CONTAINER_NAMESPACE" > "$2/logger-env"
            cat <&3 > "$2/out.log" &
            cat <&4 > "$2/err.log"
            wait
            """, create: true, mode: 0o755)
        r = try ctd.run("--rm --log-uri 'binary://\(logger)?dir=\(ctd.dir)' \(ContainerdFixture.image) lg sh -c 'echo to-log; echo to-err >&2; exit 2'")
        #expect(r.code == 2, "\(r.out)")
        #expect(waitUntil { ((try? Files.readString(ctd.dir + "/out.log")) ?? "") == "to-log\n" }, "logger stdout")
        #expect(waitUntil { ((try? Files.readString(ctd.dir + "/err.log")) ?? "") == "to-err\n" }, "logger stderr")
        #expect(((try? Files.readString(ctd.dir + "/logger-env")) ?? "") == "lg default\n")
        // No process per container stays behind: only containerd and the one daemon.
        let shims = try shell("pgrep -f '[c]ontainerd-shim-kuasar' || true").out
        #expect(shims.isEmpty, "shim processes left: \(shims)")
    }

    @Test func taskLifecycleExecPauseMetricsKillAndEvents() throws {
        let ctd = try ContainerdFixture("life")
        defer { try? ctd.stop() }
        let events = try Spawner.spawn(ProcessSpec(executable: "/bin/sh", arguments: ["sh", "-c", "exec \(ctd.ctr) events > \(ctd.dir)/events.log 2>&1"]))
        usleep(100_000)
        var r = try ctd.run("-d \(ContainerdFixture.image) t1 sleep 300")
        #expect(r.code == 0, "\(r.out)")
        r = try ctd.ctr("task ls")
        #expect(r.out.contains("t1") && r.out.contains("RUNNING"), "\(r.out)")
        let pid = r.out.split(separator: "\n").first { $0.hasPrefix("t1") }?.split(separator: " ", omittingEmptySubsequences: true)[1]
        r = try ctd.ctr("task ps t1")
        #expect(pid != nil && r.out.contains(String(pid!)), "\(r.out)")
        r = try ctd.ctr("task exec --exec-id e1 t1 sh -c 'echo in exec; hostname; exit 4'")
        #expect(r.code == 4 && r.out.contains("in exec"), "\(r.out)")
        r = try shell("script -qec \"\(ctd.ctr) task exec -t --exec-id e2 t1 tty\" /dev/null")
        #expect(r.out.contains("/dev/pts/"), "\(r.out)")
        r = try ctd.ctr("task pause t1")
        #expect(r.code == 0, "\(r.out)")
        #expect(try ctd.ctr("task ls").out.contains("PAUSED"))
        r = try ctd.ctr("task resume t1")
        #expect(try ctd.ctr("task ls").out.contains("RUNNING"))
        r = try ctd.ctr("task metrics t1")
        #expect(r.code == 0 && (r.out.contains("memory.usage_in_bytes") || r.out.contains("memory.usage")), "\(r.out)")
        // kill --all reaches a background child too.
        r = try ctd.ctr("task exec -d --exec-id bg t1 sleep 300")
        r = try ctd.ctr("task ps t1")
        #expect(r.out.split(separator: "\n").count == 3, "two processes expected: \(r.out)")
        r = try ctd.ctr("task kill --all --signal SIGKILL t1")
        #expect(r.code == 0, "\(r.out)")
        try waitUntil(everyMS: 20) { try ctd.ctr("task ls").out.contains("STOPPED") }
        #expect(try ctd.ctr("task ls").out.contains("STOPPED"))
        r = try ctd.ctr("task delete t1")
        #expect(r.code == 0, "\(r.out)")
        r = try ctd.ctr("containers delete t1")
        usleep(300_000)
        kill(events.pid, SIGTERM)
        _ = try Spawner.wait(events)
        let log = try Files.readString(ctd.dir + "/events.log")
        let topics = log.split(separator: "\n").compactMap { line -> String? in
            guard line.contains("t1") else { return nil }
            return line.split(separator: " ").first { $0.hasPrefix("/tasks/") }.map(String.init)
        }
        let order = ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                     "/tasks/paused", "/tasks/resumed", "/tasks/delete"]
        for t in order { #expect(topics.contains(t), "no \(t) in \(topics)") }
        if let c = topics.firstIndex(of: "/tasks/create"), let s = topics.firstIndex(of: "/tasks/start"),
           let d = topics.lastIndex(of: "/tasks/delete") {
            #expect(c < s && s < d, "events out of order: \(topics)")
            #expect(topics.last == "/tasks/delete")
        }
    }

    @Test func podContainersShareTheSandboxNetworkNamespace() throws {
        let ctd = try ContainerdFixture("pod")
        defer { try? ctd.stop() }
        let pod = "--annotation io.kubernetes.cri.sandbox-id=pod1"
        var r = try ctd.run("-d \(pod) \(ContainerdFixture.image) a1 sleep 300")
        #expect(r.code == 0, "\(r.out)")
        r = try ctd.run("--rm \(pod) \(ContainerdFixture.image) a2 readlink /proc/self/ns/net")
        let inA2 = r.out.trimmingCharacters(in: .whitespacesAndNewlines)
        r = try ctd.ctr("task exec --exec-id x a1 readlink /proc/self/ns/net")
        let inA1 = r.out.trimmingCharacters(in: .whitespacesAndNewlines)
        let host = try shell("readlink /proc/self/ns/net").out.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(inA1.hasPrefix("net:[") && inA1 == inA2, "a1 \(inA1) vs a2 \(inA2)")
        #expect(inA1 != host)
        // One sandbox, one task socket, however many containers.
        let sockets = Files.list(ctd.kuasarRoot).filter { Files.exists(ctd.kuasarRoot + "/" + $0 + "/task.sock") }
        #expect(sockets == ["pod1"], "\(sockets)")
        _ = try ctd.ctr("task kill -s SIGKILL a1")
        try waitUntil(everyMS: 20) { try ctd.ctr("task ls").out.contains("STOPPED") }
        _ = try ctd.ctr("task delete a1")
        _ = try ctd.ctr("containers delete a1")
    }

    @Test func fiftyContainersStartInParallel() throws {
        let ctd = try ContainerdFixture("fifty")
        defer { try? ctd.stop() }
        let runs = (0..<50).map { "\(ctd.ctr) run -d --runtime \(ContainerdFixture.runtime) \(ContainerdFixture.image) p\($0) sleep 300 &" }
        var r = try shell(runs.joined(separator: "\n") + "\nwait", timeoutS: 120)
        #expect(r.code == 0, "\(r.out)")
        r = try ctd.ctr("task ls")
        let running = r.out.split(separator: "\n").filter { $0.contains("RUNNING") }.count
        #expect(running == 50, "\(r.out)")
        r = try shell((0..<50).map { "\(ctd.ctr) task kill -s SIGKILL p\($0) &" }.joined(separator: "\n") + "\nwait")
        try waitUntil(everyMS: 20) { !(try ctd.ctr("task ls").out.contains("RUNNING")) }
        r = try shell((0..<50).map { "(\(ctd.ctr) task delete p\($0) && \(ctd.ctr) containers delete p\($0)) &" }.joined(separator: "\n") + "\nwait")
        #expect(r.code == 0, "\(r.out)")
        #expect(try ctd.ctr("task ls").out.split(separator: "\n").count == 1)
    }
}
}
