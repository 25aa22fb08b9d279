#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Runtime
import SwiftProtobuf

/// The guest agent, in one run:
/// - boot to agent-ready (QEMU start → the first Check answered over virtio-serial)
///   against the same kernel and QEMU command line booting a /init that only prints a
///   line (QEMU start → that line on the serial console), alternating, `boots` each;
///   with the guest-side breakdown the agent reports (kernel, mounts, modules, share);
/// - Create+Start+Wait+Delete of `/bin/true` inside the guest over the channel, against
///   the same calls to `kuasar agent --listen` on the host (a namespace sandbox there);
/// - the agent's RSS in the guest, and the image's sizes;
/// - with `--against INITRD`, another image's agent (an earlier build, say) booted in the
///   same rounds, alternating with this one: its first answer and its own time, from the
///   kernel's hand-over to the first call read, paired round by round with this image's
///   (boots on a noisy machine spread more than a change moves them; pairs do not drift).
/// Writes perf/results/agent.json. Needs `make guest` (the image in .build/guest) and QEMU.
enum AgentBenchmark {
    static let work = "/tmp/kuasar-perf-agent"
    static let agentService = "kuasar.agent.v1.Agent"
    static let task = "containerd.task.v3.Task"

    struct Report: Codable {
        var date: String
        var accelerator: String
        var qemu: String
        var boots: Int
        var baselineInitMs: ContainerBenchmark.Row
        var agentReadyMs: ContainerBenchmark.Row
        /// agent-ready p50 / baseline p50: the goal is ≤ 1.10.
        var readyRatio: Double?
        /// The same per round (each agent boot over the baseline boot just before it):
        /// p25, p50, p75. Neighbouring boots share the machine's load of the moment, so
        /// this drifts less than the ratio of two p50s taken over minutes.
        var roundRatios: [Double]?
        /// Guest-side, from the agent's Check (p50 of each step, ms).
        var guestBreakdownMs: [String: Double]
        var lifecycleInGuest: ContainerBenchmark.Row
        var lifecycleOnHost: ContainerBenchmark.Row
        var lifecycleRatio: Double?
        var agentRSSKiB: Int?
        var agentBinaryBytes: Int
        var initrdBytes: Int
        var vmlinuxBytes: Int
        /// `--against`: the other image's first answer, and both images' own time (ms).
        var against: Against?
    }

    struct Against: Codable {
        var initrd: String
        var readyMs: ContainerBenchmark.Row
        /// p50 of (this image - the other) over the rounds both answered.
        var readyDifferenceMs: Double?
        /// The agent's own time, from the kernel's hand-over to the first call read.
        var ownMs: Double?
        var againstOwnMs: Double?
        var ownDifferenceMs: Double?
        /// The own time over the kernel's part of the same boot (p50 of each image's, and
        /// of their difference by round). The kernel's part is the same work in every boot,
        /// so it measures how fast the machine emulated that boot: two runs of one image
        /// here differed by 150 ms end to end and 170 ms in the kernel's part, paired, and
        /// in opposite directions from one run to the next.
        var ownPerKernel: Double?
        var againstOwnPerKernel: Double?
        var ownPerKernelDifference: Double?
        var againstBreakdownMs: [String: Double]
    }

    /// One image's first answers, by round.
    struct Answers {
        var ready: [Int: Double] = [:]
        /// The agent's own time (`ownMs`), and the same over that boot's kernel part.
        var own: [Int: Double] = [:], ownPerKernel: [Int: Double] = [:]
        var breakdown: [String: [Double]] = [:]
        mutating func add(_ round: Int, readyMs: Double, bootMs: [String: Double]) {
            ready[round] = readyMs
            let mine = ownMs(bootMs)
            own[round] = mine
            if let k = bootMs["kernel"], k > 0 { ownPerKernel[round] = mine / k }
            for (k, v) in bootMs { breakdown[k, default: []].append(v) }
        }
    }

    /// The agent's own part of a boot in its Check breakdown: after the kernel's, to the first call read.
    static func ownMs(_ bootMs: [String: Double]) -> Double {
        ["runtime", "main", "init", "serve", "firstCall"].reduce(0) { $0 + (bootMs[$1] ?? 0) }
    }

    /// Waits (60 s at most) for the first Check `vm`'s agent answers: QEMU start to then,
    /// its answer, and the client that got it.
    static func firstAnswer(_ vm: VM, round: String) -> (ms: Double, check: Kuasar_Agent_V1_CheckResponse, client: OneShotClient)? {
        var client: OneShotClient?
        var lastError = "QEMU's channel socket never accepted a connection"
        while vm.ms() < 60_000 {
            if client == nil {
                do { client = try OneShotClient(path: vm.channel) } catch { lastError = "connect: \(error)" }
            }
            guard let c = client else { usleep(2_000); continue }
            do {
                let check = try c.call(agentService, "Check", Kuasar_Agent_V1_CheckRequest(), as: Kuasar_Agent_V1_CheckResponse.self, timeoutNS: 20_000_000)
                return (vm.ms(), check, c)
            } catch let error as RPCError where error.code == .deadlineExceeded {
                lastError = "Check: \(error)"
            } catch {
                // Not a timeout: the connection is gone; a new one next time round.
                lastError = "Check: \(error)"
                c.close()
                client = nil
                usleep(2_000)
            }
        }
        client?.close()
        let console = (try? String(contentsOfFile: vm.console, encoding: .utf8)) ?? ""
        ContainerBenchmark.log("agent: \(round): no answer in 60 s (last: \(lastError)); the end of its console:\n\(console.suffix(3000))")
        return nil
    }

    /// The command line of ../shared/MACHINE.md's fastest TCG boot, with the agent's devices.
    static func qemu(initrd: String, image: String, console: String, channel: String, share: String) -> [String] {
        // The guest kernel's command line is the QEMU driver's own.
        let append = QEMU.kernelCommandLine(VMSpec(id: "perf", stateDir: "/", kernel: "", initrd: "", memoryMiB: 128, vcpus: 2, accelerator: .tcg, sharePath: share))
        return ["qemu-system-x86_64", "-M", "microvm,pic=off,pit=off", "-accel", "tcg", "-cpu", "qemu64,+rdrand", "-m", "128", "-smp", "2",
                "-nographic", "-no-reboot", "-nodefaults", "-serial", "file:" + console,
                "-kernel", image + "/vmlinux", "-initrd", initrd, "-append", append,
                "-chardev", "socket,id=ch0,path=\(channel),server=on,wait=off",
                "-device", "virtio-serial-device", "-device", "virtserialport,chardev=ch0,name=agent",
                "-fsdev", "local,id=fs0,path=\(share),security_model=passthrough",
                "-device", "virtio-9p-device,fsdev=fs0,mount_tag=kuasar"]
    }

    final class VM {
        let pidfd: Int32
        let pid: pid_t
        let started: UInt64
        let console: String
        let channel: String
        /// `qemuOptions` go first on QEMU's command line (the TCG profile's `-d`).
        init(initrd: String, image: String, dir: String, share: String, qemuOptions: [String] = []) throws {
            console = dir + "/console.log"
            channel = dir + "/agent.sock"
            unlink(console); unlink(channel)
            let null = open("/dev/null", O_RDWR | O_CLOEXEC)
            defer { close(null) }
            let argv = AgentBenchmark.qemu(initrd: initrd, image: image, console: console, channel: channel, share: share)
            started = MonotonicClock.nanoseconds()
            let p = try Spawner.spawn(ProcessSpec(executable: "/usr/bin/qemu-system-x86_64",
                                                  arguments: [argv[0]] + qemuOptions + argv.dropFirst(),
                                                  fdMap: [(null, 0), (null, 1), (null, 2)]))
            pid = p.pid
            pidfd = p.pidfd.take()
        }
        func ms() -> Double { Double(MonotonicClock.nanoseconds() - started) / 1e6 }
        func kill() {
            try? sendSignal(pidfd: pidfd, SIGKILL)
            var info = siginfo_t()
            _ = waitid(P_PIDFD, id_t(pidfd), &info, WEXITED)
            close(pidfd)
        }
    }

    static func run(boots: Int, lifecycles: Int, against: String? = nil) throws {
        let log = ContainerBenchmark.log
        let root = PodBenchmark.repositoryRoot
        let image = root + "/.build/guest"
        guard access(image + "/initrd.lz4", R_OK) == 0, access("/usr/bin/qemu-system-x86_64", X_OK) == 0 else {
            log("agent: needs the guest image (make guest) and qemu-system-x86")
            return
        }
        guard let kuasar = PodBenchmark.kuasarBinary() else { log("agent: no kuasar binary"); return }
        ContainerBenchmark.shIgnoringFailure("rm -rf \(work)")
        let share = work + "/share"
        try FileManager.default.createDirectory(atPath: share, withIntermediateDirectories: true)
        _ = try ContainerBenchmark.sh("python3 \(root)/guest/build.py --baseline --out \(work)")
        let bundle = share + "/true"
        try ContainerBenchmark.makeBundle(bundle, args: ["true"])
        try ContainerBenchmark.makeBundle(share + "/rss", args: ["sh", "-c", "grep VmRSS /proc/1/status"])
        // The rss bundle shares the guest's pid namespace (to see PID 1); neither has a network namespace.
        for b in [bundle, share + "/rss"] {
            let url = URL(fileURLWithPath: b + "/config.json")
            var spec = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
            var linux = spec["linux"] as! [String: Any]
            linux["namespaces"] = (linux["namespaces"] as! [[String: Any]]).filter { ($0["type"] as! String) != "network" && !(b.hasSuffix("rss") && ($0["type"] as! String) == "pid") }
            spec["linux"] = linux
            try JSONSerialization.data(withJSONObject: spec).write(to: url)
        }

        var baselineByRound: [Int: Double] = [:]
        var inGuest: [Double] = []
        var rss: Int?
        // This image's answers by round, and --against's to pair them with.
        var this = Answers(), other = Answers()
        func bootAgainst(_ round: Int) throws {
            guard let against else { return }
            let vm = try VM(initrd: against, image: image, dir: work, share: share)
            defer { vm.kill() }
            guard let answer = firstAnswer(vm, round: "--against boot \(round)") else { return }
            let (ms, check, c) = answer
            c.close()
            other.add(round, readyMs: ms, bootMs: check.bootMs)
        }
        for i in 0..<boots {
            // The floor: the same kernel to a line printed by /init.
            let b = try VM(initrd: work + "/initrd-baseline.lz4", image: image, dir: work, share: share)
            var seen = false
            while b.ms() < 60_000 {
                if ((try? String(contentsOfFile: b.console, encoding: .utf8)) ?? "").contains("kuasar-baseline-ready") { seen = true; break }
                usleep(2_000)
            }
            if seen { baselineByRound[i] = b.ms() }
            b.kill()
            // The other image before this one in odd rounds, after it in even ones.
            if i % 2 == 1 { try bootAgainst(i) }
            defer { if i % 2 == 0 { try? bootAgainst(i) } }
            // The agent: to its first answer over the channel.
            let vm = try VM(initrd: image + "/initrd.lz4", image: image, dir: work, share: share)
            defer { vm.kill() }
            guard let answer = firstAnswer(vm, round: "boot \(i)") else { continue }
            let (readyMs, check, c) = answer
            this.add(i, readyMs: readyMs, bootMs: check.bootMs)
            // The rest, from QEMU's start: what QEMU takes before the kernel runs, and the
            // first answer from the moment the agent read its call until the host has it.
            this.breakdown["qemuAndAnswer", default: []].append(readyMs - (check.bootMs["kernel"] ?? 0) - ownMs(check.bootMs))
            if i == boots - 1 {
                // Warm the translation cache, then time the lifecycle inside the guest.
                for n in 0..<(lifecycles + 3) {
                    let t = MonotonicClock.nanoseconds()
                    try lifecycle(c, id: "g\(n)", bundle: GuestInit.sharePath + "/true")
                    if n >= 3 { inGuest.append(Double(MonotonicClock.nanoseconds() - t) / 1e6) }
                }
                var create = Containerd_Task_V3_CreateTaskRequest()
                create.id = "rss"
                create.bundle = GuestInit.sharePath + "/rss"
                create.stdout = "stream:"
                _ = try c.call(task, "Create", create, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
                var start = Containerd_Task_V3_StartRequest()
                start.id = "rss"
                _ = try c.call(task, "Start", start, as: Containerd_Task_V3_StartResponse.self, namespace: "k8s.io")
                var read = Kuasar_Agent_V1_ReadStdioRequest()
                read.containerID = "rss"
                var text = ""
                while true {
                    let r = try c.call(agentService, "ReadStdio", read, as: Kuasar_Agent_V1_ReadStdioResponse.self)
                    if r.eof { break }
                    text += String(decoding: r.data, as: UTF8.self)
                    read.offset = r.offset + UInt64(r.data.count)
                }
                rss = text.split(separator: " ", omittingEmptySubsequences: true).compactMap { Int($0) }.first
            }
            c.close()
        }

        // The same lifecycle against the agent on the host (a plain namespace sandbox).
        let hostRoot = work + "/host"
        let sock = work + "/host.sock"
        let logFD = open(work + "/host-agent.log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let host = try Spawner.spawn(ProcessSpec(executable: kuasar, arguments: ["kuasar", "agent", "--listen", "unix://" + sock, "--root", hostRoot, "--cgroup-parent", "kuasar-perf-agent"], fdMap: [(logFD, 2)]))
        close(logFD)
        let hostPidfd = host.pidfd.take()
        defer {
            try? sendSignal(pidfd: hostPidfd, SIGTERM)
            var info = siginfo_t()
            _ = waitid(P_PIDFD, id_t(hostPidfd), &info, WEXITED)
            close(hostPidfd)
        }
        var onHost: [Double] = []
        for _ in 0..<200 where access(sock, F_OK) != 0 { usleep(10_000) }
        let hc = try OneShotClient(path: sock)
        for n in 0..<(lifecycles + 3) {
            let t = MonotonicClock.nanoseconds()
            try lifecycle(hc, id: "h\(n)", bundle: bundle)
            if n >= 3 { onHost.append(Double(MonotonicClock.nanoseconds() - t) / 1e6) }
        }
        hc.close()

        func p50(_ xs: [Double]) -> Double? { xs.isEmpty ? nil : xs.sorted()[xs.count / 2] }
        // p50 of this image's minus the other's, over the rounds both answered.
        func paired(_ a: [Int: Double], _ b: [Int: Double]) -> Double? { p50(a.compactMap { r, x in b[r].map { x - $0 } }) }
        let baseline = Array(baselineByRound.values)
        let manifest = (try? JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: image + "/manifest.json")))) as? [String: Any] ?? [:]
        let bytes = manifest["bytes"] as? [String: Int] ?? [:]
        let bRow = ContainerBenchmark.row("baseline /init (prints a line)", baseline)
        let ready = Array(this.ready.values)
        let aRow = ContainerBenchmark.row("kuasar agent (first Check over virtio-serial)", ready)
        let gRow = ContainerBenchmark.row("in the guest, over the channel", inGuest)
        let hRow = ContainerBenchmark.row("kuasar agent --listen on the host", onHost)
        let report = Report(
            date: ISO8601DateFormatter().string(from: Date()), accelerator: "tcg",
            qemu: (try? ContainerBenchmark.sh("qemu-system-x86_64 --version | head -1"))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "",
            boots: boots, baselineInitMs: bRow, agentReadyMs: aRow,
            readyRatio: p50(ready).flatMap { a in p50(baseline).map { a / $0 } },
            roundRatios: { (r: [Double]) in r.isEmpty ? nil : [r[r.count / 4], r[r.count / 2], r[r.count * 3 / 4]] }(
                this.ready.compactMap { i, a in baselineByRound[i].map { a / $0 } }.sorted()),
            guestBreakdownMs: this.breakdown.compactMapValues { p50($0) },
            lifecycleInGuest: gRow, lifecycleOnHost: hRow,
            lifecycleRatio: p50(inGuest).flatMap { g in p50(onHost).map { g / $0 } },
            agentRSSKiB: rss, agentBinaryBytes: manifest["agentBytes"] as? Int ?? 0,
            initrdBytes: bytes["initrd.lz4"] ?? 0, vmlinuxBytes: bytes["vmlinux"] ?? 0,
            against: against.map { path in
                Against(
                    initrd: path, readyMs: ContainerBenchmark.row("the --against image's agent (first Check)", Array(other.ready.values)),
                    readyDifferenceMs: paired(this.ready, other.ready),
                    ownMs: p50(Array(this.own.values)), againstOwnMs: p50(Array(other.own.values)),
                    ownDifferenceMs: paired(this.own, other.own),
                    ownPerKernel: p50(Array(this.ownPerKernel.values)), againstOwnPerKernel: p50(Array(other.ownPerKernel.values)),
                    ownPerKernelDifference: paired(this.ownPerKernel, other.ownPerKernel),
                    againstBreakdownMs: other.breakdown.compactMapValues { p50($0) })
            })
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(report).write(to: URL(fileURLWithPath: root + "/perf/results/agent.json"))
        log("agent: baseline p50 \(p50(baseline) ?? -1) ms, agent-ready p50 \(p50(ready) ?? -1) ms (ratio \(report.readyRatio ?? -1); by round p25/p50/p75 \(report.roundRatios ?? [])); breakdown \(report.guestBreakdownMs)")
        if let a = report.against {
            log("agent: --against \(a.initrd): its first answer p50 \(a.readyMs.p50ms ?? .nan) ms; this image minus it, paired by round: \(a.readyDifferenceMs ?? .nan) ms end to end, own time \(a.ownMs ?? .nan) vs \(a.againstOwnMs ?? .nan) ms (paired \(a.ownDifferenceMs ?? .nan) ms); own over kernel \(a.ownPerKernel ?? .nan) vs \(a.againstOwnPerKernel ?? .nan) (paired \(a.ownPerKernelDifference ?? .nan))")
        }
        log("agent: lifecycle in guest p50 \(p50(inGuest) ?? -1) ms vs on host \(p50(onHost) ?? -1) ms; agent RSS \(rss ?? -1) KiB; agent \(report.agentBinaryBytes) B, initrd \(report.initrdBytes) B")
        ContainerBenchmark.shIgnoringFailure("rm -rf \(work)")
    }

    static func lifecycle(_ c: OneShotClient, id: String, bundle: String) throws {
        var create = Containerd_Task_V3_CreateTaskRequest()
        create.id = id
        create.bundle = bundle
        _ = try c.call(task, "Create", create, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
        var start = Containerd_Task_V3_StartRequest()
        start.id = id
        _ = try c.call(task, "Start", start, as: Containerd_Task_V3_StartResponse.self, namespace: "k8s.io")
        var wait = Containerd_Task_V3_WaitRequest()
        wait.id = id
        let w = try c.call(task, "Wait", wait, as: Containerd_Task_V3_WaitResponse.self, namespace: "k8s.io")
        guard w.exitStatus == 0 else { throw RPCError(.internal, "\(id) exited \(w.exitStatus)") }
        var del = Containerd_Task_V3_DeleteRequest()
        del.id = id
        _ = try c.call(task, "Delete", del, as: Containerd_Task_V3_DeleteResponse.self, namespace: "k8s.io")
    }
}
