#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Runtime
import SwiftProtobuf

/// External OCI runtimes under the daemon (`oci:<runtime>` sandboxers): the container
/// lifecycle (Task Create+Start+Wait+Delete of `/bin/true` in one pod, from the ttrpc
/// client) with runc and with crun as the runtime, against the same runtime's own
/// `create`+`start`+`delete` run as commands, and against the daemon's own engine — all
/// in one run. What the daemon adds to a runtime is the difference of the p50s.
enum ExternalBenchmark {
    static let work = "/tmp/kuasar-perf-external"
    static let task = "containerd.task.v3.Task"

    struct Report: Codable {
        var date: String
        var peers: [String: String]
        var rows: [ContainerBenchmark.Row]
        /// runtime → p50 through the daemon minus p50 of the runtime's own commands (ms).
        var daemonOverheadP50ms: [String: Double]
        /// runtime → PSS of the daemon with 50 pods of one sleeping container each, and
        /// how many processes those pods add besides their containers and holders.
        var memory: [String: Int]
    }

    static func run(runs: Int) throws {
        let log = ContainerBenchmark.log
        // Like the daemon: what a runtime leaves behind becomes our child (the direct column).
        try Signals.becomeChildSubreaper()
        guard let kuasar = PodBenchmark.kuasarBinary() else {
            log("external: no kuasar binary (build the main package, or set KUASAR_BIN)")
            return
        }
        ContainerBenchmark.shIgnoringFailure("umount -l \(work)/kroot 2>/dev/null; rm -rf \(work)")
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        let bundle = work + "/bundle"
        try ContainerBenchmark.makeBundle(bundle, args: ["true"])
        // crun refuses this machine's hybrid cgroups unless /sys/fs/cgroup/unified is gone:
        // a private mount namespace for it, in both columns (the same wrapper each time).
        let crun = work + "/crun"
        try "#!/bin/sh\nexec unshare -m sh -c 'umount /sys/fs/cgroup/unified 2>/dev/null; exec /usr/bin/crun \"$@\"' crun \"$@\"\n"
            .write(toFile: crun, atomically: true, encoding: .utf8)
        chmod(crun, 0o755)
        let runtimes = [("runc", "/usr/sbin/runc"), ("crun", crun)]
        let root = work + "/kroot", socket = root + "/kuasar.sock"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        _ = try ContainerBenchmark.sh("mount -t tmpfs -o mode=0700 kuasar-perf \(root)")
        defer { ContainerBenchmark.shIgnoringFailure("umount -l \(root)") }
        var config = "[sandboxers]\nkuasar = \"namespace\"\n"
        for (name, _) in runtimes { config += "kuasar-\(name) = \"oci:\(name)\"\n" }
        for (name, path) in runtimes { config += "[runtimes.\(name)]\npath = \"\(path)\"\n" }
        try config.write(toFile: work + "/config.toml", atomically: true, encoding: .utf8)
        let daemon = try PodBenchmark.DaemonProcess(kuasar: kuasar, root: root, socket: socket, config: work + "/config.toml", log: work + "/daemon.log", level: "error")
        defer { daemon.stop() }
        let daemonPID = daemon.pid
        let grpc = daemon.grpc
        defer { grpc.close() }

        /// Create + Start + Wait + Delete of one container on the pod's Task API.
        func lifecycle(_ t: OneShotClient, _ id: String) throws {
            var c = Containerd_Task_V3_CreateTaskRequest()
            c.id = id
            c.bundle = bundle
            _ = try t.call(task, "Create", c, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
            var s = Containerd_Task_V3_StartRequest()
            s.id = id
            _ = try t.call(task, "Start", s, as: Containerd_Task_V3_StartResponse.self, namespace: "k8s.io")
            var w = Containerd_Task_V3_WaitRequest()
            w.id = id
            let status = try t.call(task, "Wait", w, as: Containerd_Task_V3_WaitResponse.self, namespace: "k8s.io").exitStatus
            guard status == 0 else { throw ContainerBenchmark.PeerFailure(command: "container \(id)", status: .exited(Int32(status)), stderr: "") }
            var d = Containerd_Task_V3_DeleteRequest()
            d.id = id
            _ = try t.call(task, "Delete", d, as: Containerd_Task_V3_DeleteResponse.self, namespace: "k8s.io")
        }
        func pod(_ sandboxer: String, _ id: String) throws -> OneShotClient {
            var create = Containerd_Services_Sandbox_V1_ControllerCreateRequest()
            create.sandboxID = id
            create.sandboxer = sandboxer
            _ = try grpc.call(PodBenchmark.controller, "Create", create, as: Containerd_Services_Sandbox_V1_ControllerCreateResponse.self, metadata: PodBenchmark.md)
            var start = Containerd_Services_Sandbox_V1_ControllerStartRequest()
            start.sandboxID = id
            start.sandboxer = sandboxer
            let started = try grpc.call(PodBenchmark.controller, "Start", start, as: Containerd_Services_Sandbox_V1_ControllerStartResponse.self, metadata: PodBenchmark.md)
            return try OneShotClient(path: String(started.address.dropFirst("ttrpc+unix://".count)))
        }
        func measure(_ sandboxer: String, _ id: String) throws -> [Double] {
            let t = try pod(sandboxer, id)
            defer { t.close() }
            for i in 0..<5 { try lifecycle(t, "warm\(i)") }
            return try ContainerBenchmark.measure(runs) { try lifecycle(t, "c\($0)") }
        }

        var rows: [ContainerBenchmark.Row] = []
        var overhead: [String: Double] = [:]
        rows.append(ContainerBenchmark.peerRow("kuasar engine (namespace kind)") { try measure("kuasar", "own") })
        for (name, path) in runtimes {
            let through = ContainerBenchmark.peerRow("kuasar + \(name) (oci:\(name))") { try measure("kuasar-\(name)", "pod-\(name)") }
            // The same runtime on its own: create, start, wait for the init, delete.
            let direct = ContainerBenchmark.peerRow("\(name) create+start+delete, as commands") {
                let rroot = work + "/direct-\(name)"
                // Each call one process, spawned as the daemon spawns it (no shell between).
                func call(_ args: [String]) throws {
                    let null = open("/dev/null", O_RDWR | O_CLOEXEC)
                    defer { close(null) }
                    let child = try Spawner.spawn(ProcessSpec(executable: path, arguments: [path, "--root", rroot] + args, fdMap: [(null, 0), (null, 1), (null, 2)]))
                    let status = try Spawner.wait(child)
                    guard status == .exited(0) else { throw ContainerBenchmark.PeerFailure(command: "\(name) \(args[0])", status: status, stderr: "") }
                }
                return try ContainerBenchmark.measure(runs) { i in
                    let id = "d\(i)"
                    try call(["create", "--bundle", bundle, "--pid-file", "\(work)/\(id).pid", id])
                    try call(["start", id])
                    // We are its subreaper too: its init is our child, waited as the daemon waits.
                    let pid = pid_t((try String(contentsOfFile: "\(work)/\(id).pid", encoding: .utf8)).trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
                    var status: Int32 = 0
                    guard waitpid(pid, &status, __WALL) == pid else {
                        throw ContainerBenchmark.PeerFailure(command: "\(name) start", status: .exited(1), stderr: "its init \(pid) is not ours to wait for")
                    }
                    try call(["delete", "--force", id])
                }
            }
            rows += [through, direct]
            if let a = through.p50ms, let b = direct.p50ms { overhead[name] = a - b }
        }

        // Memory: 50 pods of a sleeping container each, per runtime.
        try ContainerBenchmark.makeBundle(work + "/sleeper", args: ["sleep", "3600"])
        var memory: [String: Int] = [:]
        for (name, _) in runtimes {
            var clients: [OneShotClient] = []
            do {
                for i in 0..<50 {
                    let t = try pod("kuasar-\(name)", "m-\(name)-\(i)")
                    var c = Containerd_Task_V3_CreateTaskRequest()
                    c.id = "s"
                    c.bundle = work + "/sleeper"
                    _ = try t.call(task, "Create", c, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
                    var s = Containerd_Task_V3_StartRequest()
                    s.id = "s"
                    _ = try t.call(task, "Start", s, as: Containerd_Task_V3_StartResponse.self, namespace: "k8s.io")
                    clients.append(t)
                }
                usleep(200_000)
                memory["daemon PSS kB, 50 \(name) pods"] = ContainerBenchmark.pss(daemonPID)
                // Children of the daemon besides the pods' containers and holders (a shim
                // per pod would show here): none expected.
                let comms = (try? ContainerBenchmark.sh("ps -o comm= --ppid \(daemonPID)"))?.split(separator: "\n").map(String.init) ?? []
                memory["daemon children, 50 \(name) pods (containers + holders = 100)"] = comms.count
                log("  children of the daemon with 50 \(name) pods: \(Dictionary(grouping: comms, by: { $0 }).mapValues(\.count))")
            } catch {
                log("  memory with \(name): FAILED: \(error)")
            }
            for (i, t) in clients.enumerated() {
                var k = Containerd_Task_V3_KillRequest()
                k.id = "s"
                k.signal = 9
                _ = try? t.call(task, "Kill", k, as: Google_Protobuf_Empty.self, namespace: "k8s.io")
                var w = Containerd_Task_V3_WaitRequest()
                w.id = "s"
                _ = try? t.call(task, "Wait", w, as: Containerd_Task_V3_WaitResponse.self, namespace: "k8s.io")
                var d = Containerd_Task_V3_DeleteRequest()
                d.id = "s"
                _ = try? t.call(task, "Delete", d, as: Containerd_Task_V3_DeleteResponse.self, namespace: "k8s.io")
                t.close()
                var sd = Containerd_Services_Sandbox_V1_ControllerShutdownRequest()
                sd.sandboxID = "m-\(name)-\(i)"
                _ = try? grpc.call(PodBenchmark.controller, "Shutdown", sd, as: Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self, metadata: PodBenchmark.md)
            }
        }

        print("\ncontainer lifecycle (Create+Start+Wait+Delete of /bin/true) in one pod, \(runs) runs:")
        print(ReactorBenchmark.pad("", 44) + ReactorBenchmark.pad("runs", 6) + ReactorBenchmark.pad("p50 ms", 10) + ReactorBenchmark.pad("p99 ms", 10) + "mean ms")
        for r in rows { ContainerBenchmark.printRow(r, width: 44, ratio: nil) }
        for (name, ms) in overhead.sorted(by: { $0.key < $1.key }) { print("the daemon adds \(ReactorBenchmark.fmt(ms)) ms (p50) to \(name)'s own create+start+delete") }
        for (k, v) in memory.sorted(by: { $0.key < $1.key }) { print("\(k): \(v)") }
        let report = Report(date: ISO8601DateFormatter().string(from: Date()), peers: ContainerBenchmark.peerVersions(), rows: rows,
                            daemonOverheadP50ms: overhead, memory: memory)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let path = ReactorBenchmark.resultsDirectory() + "/external.json"
        try encoder.encode(report).write(to: URL(fileURLWithPath: path))
        print("wrote \(path)")
    }
}
