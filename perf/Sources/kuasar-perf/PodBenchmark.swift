import Foundation
import Runtime
import SwiftProtobuf
#if canImport(Glibc)
import Glibc
#endif

/// Pod start as containerd 2.x drives a sandboxer: Controller Create + Start over gRPC,
/// then Task Create + Start of one container over ttrpc at the address Start returned,
/// timed from the client (ours: a blocking h2c client, so the time is the daemon's plus
/// two socket round trips per call). Then the same work as whole commands through
/// Debian's containerd 1.6 (`ctr run -d`, runc shim vs ours), and the daemon's memory
/// with 1, 100 and 500 pods. The daemon is the real `kuasar` binary (KUASAR_BIN, or the
/// main package's release/debug build).
enum PodBenchmark {
    static let work = "/tmp/kuasar-perf-pod"
    static let controller = "containerd.services.sandbox.v1.Controller"
    static let task = "containerd.task.v3.Task"
    static let md = [("containerd-namespace", "k8s.io")]

    struct Memory: Codable {
        var sandboxes: Int
        var daemonPSSkB: Int
        var keeperPSSkB: Int
        /// Every pod's holder process (the pid containerd is given), summed.
        var holdersPSSkB: Int
        var holders: Int
    }

    /// The daemon's pod holders: its children named kuasar-pod.
    static func holders(of daemon: pid_t) -> [pid_t] {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc"))?.compactMap { name -> pid_t? in
            guard let pid = pid_t(name), let stat = try? String(contentsOfFile: "/proc/\(name)/stat", encoding: .utf8),
                  stat.contains("(kuasar-pod)"), let close = stat.lastIndex(of: ")") else { return nil }
            let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
            return fields.count > 1 && pid_t(fields[1]) == daemon ? pid : nil
        } ?? []
    }
    struct Report: Codable {
        var date: String
        var peers: [String: String]
        var rows: [ContainerBenchmark.Row]
        var perCallP50ms: [String: Double]
        var inDaemonP50ms: Double
        var parallelWallMs: Double
        var containerd: [ContainerBenchmark.Row]
        var ctrRunSpeedup: Double?
        var containerdOwnMs: Double?
        var memory: [Memory]
    }

    static var repositoryRoot: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent().path
    }

    static func kuasarBinary() -> String? {
        if let b = ProcessInfo.processInfo.environment["KUASAR_BIN"] { return b }
        for c in ["release", "debug"] where access(repositoryRoot + "/.build/\(c)/kuasar", X_OK) == 0 {
            return repositoryRoot + "/.build/\(c)/kuasar"
        }
        return nil
    }

    /// The real daemon on `root` with the config file `config`, `--on-exit stop`; `stop()`
    /// ends it (SIGTERM to its keeper) and waits.
    final class DaemonProcess {
        let keeperPID: pid_t
        let keeperPidfd: Int32
        private(set) var pid: pid_t = 0
        let grpc: GRPCClient
        init(kuasar: String, root: String, socket: String, config: String, log: String, level: String) throws {
            let logFD = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            let spawned = try Spawner.spawn(ProcessSpec(executable: kuasar, arguments: ["kuasar", "daemon", "--root", root, "--socket", socket, "--config", config,
                                                                                       "--on-exit", "stop", "--log-level", level], fdMap: [(logFD, 2)]))
            close(logFD)
            keeperPID = spawned.pid
            keeperPidfd = spawned.pidfd.take()
            for _ in 0..<500 {
                if let p = Daemon.pid(root: root), access(socket, F_OK) == 0 { pid = p; break }
                usleep(10_000)
            }
            grpc = try GRPCClient(path: socket)
        }
        func stop() {
            _ = try? sendSignal(pidfd: keeperPidfd, SIGTERM)
            _ = waitpid(keeperPID, nil, 0)
            close(keeperPidfd)
        }
    }

    /// One pod: the four calls containerd makes; returns per-call ms.
    static func startPod(_ grpc: GRPCClient, id: String, bundle: String) throws -> (total: Double, phases: [String: Double], tasks: OneShotClient) {
        var phases: [String: Double] = [:]
        let t0 = MonotonicClock.nanoseconds()
        var last = t0
        func mark(_ name: String) {
            let now = MonotonicClock.nanoseconds()
            phases[name] = Double(now - last) / 1e6
            last = now
        }
        var create = Containerd_Services_Sandbox_V1_ControllerCreateRequest()
        create.sandboxID = id
        create.sandboxer = "kuasar"
        _ = try grpc.call(controller, "Create", create, as: Containerd_Services_Sandbox_V1_ControllerCreateResponse.self, metadata: md)
        mark("Controller.Create")
        var start = Containerd_Services_Sandbox_V1_ControllerStartRequest()
        start.sandboxID = id
        start.sandboxer = "kuasar"
        let started = try grpc.call(controller, "Start", start, as: Containerd_Services_Sandbox_V1_ControllerStartResponse.self, metadata: md)
        mark("Controller.Start")
        let tasks = try OneShotClient(path: String(started.address.dropFirst("ttrpc+unix://".count)))
        var tc = Containerd_Task_V3_CreateTaskRequest()
        tc.id = id + "-c"
        tc.bundle = bundle
        _ = try tasks.call(task, "Create", tc, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
        mark("Task.Create")
        var ts = Containerd_Task_V3_StartRequest()
        ts.id = tc.id
        _ = try tasks.call(task, "Start", ts, as: Containerd_Task_V3_StartResponse.self, namespace: "k8s.io")
        mark("Task.Start")
        return (Double(last - t0) / 1e6, phases, tasks)
    }

    /// Untimed: what containerd does when the pod goes away.
    static func removePod(_ grpc: GRPCClient, _ tasks: OneShotClient, id: String, sandboxer: String = "kuasar") {
        var k = Containerd_Task_V3_KillRequest()
        k.id = id + "-c"
        k.signal = 9
        _ = try? tasks.call(task, "Kill", k, as: Google_Protobuf_Empty.self, namespace: "k8s.io")
        var w = Containerd_Task_V3_WaitRequest()
        w.id = k.id
        _ = try? tasks.call(task, "Wait", w, as: Containerd_Task_V3_WaitResponse.self, namespace: "k8s.io")
        var d = Containerd_Task_V3_DeleteRequest()
        d.id = k.id
        _ = try? tasks.call(task, "Delete", d, as: Containerd_Task_V3_DeleteResponse.self, namespace: "k8s.io")
        tasks.close()
        var s = Containerd_Services_Sandbox_V1_ControllerShutdownRequest()
        s.sandboxID = id
        s.sandboxer = sandboxer
        _ = try? grpc.call(controller, "Shutdown", s, as: Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self, metadata: md)
    }

    static func run(runs: Int, parallel: Int, memoryPoints: [Int]) throws {
        func log(_ s: String) { FileHandle.standardError.write((s + "\n").data(using: .utf8)!) }
        guard let kuasar = kuasarBinary() else {
            log("pod: no kuasar binary (build the main package, or set KUASAR_BIN)")
            return
        }
        ContainerBenchmark.shIgnoringFailure("umount -R \(work)/ctd/root 2>/dev/null; umount -l \(work)/kroot 2>/dev/null; rm -rf \(work)")
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        let bundle = work + "/bundle"
        try ContainerBenchmark.makeBundle(bundle, args: ["sleep", "3600"])
        let root = work + "/kroot"
        let socket = root + "/kuasar.sock"
        // The daemon's state lives in /run/kuasar, a tmpfs on any real host (here /run is
        // on the container's disk): the same, as a tmpfs of its own.
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        _ = try ContainerBenchmark.sh("mount -t tmpfs -o mode=0700 kuasar-perf \(root)")
        defer { ContainerBenchmark.shIgnoringFailure("umount -l \(root)") }
        // KUASAR_PERF_LOG=trace: the daemon's per-Create breakdown in work/daemon.log.
        let level = ProcessInfo.processInfo.environment["KUASAR_PERF_LOG"] ?? "error"
        let logFD = open(work + "/daemon.log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let spawned = try Spawner.spawn(ProcessSpec(executable: kuasar, arguments: ["kuasar", "daemon", "--root", root, "--socket", socket,
                                                                                   "--on-exit", "stop", "--log-level", level],
                                                    fdMap: [(logFD, 2)]))
        close(logFD)
        let keeperPID = spawned.pid, keeperPidfd = spawned.pidfd.take()
        var daemonPID: pid_t = 0
        defer {
            _ = try? sendSignal(pidfd: keeperPidfd, SIGTERM)
            _ = waitpid(keeperPID, nil, 0)
            close(keeperPidfd)
        }
        for _ in 0..<500 {
            if let p = Daemon.pid(root: root), access(socket, F_OK) == 0 { daemonPID = p; break }
            usleep(10_000)
        }
        let grpc = try GRPCClient(path: socket)

        // Serial pods.
        for i in 0..<10 {
            let r = try startPod(grpc, id: "warm\(i)", bundle: bundle)
            removePod(grpc, r.tasks, id: "warm\(i)")
        }
        var totals: [Double] = []
        var phases: [String: [Double]] = [:]
        for i in 0..<runs {
            let id = "s\(i)"
            let r = try startPod(grpc, id: id, bundle: bundle)
            totals.append(r.total)
            for (k, v) in r.phases { phases[k, default: []].append(v) }
            removePod(grpc, r.tasks, id: id)
        }
        var rows = [ContainerBenchmark.Row]()
        rows.append(ContainerBenchmark.row("kuasar pod start, serial", totals))
        // The transport's share: the same four round trips and the ttrpc dial, asking
        // for nothing (Platform twice, State of an unknown task twice).
        _ = try startPod(grpc, id: "floor", bundle: bundle)
        let floor = try ContainerBenchmark.measure(runs) { _ in
            var p = Containerd_Services_Sandbox_V1_ControllerPlatformRequest()
            p.sandboxID = "floor"
            p.sandboxer = "kuasar"
            _ = try grpc.call(controller, "Platform", p, as: Containerd_Services_Sandbox_V1_ControllerPlatformResponse.self, metadata: md)
            _ = try grpc.call(controller, "Platform", p, as: Containerd_Services_Sandbox_V1_ControllerPlatformResponse.self, metadata: md)
            let t = try OneShotClient(path: root + "/floor/task.sock")
            var st = Containerd_Task_V3_StateRequest()
            st.id = "none"
            _ = try? t.call(task, "State", st, as: Containerd_Task_V3_StateResponse.self, namespace: "k8s.io")
            _ = try? t.call(task, "State", st, as: Containerd_Task_V3_StateResponse.self, namespace: "k8s.io")
            t.close()
        }
        if let t = try? OneShotClient(path: root + "/floor/task.sock") { removePod(grpc, t, id: "floor") }
        rows.append(ContainerBenchmark.row("transport floor: 4 empty calls + ttrpc dial", floor))
        let perCall = phases.mapValues { v in v.sorted()[v.count / 2] }
        log("  serial: p50 \(rows[0].p50ms.map { "\($0)" } ?? "-") ms; per call \(perCall)")

        // Parallel pods: each client on its own thread and connections, all at once.
        let results = ParallelResults()
        let t0 = MonotonicClock.nanoseconds()
        DispatchQueue.concurrentPerform(iterations: parallel) { i in
            do {
                let c = try GRPCClient(path: socket)
                let r = try startPod(c, id: "par\(i)", bundle: bundle)
                results.add(r.total, id: "par\(i)", r.tasks)
            } catch {
                results.fail("\(error)")
            }
        }
        let wall = Double(MonotonicClock.nanoseconds() - t0) / 1e6
        if let e = results.error { log("  parallel: \(e)") }
        rows.append(ContainerBenchmark.row("kuasar pod start, \(parallel) in parallel", results.totals))
        for (id, t) in results.tasks { removePod(grpc, t, id: id) }
        log("  parallel: p50 \(rows[2].p50ms.map { "\($0)" } ?? "-") ms, wall \(wall) ms")

        // Memory with N pods (one sleeping container each).
        var memory: [Memory] = []
        var live: [(String, OneShotClient)] = []
        for n in memoryPoints {
            while live.count < n {
                let id = "m\(live.count)"
                let r = try startPod(grpc, id: id, bundle: bundle)
                live.append((id, r.tasks))
                if live.count % 100 == 0 { for (_, t) in live.suffix(100) { t.close() } }
            }
            usleep(300_000)
            let holders = Self.holders(of: daemonPID)
            memory.append(Memory(sandboxes: n, daemonPSSkB: ContainerBenchmark.pss(daemonPID), keeperPSSkB: ContainerBenchmark.pss(keeperPID),
                                 holdersPSSkB: holders.reduce(0) { $0 + ContainerBenchmark.pss($1) }, holders: holders.count))
            log("  memory \(n) pods: daemon \(memory.last!.daemonPSSkB) kB, keeper \(memory.last!.keeperPSSkB) kB, \(holders.count) holders \(memory.last!.holdersPSSkB) kB")
        }
        for (id, _) in live {
            if let t = try? OneShotClient(path: root + "/\(id)/task.sock") { removePod(grpc, t, id: id) }
        }

        // containerd 1.6 whole commands: ctr run -d, runc shim vs ours, interleaved.
        var ctdRows: [ContainerBenchmark.Row] = []
        var speedup: Double?
        var containerdOwn: Double?
        let runcName = "ctr run -d: containerd 1.6 + shim-runc-v2 + runc", oursName = "ctr run -d: containerd 1.6 + kuasar (shim v2 protocol)"
        do {
            let ctd = try Containerd(dir: work + "/ctd", kuasar: kuasar)
            defer { ctd.stop() }
            let n = max(10, runs / 8)
            var runc: [Double] = [], ours: [Double] = []
            var failed: [String: String] = [:]
            // Interleaved; a runtime whose `ctr run` fails once is not timed again, and its row says why.
            for i in 0..<(n + 2) {
                for (runtime, id) in [("io.containerd.runc.v2", "r\(i)"), ("io.containerd.kuasar.v2", "k\(i)")] where failed[runtime] == nil {
                    let ms: Double
                    do { ms = try ctd.timedRun(runtime, id) } catch {
                        failed[runtime] = "\(error)"
                        log("  ctr run \(runtime): FAILED: \(error)")
                        continue
                    }
                    if i >= 2 { if runtime.hasSuffix("runc.v2") { runc.append(ms) } else { ours.append(ms) } }
                }
            }
            func ctdRow(_ name: String, _ runtime: String, _ ms: [Double]) -> ContainerBenchmark.Row {
                if let why = failed[runtime] { return ContainerBenchmark.Row(runtime: name, runs: 0, failed: why) }
                return ContainerBenchmark.row(name, ms)
            }
            ctdRows = [ctdRow(runcName, "io.containerd.runc.v2", runc), ctdRow(oursName, "io.containerd.kuasar.v2", ours)]
            if let theirs = ctdRows[0].p50ms, let mine = ctdRows[1].p50ms {
                speedup = theirs / mine
                // What the daemon itself spends on the same container: Task Create + Start.
                containerdOwn = mine - ((perCall["Task.Create"] ?? 0) + (perCall["Task.Start"] ?? 0))
            }
        } catch {
            log("  containerd: FAILED to start: \(error)")
            ctdRows = [ContainerBenchmark.Row(runtime: runcName, runs: 0, failed: "containerd: \(error)"),
                       ContainerBenchmark.Row(runtime: oursName, runs: 0, failed: "containerd: \(error)")]
        }

        let f = ReactorBenchmark.fmt, pad = ReactorBenchmark.pad
        print("\npod start (Controller Create+Start, Task Create+Start of one container), from the gRPC/ttrpc client:")
        print(pad("", 58) + pad("runs", 6) + pad("p50 ms", 10) + pad("p99 ms", 10) + "mean ms")
        for r in rows + ctdRows { ContainerBenchmark.printRow(r, width: 58, ratio: nil) }
        let inDaemon = (rows[0].p50ms ?? .nan) - (rows[1].p50ms ?? .nan)
        print("in the daemon (serial p50 minus the transport floor): \(f(inDaemon)) ms")
        print("p50 per call (serial): " + perCall.sorted { $0.key < $1.key }.map { "\($0.key) \(f($0.value))" }.joined(separator: ", "))
        print("\(parallel) pods in parallel: all ready after \(f(wall)) ms (one daemon thread)")
        if let speedup, let containerdOwn {
            let mine = ctdRows[1].p50ms ?? .nan
            print("ctr run -d: kuasar is \(f(speedup))x faster than shim-runc-v2 + runc; of kuasar's \(f(mine)) ms, ~\(f(containerdOwn)) ms is ctr + containerd (the daemon's Task Create+Start p50 is \(f(mine - containerdOwn)) ms)")
        }
        print("memory (PSS) with N pods, one sleeping container each:")
        for m in memory {
            print("  \(m.sandboxes) pods: daemon \(m.daemonPSSkB) kB, keeper \(m.keeperPSSkB) kB, \(m.holders) pod holders \(m.holdersPSSkB) kB; daemon + holders \(m.daemonPSSkB + m.holdersPSSkB) kB")
        }
        let report = Report(date: ISO8601DateFormatter().string(from: Date()), peers: ContainerBenchmark.peerVersions(), rows: rows, perCallP50ms: perCall, inDaemonP50ms: inDaemon, parallelWallMs: wall,
                            containerd: ctdRows, ctrRunSpeedup: speedup, containerdOwnMs: containerdOwn, memory: memory)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let path = ReactorBenchmark.resultsDirectory() + "/pod.json"
        try encoder.encode(report).write(to: URL(fileURLWithPath: path))
        print("wrote \(path)")
    }

    final class ParallelResults: @unchecked Sendable {
        private let lock = NSLock()
        private(set) var totals: [Double] = []
        private(set) var tasks: [(String, OneShotClient)] = []
        private(set) var error: String?
        func add(_ t: Double, id: String, _ c: OneShotClient) { lock.lock(); totals.append(t); tasks.append((id, c)); lock.unlock() }
        func fail(_ e: String) { lock.lock(); if error == nil { error = e }; lock.unlock() }
    }

    /// A private containerd 1.6 with our shim on its PATH and a busybox image imported offline.
    final class Containerd {
        static let image = "docker.io/library/busybox:latest"
        let dir: String
        let pid: pid_t
        let pidfd: Int32
        var ctr: String { "ctr -a \(dir)/containerd.sock -n perf" }

        /// `shims`: the names our binary answers to on containerd's PATH (each maps a
        /// runtime `io.containerd.<name>.v2` to a kind); `kuasarConfig`: the daemon's config.
        init(dir: String, kuasar: String, shims: [String] = ["containerd-shim-kuasar-v2"], kuasarConfig: String = "[daemon]\non_exit = \"stop\"\n") throws {
            self.dir = dir
            try FileManager.default.createDirectory(atPath: dir + "/bin", withIntermediateDirectories: true)
            for shim in shims { symlink(kuasar, dir + "/bin/" + shim) }
            try """
            version = 2
            root = "\(dir)/root"
            state = "\(dir)/state"
            disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
            [grpc]
              address = "\(dir)/containerd.sock"
            """.write(toFile: dir + "/config.toml", atomically: true, encoding: .utf8)
            try kuasarConfig.write(toFile: dir + "/kuasar.toml", atomically: true, encoding: .utf8)
            let log = open(dir + "/containerd.log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            defer { close(log) }
            var env = ProcessInfo.processInfo.environment.filter { $0.key != "PATH" }.map { "\($0.key)=\($0.value)" }
            env += ["PATH=\(dir)/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "KUASAR_ROOT=\(dir)/kuasar", "KUASAR_CONFIG=\(dir)/kuasar.toml"]
            let p = try Spawner.spawn(ProcessSpec(executable: "/usr/bin/containerd", arguments: ["containerd", "--config", dir + "/config.toml"],
                                                  environment: env, fdMap: [(log, 1), (log, 2)]))
            pid = p.pid
            pidfd = p.pidfd.take()
            for _ in 0..<300 where access(dir + "/containerd.sock", F_OK) != 0 { usleep(10_000) }
            do { _ = try ContainerBenchmark.sh("python3 \(PodBenchmark.repositoryRoot)/Tests/Peers/containerd/make_image.py \(dir)/busybox.tar \(Self.image) >/dev/null && \(ctr) images import \(dir)/busybox.tar >/dev/null") } catch {
                stop()
                throw SystemError("containerd", "image import failed (\(error)); see \(dir)/containerd.log", errno: .EIO)
            }
        }

        /// `ctr run -d` of a sleeping busybox through `runtime`: its wall time (ms); then the
        /// container is killed and deleted (not timed).
        func timedRun(_ runtime: String, _ id: String) throws -> Double {
            let t = MonotonicClock.nanoseconds()
            _ = try ContainerBenchmark.sh("\(ctr) run -d --runtime \(runtime) \(Self.image) \(id) sleep 3600 >/dev/null")
            let ms = Double(MonotonicClock.nanoseconds() - t) / 1e6
            ContainerBenchmark.shIgnoringFailure("\(ctr) task kill -s SIGKILL \(id) >/dev/null 2>&1; for j in $(seq 1 100); do \(ctr) task delete \(id) >/dev/null 2>&1 && break; sleep 0.05; done; \(ctr) container delete \(id) >/dev/null 2>&1")
            return ms
        }

        func stop() {
            _ = try? sendSignal(pidfd: pidfd, SIGTERM)
            _ = waitpid(pid, nil, 0)
            close(pidfd)
            if let p = Daemon.pid(root: dir + "/kuasar") {
                kill(p, SIGTERM)
                for _ in 0..<300 where kill(p, 0) == 0 { usleep(10_000) }
            }
            ContainerBenchmark.shIgnoringFailure("umount -R \(dir)/root 2>/dev/null")
        }
    }
}
