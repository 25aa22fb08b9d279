#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Runtime

/// VM pods from a template against cold boots, in one run, through two real daemons on
/// the same guest image (one with `[vm] template = false`, one cloning its template),
/// pods started alternately so drift hits both alike:
/// - pod ready (Controller Create + Start) and the first container after it;
/// - where a clone's Start goes (VMM up, restored, agent, re-seeded + share, set-up);
/// - PSS of 10 running pods of each kind (QEMU + the daemon's growth), and the template's
///   RAM file (tmpfs, shared by every clone).
/// Writes perf/results/vm-templates.json.
enum VMTemplateBenchmark {
    static let work = "/tmp/kuasar-perf-vmt"
    static let templates = "/dev/shm/kuasar-perf-vm-templates"

    struct Report: Codable {
        var date: String
        var accelerator: String
        var runs: Int
        var templateBuildMs: Double?
        var templateRAMFileResidentMiB: Double?
        var coldReadyMs: ContainerBenchmark.Row
        var cloneReadyMs: ContainerBenchmark.Row
        var coldFirstContainerMs: ContainerBenchmark.Row
        var cloneFirstContainerMs: ContainerBenchmark.Row
        /// clone ready p50 / cold ready p50: the goal is ≤ 0.15.
        var readyRatio: Double?
        /// A clone's Start, p50 per step (ms from Start's beginning to the step's end).
        var cloneStartStepsMs: [String: Double]
        var memory: [VMBenchmark.Memory]
        /// containerd 1.6, `ctr run -d`: the vm handler whose VM is a clone, against runc's.
        var containerd: [ContainerBenchmark.Row]
        var ctrRunRatio: Double?
        var pool: String
    }

    static func run(runs: Int, pods: Int) throws {
        let log = ContainerBenchmark.log
        let repo = PodBenchmark.repositoryRoot
        guard let (image, kuasar) = VMBenchmark.prerequisites("vm-templates") else { return }
        ContainerBenchmark.shIgnoringFailure("umount -R \(work) 2>/dev/null; rm -rf \(work) \(templates)")
        let bundle = work + "/bundle"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        try ContainerBenchmark.makeBundle(bundle, args: ["sleep", "3600"])
        func config(template: Bool) -> String {
            """
            [sandboxers]
            kuasar-vm = "vm"
            [vm]
            kernel = "\(image)/vmlinux"
            initrd = "\(image)/initrd.lz4"
            accelerator = "tcg"
            template = \(template)
            template_dir = "\(templates)"

            """
        }
        func daemon(_ name: String, template: Bool) throws -> PodBenchmark.DaemonProcess {
            let root = work + "/" + name
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            try config(template: template).write(toFile: root + ".toml", atomically: true, encoding: .utf8)
            return try PodBenchmark.DaemonProcess(kuasar: kuasar, root: root, socket: root + "/kuasar.sock", config: root + ".toml", log: root + ".log", level: "warning")
        }
        let cold = try daemon("cold", template: false)
        let clones = try daemon("clones", template: true)
        defer {
            cold.stop()
            clones.stop()
            ContainerBenchmark.shIgnoringFailure("rm -rf \(work) \(templates)")
        }
        // The cloning daemon builds its template at start.
        var manifest: [String: Any] = [:]
        for _ in 0..<1200 where manifest.isEmpty {
            let names = ((try? FileManager.default.contentsOfDirectory(atPath: templates)) ?? []).filter { !$0.hasPrefix(".") }
            if let n = names.first, let d = FileManager.default.contents(atPath: templates + "/" + n + "/manifest.json"),
               let m = try? JSONSerialization.jsonObject(with: d) as? [String: Any] {
                manifest = m
                manifest["dir"] = templates + "/" + n
            } else {
                usleep(100_000)
            }
        }
        guard !manifest.isEmpty else { log("vm-templates: the daemon built no template in 120 s"); return }
        log("vm-templates: template built in \(manifest["build_ms"] ?? "?") ms")

        var ready: [String: [Double]] = [:], first: [String: [Double]] = [:], steps: [String: [Double]] = [:]
        for i in 0..<(runs + 1) {
            for (kind, d) in [("cold", cold), ("clone", clones)] {
                let id = "\(kind)\(i)"
                let r = try VMBenchmark.startPod(d.grpc, id, bundle: bundle)
                let info = VMBenchmark.status(d.grpc, id)
                if kind == "clone", (info["started_from"] as? String)?.hasPrefix("template") != true {
                    log("vm-templates: \(id) was not cloned: \(info["started_from"] ?? "?")")
                }
                if i >= 1 {  // the first of each warms caches
                    ready[kind, default: []].append(r.ready)
                    first[kind, default: []].append(r.container)
                    if kind == "clone" { for (k, v) in (info["start_ms"] as? [String: Double]) ?? [:] { steps[k, default: []].append(v) } }
                }
                PodBenchmark.removePod(d.grpc, r.tasks, id: id, sandboxer: "kuasar-vm")
            }
        }

        var memory: [VMBenchmark.Memory] = []
        for (kind, d) in [("cold", cold), ("clone", clones)] {
            let base = VMBenchmark.pss(d.pid)
            var running: [(String, OneShotClient, pid_t)] = []
            for n in 1...pods {
                let id = "m-\(kind)\(n)"
                let r = try VMBenchmark.startPod(d.grpc, id, bundle: bundle)
                running.append((id, r.tasks, r.qemu))
            }
            sleep(3)
            let q = running.reduce(0) { $0 + VMBenchmark.pss($1.2) }
            let g = max(0, VMBenchmark.pss(d.pid) - base)
            memory.append(VMBenchmark.Memory(kind: kind, pods: pods, qemuPSSkB: q, daemonGrowthkB: g, perPodkB: (q + g) / pods))
            log("vm-templates: \(pods) \(kind) pods: QEMU PSS \(q) kB, daemon growth \(g) kB, per pod \((q + g) / pods) kB")
            for (id, t, _) in running { PodBenchmark.removePod(d.grpc, t, id: id, sandboxer: "kuasar-vm") }
        }
        // containerd 1.6's shim path: its daemon finds the template the other one built.
        let ctdRows = VMBenchmark.ctrRun(kuasar: kuasar, config: config(template: true), runs: max(3, runs / 2))
        let resident = (try? ContainerBenchmark.sh("du -k \(manifest["dir"] as? String ?? "")/ram | cut -f1"))
            .flatMap { Double($0.trimmingCharacters(in: .whitespacesAndNewlines)) }.map { $0 / 1024 }

        func p50(_ xs: [Double]?) -> Double? { guard let xs, !xs.isEmpty else { return nil }; return xs.sorted()[xs.count / 2] }
        let report = Report(
            date: ISO8601DateFormatter().string(from: Date()), accelerator: "tcg", runs: runs,
            templateBuildMs: manifest["build_ms"] as? Double, templateRAMFileResidentMiB: resident,
            coldReadyMs: ContainerBenchmark.row("VM pod ready, cold boot (Controller Create+Start)", ready["cold"] ?? []),
            cloneReadyMs: ContainerBenchmark.row("VM pod ready, clone of the template (Controller Create+Start)", ready["clone"] ?? []),
            coldFirstContainerMs: ContainerBenchmark.row("first container after a cold boot", first["cold"] ?? []),
            cloneFirstContainerMs: ContainerBenchmark.row("first container in a clone", first["clone"] ?? []),
            readyRatio: p50(ready["clone"]).flatMap { c in p50(ready["cold"]).map { c / $0 } },
            cloneStartStepsMs: steps.compactMapValues { p50($0) }, memory: memory,
            containerd: ctdRows, ctrRunRatio: ctdRows[0].p50ms.flatMap { v in ctdRows[1].p50ms.map { v / $0 } },
            pool: "not built: a restored clone's share (9p fsdev path) and tap are fixed at QEMU start and a microvm cannot hot-plug them, so a pre-restored VM cannot be handed to a pod yet")
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(report).write(to: URL(fileURLWithPath: repo + "/perf/results/vm-templates.json"))
        log("vm-templates: ready p50 cold \(p50(ready["cold"]) ?? -1) ms, clone \(p50(ready["clone"]) ?? -1) ms (ratio \(report.readyRatio.map { ReactorBenchmark.fmt($0) } ?? "?")); first container cold \(p50(first["cold"]) ?? -1) ms, clone \(p50(first["clone"]) ?? -1) ms")
        log("vm-templates: clone Start steps \(report.cloneStartStepsMs)")
        for r in ctdRows { log("vm-templates, templates on: \(r.runtime): p50 \(r.p50ms ?? -1) ms over \(r.runs) runs\(r.failed.map { " FAILED \($0)" } ?? "")") }
    }
}
