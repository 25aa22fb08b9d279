#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Runtime
import SwiftProtobuf

/// VM pods, in one run, through the real daemon as containerd 2.x drives it:
/// - pod ready (Controller Create + Start, the agent answered and the guest set up) and
///   the first container started (Task Create + Start through the host's Task API),
///   against raw QEMU booting the same kernel with the same command line (the driver's
///   own) to a /init that only prints a line on the serial console;
/// - where the daemon's Start goes (VMM up, agent's first answer, set-up) and the guest's
///   own breakdown (kernel, runtime, mounts, modules, share);
/// - memory per VM pod (QEMU PSS + the daemon's growth) at 1 and 10 pods.
/// Writes perf/results/vm.json. Needs `make guest` and qemu-system-x86.
enum VMBenchmark {
    static let work = "/tmp/kuasar-perf-vm"
    static let controller = "containerd.services.sandbox.v1.Controller"
    static let task = "containerd.task.v3.Task"
    static let md = [("containerd-namespace", "k8s.io")]

    struct Memory: Codable {
        /// "cold" or "clone" (vm-templates); nil in vm.json, where every pod boots.
        var kind: String? = nil
        var pods: Int
        var qemuPSSkB: Int
        var daemonGrowthkB: Int
        var perPodkB: Int
    }

    struct Report: Codable {
        var date: String
        var accelerator: String
        var qemu: String
        var boots: Int
        var rawBootMs: ContainerBenchmark.Row
        var podReadyMs: ContainerBenchmark.Row
        var firstContainerMs: ContainerBenchmark.Row
        /// pod ready p50 / raw boot p50: the goal is ≤ 1.10.
        var readyRatio: Double?
        /// The daemon's Start, p50 per step (ms from Start's beginning to the step's end).
        var startStepsMs: [String: Double]
        /// The guest's own boot, p50 per step (from the agent's Check).
        var guestBootMs: [String: Double]
        var memory: [Memory]
        /// containerd 1.6, `ctr run -d`: the vm kind's handler against runc's, interleaved.
        var containerd: [ContainerBenchmark.Row]
        /// vm handler p50 / runc handler p50: what a VM per pod costs over a runc container.
        var ctrRunRatio: Double?
    }

    static func pss(_ pid: pid_t) -> Int {
        let text = (try? String(contentsOfFile: "/proc/\(pid)/smaps_rollup", encoding: .utf8)) ?? ""
        for line in text.split(separator: "\n") where line.hasPrefix("Pss:") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? 0
        }
        return 0
    }

    /// The raw boot: QEMU with the driver's command line, the baseline initrd; QEMU start →
    /// the line on the console socket.
    static func rawBoot(_ spec: VMSpec) throws -> Double? {
        for s in [spec.consoleSocket, spec.agentSocket, spec.controlSocket] { unlink(s) }
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        let t0 = MonotonicClock.nanoseconds()
        let p = try Spawner.spawn(ProcessSpec(executable: "/usr/bin/qemu-system-x86_64",
                                              arguments: QEMU.arguments(binary: "/usr/bin/qemu-system-x86_64", machine: .microvm, spec),
                                              fdMap: [(null, 0), (null, 1), (null, 2)]))
        let pidfd = p.pidfd.take()
        defer {
            try? sendSignal(pidfd: pidfd, SIGKILL)
            var info = siginfo_t()
            _ = waitid(P_PIDFD, id_t(pidfd), &info, WEXITED)
            close(pidfd)
        }
        var fd: Int32 = -1
        while fd < 0 && MonotonicClock.nanoseconds() - t0 < 10_000_000_000 {
            if let c = try? Socket.connectUnix(path: spec.consoleSocket, blocking: true) { fd = c.take() } else { usleep(1000) }
        }
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var seen = ""
        var buf = [UInt8](repeating: 0, count: 4096)
        while MonotonicClock.nanoseconds() - t0 < 60_000_000_000 {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { return nil }
            seen += String(decoding: buf[..<n], as: UTF8.self)
            if seen.contains("kuasar-baseline-ready") { return Double(MonotonicClock.nanoseconds() - t0) / 1e6 }
        }
        return nil
    }

    /// containerd 1.6 with our shim named for the vm kind: `ctr run -d` of a sleeping
    /// busybox through `io.containerd.kuasar-vm.v2` (its first container boots the VM)
    /// and through `io.containerd.runc.v2`, interleaved; each VM gone before the next run.
    static func ctrRun(kuasar: String, config: String, runs: Int) -> [ContainerBenchmark.Row] {
        let log = ContainerBenchmark.log
        let vmName = "ctr run -d: containerd 1.6 + kuasar vm kind (a microVM per pod)", runcName = "ctr run -d: containerd 1.6 + shim-runc-v2 + runc"
        let dir = work + "/ctd"
        do {
            let ctd = try PodBenchmark.Containerd(dir: dir, kuasar: kuasar, shims: ["containerd-shim-kuasar-vm-v2"],
                                                  kuasarConfig: "[daemon]\non_exit = \"stop\"\n" + config)
            defer { ctd.stop() }
            var times: [String: [Double]] = [:]
            var failed: [String: String] = [:]
            let runtimes = ["io.containerd.kuasar-vm.v2", "io.containerd.runc.v2"]
            for i in 0..<(runs + 1) {
                for runtime in runtimes where failed[runtime] == nil {
                    let id = (runtime.contains("vm") ? "v" : "r") + "\(i)"
                    let ms: Double
                    do { ms = try ctd.timedRun(runtime, id) } catch {
                        failed[runtime] = "\(error)"
                        log("  ctr run \(runtime): FAILED: \(error)")
                        continue
                    }
                    if i >= 1 { times[runtime, default: []].append(ms) }  // the first of each warms caches
                    // The VM goes with its last container: not timed into the next run.
                    for _ in 0..<200 where VMBenchmark.qemuRunning(under: dir) { usleep(50_000) }
                }
            }
            return [(vmName, runtimes[0]), (runcName, runtimes[1])].map { name, runtime in
                if let why = failed[runtime] { return ContainerBenchmark.Row(runtime: name, runs: 0, failed: why) }
                return ContainerBenchmark.row(name, times[runtime] ?? [])
            }
        } catch {
            log("vm: containerd: FAILED to start: \(error)")
            return [ContainerBenchmark.Row(runtime: vmName, runs: 0, failed: "containerd: \(error)"), ContainerBenchmark.Row(runtime: runcName, runs: 0, failed: "containerd: \(error)")]
        }
    }

    static func qemuRunning(under dir: String) -> Bool {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc"))?.contains { name in
            guard Int(name) != nil, let cmd = FileManager.default.contents(atPath: "/proc/\(name)/cmdline") else { return false }
            let s = String(decoding: cmd.map { $0 == 0 ? 32 : $0 }, as: UTF8.self)
            return s.contains("qemu-system") && s.contains(dir)
        } ?? false
    }

    /// Controller Create + Start of a VM pod (ready: its agent answered, the guest set up),
    /// then its first container (Task Create + Start through the host).
    static func startPod(_ grpc: GRPCClient, _ id: String, bundle: String) throws -> (ready: Double, container: Double, tasks: OneShotClient, qemu: pid_t) {
        let t0 = MonotonicClock.nanoseconds()
        var create = Containerd_Services_Sandbox_V1_ControllerCreateRequest()
        create.sandboxID = id
        create.sandboxer = "kuasar-vm"
        _ = try grpc.call(controller, "Create", create, as: Containerd_Services_Sandbox_V1_ControllerCreateResponse.self, metadata: md)
        var start = Containerd_Services_Sandbox_V1_ControllerStartRequest()
        start.sandboxID = id
        start.sandboxer = "kuasar-vm"
        let started = try grpc.call(controller, "Start", start, as: Containerd_Services_Sandbox_V1_ControllerStartResponse.self, metadata: md)
        let t1 = MonotonicClock.nanoseconds()
        let tasks = try OneShotClient(path: String(started.address.dropFirst("ttrpc+unix://".count)))
        var tc = Containerd_Task_V3_CreateTaskRequest()
        tc.id = id + "-c"
        tc.bundle = bundle
        _ = try tasks.call(task, "Create", tc, as: Containerd_Task_V3_CreateTaskResponse.self, timeoutNS: 60_000_000_000, namespace: "k8s.io")
        var ts = Containerd_Task_V3_StartRequest()
        ts.id = tc.id
        _ = try tasks.call(task, "Start", ts, as: Containerd_Task_V3_StartResponse.self, timeoutNS: 60_000_000_000, namespace: "k8s.io")
        let t2 = MonotonicClock.nanoseconds()
        return (Double(t1 - t0) / 1e6, Double(t2 - t1) / 1e6, tasks, pid_t(started.pid))
    }

    /// Controller Status (verbose) of a VM pod: the daemon's info document.
    static func status(_ grpc: GRPCClient, _ id: String) -> [String: Any] {
        var r = Containerd_Services_Sandbox_V1_ControllerStatusRequest()
        r.sandboxID = id
        r.sandboxer = "kuasar-vm"
        r.verbose = true
        guard let s = try? grpc.call(controller, "Status", r, as: Containerd_Services_Sandbox_V1_ControllerStatusResponse.self, metadata: md),
              let text = s.info["info"], let json = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else { return [:] }
        return json
    }

    /// The guest image's directory and the kuasar binary, or nil (said in the log) when
    /// either, or QEMU, is missing.
    static func prerequisites(_ bench: String) -> (image: String, kuasar: String)? {
        let image = PodBenchmark.repositoryRoot + "/.build/guest"
        guard access(image + "/initrd.lz4", R_OK) == 0, access("/usr/bin/qemu-system-x86_64", X_OK) == 0 else {
            ContainerBenchmark.log("\(bench): needs the guest image (make guest) and qemu-system-x86")
            return nil
        }
        guard let kuasar = PodBenchmark.kuasarBinary() else { ContainerBenchmark.log("\(bench): no kuasar binary"); return nil }
        return (image, kuasar)
    }

    static func run(boots: Int, pods: Int) throws {
        let log = ContainerBenchmark.log
        let repo = PodBenchmark.repositoryRoot
        guard let (image, kuasar) = prerequisites("vm") else { return }
        ContainerBenchmark.shIgnoringFailure("umount -R \(work) 2>/dev/null; rm -rf \(work)")
        try FileManager.default.createDirectory(atPath: work + "/raw/share", withIntermediateDirectories: true)
        _ = try ContainerBenchmark.sh("python3 \(repo)/guest/build.py --baseline --out \(work)")
        let bundle = work + "/bundle"
        try ContainerBenchmark.makeBundle(bundle, args: ["sleep", "3600"])

        let root = work + "/kroot"
        let socket = root + "/kuasar.sock"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        let config = """
        [sandboxers]
        kuasar-vm = "vm"
        [vm]
        kernel = "\(image)/vmlinux"
        initrd = "\(image)/initrd.lz4"
        accelerator = "tcg"
        template = false

        """
        try config.write(toFile: work + "/config.toml", atomically: true, encoding: .utf8)
        let daemon = try PodBenchmark.DaemonProcess(kuasar: kuasar, root: root, socket: socket, config: work + "/config.toml", log: work + "/daemon.log", level: "warning")
        defer {
            daemon.stop()
            ContainerBenchmark.shIgnoringFailure("rm -rf \(work)")
        }
        let daemonPID = daemon.pid
        let grpc = daemon.grpc

        func startPod(_ id: String) throws -> (ready: Double, container: Double, tasks: OneShotClient, qemu: pid_t) {
            try VMBenchmark.startPod(grpc, id, bundle: bundle)
        }
        func removePod(_ id: String, _ tasks: OneShotClient) {
            PodBenchmark.removePod(grpc, tasks, id: id, sandboxer: "kuasar-vm")
        }
        func status(_ id: String) -> [String: Any] { VMBenchmark.status(grpc, id) }

        var raw: [Double] = [], ready: [Double] = [], container: [Double] = []
        var steps: [String: [Double]] = [:], guest: [String: [Double]] = [:]
        var rawSpec = VMSpec(id: "raw", stateDir: work + "/raw", kernel: image + "/vmlinux", initrd: work + "/initrd-baseline.lz4",
                             memoryMiB: 256, vcpus: 1, accelerator: .tcg, sharePath: work + "/raw/share")
        rawSpec.kernelArgs = []
        for i in 0..<boots {
            // Alternating, so drift hits both alike.
            if let ms = try rawBoot(rawSpec) { raw.append(ms) }
            let id = "b\(i)"
            let r = try startPod(id)
            ready.append(r.ready)
            container.append(r.container)
            let info = status(id)
            for (k, v) in (info["start_ms"] as? [String: Double]) ?? [:] { steps[k, default: []].append(v) }
            for (k, v) in (info["guest_boot_ms"] as? [String: Double]) ?? [:] { guest[k, default: []].append(v) }
            removePod(id, r.tasks)
        }

        // Memory: QEMU's PSS (the guest's RAM it touched, QEMU itself) and the daemon's growth.
        var memory: [Memory] = []
        let base = pss(daemonPID)
        log("vm: daemon pid \(daemonPID), PSS \(base) kB before the pods")
        var running: [(String, OneShotClient, pid_t)] = []
        for n in 1...max(1, pods) {
            let id = "m\(n)"
            let r = try startPod(id)
            running.append((id, r.tasks, r.qemu))
            if n == 1 || n == pods {
                sleep(2)
                let q = running.reduce(0) { $0 + pss($1.2) }
                let d = max(0, pss(daemonPID) - base)
                memory.append(Memory(pods: n, qemuPSSkB: q, daemonGrowthkB: d, perPodkB: (q + d) / n))
                log("vm: \(n) pods: QEMU PSS \(q) kB, daemon growth \(d) kB, per pod \((q + d) / n) kB")
            }
        }
        for (id, t, _) in running { removePod(id, t) }

        let ctdRows = ctrRun(kuasar: kuasar, config: config, runs: max(3, boots / 2))

        func p50(_ xs: [Double]) -> Double? { xs.isEmpty ? nil : xs.sorted()[xs.count / 2] }
        let report = Report(
            date: ISO8601DateFormatter().string(from: Date()), accelerator: "tcg",
            qemu: (try? ContainerBenchmark.sh("qemu-system-x86_64 --version | head -1"))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "",
            boots: boots,
            rawBootMs: ContainerBenchmark.row("raw QEMU, same command line, /init prints a line", raw),
            podReadyMs: ContainerBenchmark.row("VM pod ready (Controller Create+Start)", ready),
            firstContainerMs: ContainerBenchmark.row("first container (Task Create+Start via the host)", container),
            readyRatio: p50(ready).flatMap { r in p50(raw).map { r / $0 } },
            startStepsMs: steps.compactMapValues { p50($0) }, guestBootMs: guest.compactMapValues { p50($0) }, memory: memory,
            containerd: ctdRows, ctrRunRatio: ctdRows[0].p50ms.flatMap { v in ctdRows[1].p50ms.map { v / $0 } })
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(report).write(to: URL(fileURLWithPath: repo + "/perf/results/vm.json"))
        log("vm: raw boot p50 \(p50(raw) ?? -1) ms, pod ready p50 \(p50(ready) ?? -1) ms (ratio \(report.readyRatio ?? -1)), first container p50 \(p50(container) ?? -1) ms")
        log("vm: daemon's Start steps \(report.startStepsMs); guest \(report.guestBootMs)")
        for r in ctdRows { log("vm: \(r.runtime): p50 \(r.p50ms ?? -1) ms over \(r.runs) runs\(r.failed.map { " FAILED \($0)" } ?? "")") }
        if let ratio = report.ctrRunRatio { log("vm: ctr run -d with the vm handler takes \(ReactorBenchmark.fmt(ratio))x runc's") }
    }
}
