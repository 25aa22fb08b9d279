import Foundation
import Runtime
import SwiftProtobuf
#if canImport(Glibc)
import Glibc
#endif

/// Container lifecycle and per-pod memory, side by side in one run:
///   - Create+Start+Wait+Delete of /bin/true from one bundle over ttrpc, by this client,
///     against the kuasar daemon and against Debian's containerd-shim-runc-v2 + runc
///     (one warm shim serving every container, and a new shim per container as
///     containerd 1.x starts them);
///   - `runc run` and `crun run` of the same bundle as whole commands;
///   - a bare clone3 + exec + wait of /bin/true (the floor).
///   - PSS of the daemon holding 100 sandboxes with a sleeping container each vs the sum
///     over 100 containerd-shim-runc-v2 processes doing the same.
enum ContainerBenchmark {
    static let work = "/tmp/kuasar-perf-container"
    static let task = "containerd.task.v2.Task"
    static let eventsPath = work + "/events.ttrpc"

    /// One runtime's timings, or, when its peer failed, why (and no times at all).
    struct Row: Codable {
        var runtime: String
        var runs: Int
        var p50ms: Double?
        var p99ms: Double?
        var meanms: Double?
        var failed: String?
    }
    struct Memory: Codable {
        var pods: Int
        var kuasarDaemonPSSkB: Int
        var runcShimsPSSkB: Int
        var ratio: Double
    }
    struct Report: Codable {
        var date: String
        /// What was compared, as each tool names itself.
        var peers: [String: String]
        var perCallP50ms: [String: String]
        var rows: [Row]
        var vsShimRuncCold: [String: Double]
        var memory: [Memory]
    }

    /// containerd's events service as shims see it: every Forward is accepted (a shim
    /// whose events go nowhere stalls, so both runtimes publish here).
    static func serveEventsSink(path: String) throws {
        try EchoServers.serveUntilSIGTERM { reactor in
            let server = TTRPCServer(reactor: reactor)
            server.register(service: "containerd.services.events.ttrpc.v1.Events", method: "Forward") { call in call.respond([]) }
            unlink(path)
            try server.listen(path: path)
            return { server.close() }
        }
    }

    /// The daemon, in its own process (internal subcommand).
    static func serveDaemon(root: String) throws {
        var o = KuasarConfig()
        o.root = root
        o.socket = root + "/kuasar.sock"
        o.onExit = .stop
        try Daemon(options: o, logger: .init(label: "perf-daemon")) { ctx in
            [NamespaceBackend(registry: ctx.registry, tasks: ctx.containers, reactor: ctx.reactor, logger: ctx.logger)]
        }.run()
    }

    /// A peer command that failed: its exit status and what it wrote on stderr.
    struct PeerFailure: Error, CustomStringConvertible {
        let command: String
        let status: ExitStatus
        let stderr: String
        var description: String {
            let why = stderr.split(separator: "\n").last.map { String($0.prefix(200)) } ?? ""
            return "\(status)\(why.isEmpty ? "" : ": " + why)"
        }
    }

    /// Runs a shell command and returns its stdout; a non-zero exit throws PeerFailure
    /// with its stderr, so a peer that fails is never timed as if it had run. (Our
    /// spawner: Foundation's Process waits on SIGCHLD, which a reactor here may own.)
    static func sh(_ cmd: String) throws -> String {
        let (status, out, err) = try shStatus(cmd)
        guard status == .exited(0) else { throw PeerFailure(command: cmd, status: status, stderr: err) }
        return out
    }

    /// Cleanup commands whose failure changes nothing.
    static func shIgnoringFailure(_ cmd: String) {
        _ = try? shStatus(cmd)
    }

    static func shStatus(_ cmd: String) throws -> (ExitStatus, String, String) {
        let pipe = try makePipe(nonBlocking: false)
        let errFile = "/tmp/kuasar-perf-sh-\(getpid()).err"
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        let errFD = open(errFile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        defer { close(null); close(errFD); unlink(errFile) }
        let child = try Spawner.spawn(ProcessSpec(executable: "/bin/sh", arguments: ["sh", "-c", cmd],
                                                  fdMap: [(null, 0), (pipe.second.rawValue, 1), (errFD, 2)]))
        pipe.second.close()
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(pipe.first.rawValue, &buf, buf.count)
            if n > 0 { out += buf[..<n]; continue }
            if n < 0 && errno == EINTR { continue }
            break
        }
        pipe.first.close()
        let status = try Spawner.wait(child)
        let err = (try? String(contentsOfFile: errFile, encoding: .utf8)) ?? ""
        return (status, String(decoding: out, as: UTF8.self), err)
    }

    /// The versions every result records (kuasar, the kernel, each peer compared with).
    static func peerVersions(extra: [String: String] = [:]) -> [String: String] {
        var v = ["kuasar": KuasarVersion.string, "kernel": version("uname -r"), "runc": version("runc --version"),
                 "crun": version("crun --version"), "containerd": version("containerd --version"),
                 "containerd-shim-runc-v2": version("containerd-shim-runc-v2 -v | sed -n 2p")]
        for (k, c) in extra { v[k] = version(c) }
        return v
    }

    /// `<tool> --version`'s first line (recorded with every result), or why there is none.
    static func version(_ command: String) -> String {
        do {
            return try sh(command + " 2>&1").split(separator: "\n").first.map(String.init) ?? "?"
        } catch {
            return "unavailable (\(error))"
        }
    }

    static func makeBundle(_ dir: String, args: [String]) throws {
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir + "/rootfs/bin", withIntermediateDirectories: true)
        for d in ["proc", "sys", "dev", "tmp"] { try FileManager.default.createDirectory(atPath: dir + "/rootfs/" + d, withIntermediateDirectories: true) }
        try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: dir + "/rootfs/bin/busybox")
        for a in ["true", "sleep", "sh"] { try FileManager.default.createSymbolicLink(atPath: dir + "/rootfs/bin/" + a, withDestinationPath: "busybox") }
        _ = try sh("cd \(dir) && runc spec")
        let url = URL(fileURLWithPath: dir + "/config.json")
        var spec = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        var p = spec["process"] as! [String: Any]
        p["terminal"] = false
        p["args"] = args
        spec["process"] = p
        try JSONSerialization.data(withJSONObject: spec).write(to: url)
    }

    /// A blocking ttrpc client (the runtime's own one-shot client), in the "perf" namespace.
    final class Client {
        let session: OneShotClient
        init(_ path: String) throws { session = try OneShotClient(path: path) }
        func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ service: String, _ method: String, _ req: Req, _: Resp.Type) throws -> Resp {
            try session.call(service, method, req, as: Resp.self, namespace: "perf")
        }
        func close() { session.close() }
    }

    /// Per-call time of the last lifecycles (ms), for the breakdown.
    nonisolated(unsafe) static var phases: [String: [Double]] = [:]

    /// One lifecycle on a Task API socket.
    static func lifecycle(_ c: Client, id: String, bundle: String) throws {
        func timed<T>(_ name: String, _ body: () throws -> T) rethrows -> T {
            let t = MonotonicClock.nanoseconds()
            defer { phases[name, default: []].append(Double(MonotonicClock.nanoseconds() - t) / 1e6) }
            return try body()
        }
        var create = Containerd_Task_V2_CreateTaskRequest()
        create.id = id
        create.bundle = bundle
        _ = try timed("Create") { try c.call(task, "Create", create, Containerd_Task_V2_CreateTaskResponse.self) }
        var start = Containerd_Task_V2_StartRequest()
        start.id = id
        _ = try timed("Start") { try c.call(task, "Start", start, Containerd_Task_V2_StartResponse.self) }
        var wait = Containerd_Task_V2_WaitRequest()
        wait.id = id
        _ = try timed("Wait") { try c.call(task, "Wait", wait, Containerd_Task_V2_WaitResponse.self) }
        var del = Containerd_Task_V2_DeleteRequest()
        del.id = id
        _ = try timed("Delete") { try c.call(task, "Delete", del, Containerd_Task_V2_DeleteResponse.self) }
    }

    static func breakdown() -> String {
        ["Create", "Start", "Wait", "Delete"].map { k in
            let v = (phases[k] ?? [0]).sorted()
            return "\(k) \(ReactorBenchmark.fmt(v[v.count / 2]))"
        }.joined(separator: ", ")
    }

    /// containerd-shim-runc-v2 writes its log into a FIFO named `log` in its working
    /// directory, which containerd holds open; without a reader the shim exits. Hold one
    /// (read-write, so it never blocks) per bundle, and drop what arrives.
    nonisolated(unsafe) static var logFIFOs: [String: Int32] = [:]
    static func holdLogFIFO(_ bundle: String) {
        if logFIFOs[bundle] != nil { return }
        mkfifo(bundle + "/log", 0o600)
        let fd = open(bundle + "/log", O_RDWR | O_NONBLOCK | O_CLOEXEC)
        logFIFOs[bundle] = fd
    }
    static func drainLogs() {
        var buf = [UInt8](repeating: 0, count: 65536)
        for fd in logFIFOs.values { while read(fd, &buf, buf.count) > 0 {} }
    }

    static func startShim(id: String, bundle: String) throws -> String {
        holdLogFIFO(bundle)
        drainLogs()
        let out = try sh("cd \(bundle) && TTRPC_ADDRESS=\(eventsPath) containerd-shim-runc-v2 -namespace perf -address \(work)/no-containerd.sock -publish-binary /usr/bin/containerd -id \(id) start")
        let addr = out.trimmingCharacters(in: .whitespacesAndNewlines)
        guard addr.hasPrefix("unix://") else { throw RPCError(.unavailable, "containerd-shim-runc-v2 start: \(out)") }
        return String(addr.dropFirst(7))
    }

    static func shutdownShim(_ c: Client, id: String) {
        var s = Containerd_Task_V2_ShutdownRequest()
        s.id = id
        _ = try? c.call(task, "Shutdown", s, Google_Protobuf_Empty.self)
        c.close()
    }

    static func measure(_ n: Int, _ body: (Int) throws -> Void) throws -> [Double] {
        var out: [Double] = []
        for i in 0..<n {
            let t = MonotonicClock.nanoseconds()
            try body(i)
            out.append(Double(MonotonicClock.nanoseconds() - t) / 1e6)
        }
        return out
    }

    static func row(_ name: String, _ ms: [Double]) -> Row {
        let s = ms.sorted()
        guard !s.isEmpty else { return Row(runtime: name, runs: 0, failed: "no run completed") }
        return Row(runtime: name, runs: s.count, p50ms: s[s.count / 2], p99ms: s[min(s.count - 1, s.count * 99 / 100)],
                   meanms: s.reduce(0, +) / Double(s.count))
    }

    static func log(_ s: String) { FileHandle.standardError.write((s + "\n").data(using: .utf8)!) }

    /// A peer's row: its timings, or the failure that stopped it (logged, never timed).
    static func peerRow(_ name: String, _ measure: () throws -> [Double]) -> Row {
        do { return row(name, try measure()) } catch {
            log("  \(name): FAILED: \(error)")
            return Row(runtime: name, runs: 0, failed: "\(error)")
        }
    }

    /// How a row prints: its times, or FAILED and why.
    static func printRow(_ r: Row, width: Int, ratio: Double?) {
        let pad = ReactorBenchmark.pad, f = ReactorBenchmark.fmt
        guard let p50 = r.p50ms, let p99 = r.p99ms, let mean = r.meanms else {
            print(pad(r.runtime, width) + "FAILED: " + (r.failed ?? "?"))
            return
        }
        print(pad(r.runtime, width) + pad("\(r.runs)", 6) + pad(f(p50), 10) + pad(f(p99), 10) + pad(f(mean), 10) + (ratio.map { f($0) + "x" } ?? ""))
    }

    static func pss(_ pid: pid_t) -> Int {
        guard let t = try? String(contentsOfFile: "/proc/\(pid)/smaps_rollup", encoding: .utf8) else { return 0 }
        for line in t.split(separator: "\n") where line.hasPrefix("Pss:") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? 0
        }
        return 0
    }

    static func run(count: Int, pods: [Int], executable: String) throws {
        try? FileManager.default.removeItem(atPath: work)
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        let bundle = work + "/bundle"
        try makeBundle(bundle, args: ["/bin/true"])
        var rows: [Row] = []
        let sink = Process()
        sink.executableURL = URL(fileURLWithPath: executable)
        sink.arguments = ["events-sink", eventsPath]
        sink.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        try sink.run()
        defer { sink.terminate() }
        for _ in 0..<500 where access(eventsPath, F_OK) != 0 { usleep(10_000) }

        // kuasar: one daemon, one sandbox, N lifecycles on its Task API.
        let root = work + "/kroot"
        let daemon = Process()
        daemon.executableURL = URL(fileURLWithPath: executable)
        daemon.arguments = ["kuasar-daemon", root]
        daemon.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try daemon.run()
        defer { if daemon.isRunning { daemon.terminate(); daemon.waitUntilExit() } }
        for _ in 0..<500 where access(root + "/admin.sock", F_OK) != 0 { usleep(10_000) }
        let admin = try Client(root + "/admin.sock")
        var reg = Kuasar_Admin_V1_RegisterSandboxRequest()
        reg.sandboxID = "perf"
        reg.namespace = "perf"
        reg.eventsAddress = eventsPath
        let address = try admin.call(AdminService.service, "RegisterSandbox", reg, Kuasar_Admin_V1_RegisterSandboxResponse.self).taskAddress
        let ours = try Client(address)
        for i in 0..<10 { try lifecycle(ours, id: "warm\(i)", bundle: bundle) }
        phases = [:]
        rows.append(row("kuasar daemon", try measure(count) { try lifecycle(ours, id: "k\($0)", bundle: bundle) }))
        let ourBreakdown = breakdown()
        log("  kuasar: p50 \(rows.last!.p50ms.map { "\($0)" } ?? "-") ms (p50 ms per call: \(ourBreakdown))")

        // containerd-shim-runc-v2 + runc, one warm shim for every container.
        var theirBreakdown = "-"
        rows.append(peerRow("shim-runc-v2 + runc (one warm shim)") {
            let warmSocket = try startShim(id: "warm", bundle: bundle)
            let warm = try Client(warmSocket)
            defer { shutdownShim(warm, id: "warm") }
            for i in 0..<5 { try lifecycle(warm, id: "w\(i)", bundle: bundle) }
            phases = [:]
            let ms = try measure(count) { try lifecycle(warm, id: "r\($0)", bundle: bundle) }
            theirBreakdown = breakdown()
            return ms
        })
        log("  warm shim: p50 \(rows.last!.p50ms.map { "\($0)" } ?? "-") ms (p50 ms per call: \(theirBreakdown))")

        // A shim per container, as containerd 1.x runs them (shim start included).
        let coldN = max(10, count / 4)
        rows.append(peerRow("shim-runc-v2 + runc (shim per container)") {
            try measure(coldN) { i in
                let id = "cold\(i)"
                let c = try Client(try startShim(id: id, bundle: bundle))
                try lifecycle(c, id: id, bundle: bundle)
                shutdownShim(c, id: id)
            }
        })

        // Whole commands; each must exit 0 or its row says why.
        rows.append(peerRow("runc run") { try measure(coldN) { _ = try sh("runc run --bundle \(bundle) perf-runc-\($0) >/dev/null") } })
        // crun refuses hybrid cgroups unless /sys/fs/cgroup/unified is gone: a private
        // mount namespace for it. The loop stops at the first failing run and says why.
        rows.append(peerRow("crun run") {
            let out = try sh("command -v crun >/dev/null || { echo 'crun is not installed (make bench installs it)' >&2; exit 127; }; " +
                             "unshare -m sh -c 'umount /sys/fs/cgroup/unified 2>/dev/null; for i in $(seq \(coldN)); do s=$(date +%s%N); " +
                             "crun run --bundle \(bundle) perf-crun-$i >/dev/null || exit $?; e=$(date +%s%N); echo $(( (e - s) / 1000 )); done'")
            let ms = out.split(separator: "\n").compactMap { Double($0) }.map { $0 / 1000 }
            guard ms.count == coldN else { throw PeerFailure(command: "crun run", status: .exited(1), stderr: "\(ms.count) of \(coldN) runs timed: \(out.prefix(200))") }
            return ms
        })
        rows.append(row("clone3+exec+wait /bin/true", try measure(count) { _ in
            var spec = ProcessSpec(executable: "/bin/true")
            spec.forkStyle = true
            _ = try Spawner.wait(try Spawner.spawn(spec))
        }))

        // Memory: N sandboxes with a sleeping container each.
        try makeBundle(work + "/sleeper", args: ["sleep", "3600"])
        var memory: [Memory] = []
        for n in pods {
            var sandboxes: [(Client, String)] = []
            for i in 0..<n {
                var r = Kuasar_Admin_V1_RegisterSandboxRequest()
                r.sandboxID = "pod\(n)-\(i)"
                r.namespace = "perf"
                r.eventsAddress = eventsPath
                let a = try admin.call(AdminService.service, "RegisterSandbox", r, Kuasar_Admin_V1_RegisterSandboxResponse.self).taskAddress
                let c = try Client(a)
                var create = Containerd_Task_V2_CreateTaskRequest()
                create.id = "s\(n)-\(i)"
                create.bundle = work + "/sleeper"
                _ = try c.call(task, "Create", create, Containerd_Task_V2_CreateTaskResponse.self)
                var start = Containerd_Task_V2_StartRequest()
                start.id = create.id
                _ = try c.call(task, "Start", start, Containerd_Task_V2_StartResponse.self)
                sandboxes.append((c, create.id))
            }
            usleep(200_000)
            let ourPSS = pss(daemon.processIdentifier)
            var shims: [(Client, String)] = []
            for i in 0..<n {
                let id = "m\(n)-\(i)"
                let c = try Client(try startShim(id: id, bundle: work + "/sleeper"))
                var create = Containerd_Task_V2_CreateTaskRequest()
                create.id = id
                create.bundle = work + "/sleeper"
                _ = try c.call(task, "Create", create, Containerd_Task_V2_CreateTaskResponse.self)
                var start = Containerd_Task_V2_StartRequest()
                start.id = id
                _ = try c.call(task, "Start", start, Containerd_Task_V2_StartResponse.self)
                shims.append((c, id))
            }
            usleep(200_000)
            let shimPIDs = (try? sh("pgrep -f 'containerd-shim-runc-v2 -namespace perf -id m\(n)-'")).map { $0.split(separator: "\n").compactMap { pid_t($0) } } ?? []
            let theirPSS = shimPIDs.map(pss).reduce(0, +)
            memory.append(Memory(pods: n, kuasarDaemonPSSkB: ourPSS, runcShimsPSSkB: theirPSS, ratio: Double(ourPSS) / Double(max(theirPSS, 1))))
            log("  memory \(n) pods: kuasar \(ourPSS) kB, \(shimPIDs.count) shims \(theirPSS) kB")
            for (c, id) in sandboxes + shims {
                var k = Containerd_Task_V2_KillRequest()
                k.id = id
                k.signal = 9
                _ = try? c.call(task, "Kill", k, Google_Protobuf_Empty.self)
                var w = Containerd_Task_V2_WaitRequest()
                w.id = id
                _ = try? c.call(task, "Wait", w, Containerd_Task_V2_WaitResponse.self)
                var d = Containerd_Task_V2_DeleteRequest()
                d.id = id
                _ = try? c.call(task, "Delete", d, Containerd_Task_V2_DeleteResponse.self)
                shutdownShim(c, id: id)
            }
        }
        ours.close()
        admin.close()
        daemon.terminate()
        daemon.waitUntilExit()

        let cold = rows.first { $0.runtime.hasPrefix("shim-runc-v2 + runc (shim per") }?.p50ms
        var ratios: [String: Double] = [:]
        for r in rows { if let p50 = r.p50ms, let cold { ratios[r.runtime] = p50 / cold } }
        print("\ncontainer lifecycle (Create+Start+Wait+Delete of /bin/true), \(count) runs, p50 vs a shim per container:")
        print(ReactorBenchmark.pad("runtime", 44) + ReactorBenchmark.pad("runs", 6) + ReactorBenchmark.pad("p50 ms", 10) + ReactorBenchmark.pad("p99 ms", 10) + ReactorBenchmark.pad("mean ms", 10) + "p50/shim-per-container")
        for r in rows { printRow(r, width: 44, ratio: ratios[r.runtime]) }
        print("p50 per call — kuasar: \(ourBreakdown); warm runc shim: \(theirBreakdown)")
        print("\nmemory: PSS of the kuasar daemon vs the sum over containerd-shim-runc-v2 processes, one sleeping container per pod:")
        for m in memory {
            print("  \(m.pods) pods: kuasar \(m.kuasarDaemonPSSkB) kB, runc shims \(m.runcShimsPSSkB) kB, ratio \(ReactorBenchmark.fmt(m.ratio))")
        }
        let report = Report(date: ISO8601DateFormatter().string(from: Date()), peers: peerVersions(), perCallP50ms: ["kuasar": ourBreakdown, "shim-runc-v2 warm": theirBreakdown], rows: rows, vsShimRuncCold: ratios, memory: memory)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let path = ReactorBenchmark.resultsDirectory() + "/container.json"
        try encoder.encode(report).write(to: URL(fileURLWithPath: path))
        print("wrote \(path)")
    }
}
