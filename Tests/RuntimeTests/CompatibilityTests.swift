import Foundation
import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The same `runc spec` bundle through `runc run` and `kuasar run`: what the container
/// sees must match. Also the CLI's bad-input paths.
extension AllTests {
@Suite struct CompatibilityTests {
    static var kuasar: String { AllTests.DaemonTests.binary }

    /// A private daemon root for one test, stopped (and checked clean) at the end.
    final class DaemonRoot {
        let path: String
        init(_ name: String) {
            path = "/tmp/kuasar-root-\(name)-\(getpid())"
            Files.removeTree(path)
        }
        func run(_ args: String) throws -> (code: Int32, out: String) {
            return try shell("KUASAR_ROOT=\(path) KUASAR_CONFIG=\(TestConfig.stopOnExit) \(CompatibilityTests.kuasar) \(args)")
        }
        func stop() {
            guard let c = try? OneShotClient(path: path + "/admin.sock") else { return }
            let pid = try? c.call(AdminService.service, "Health", Kuasar_Admin_V1_HealthRequest(), as: Kuasar_Admin_V1_HealthResponse.self).pid
            c.close()
            if let pid {
                kill(pid, SIGTERM)
                waitUntil { processGone(pid) }
                #expect(processGone(pid), "daemon did not stop")
            }
            let left = Files.list(path).filter { $0 != "daemon.log" }
            #expect(left.isEmpty, "left in \(path): \(left)")
            #expect(mountsUnder(path).isEmpty)
            Files.removeTree(path)
        }
    }

    /// mountinfo without what legitimately differs: mount ids and the cgroup paths.
    static func normalizedMounts(_ out: String) -> [String] {
        out.split(separator: "\n").filter { $0.contains(" - ") }.map { $0.split(separator: " ").dropFirst(4).joined(separator: " ") }
    }

    @Test func runcSpecBundleMatchesRuncRun() throws {
        let bundle = try TestBundle("compat")
        defer { bundle.remove() }
        try bundle.editSpec { spec in
            var p = spec["process"] as! [String: Any]
            p["terminal"] = false
            p["args"] = ["sh", "-c", "echo out; hostname; grep Cap /proc/self/status; cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null; cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max 2>/dev/null; cat /proc/self/mountinfo; exit 7"]
            spec["process"] = p
            var linux = spec["linux"] as! [String: Any]
            var res = linux["resources"] as? [String: Any] ?? [:]
            res["memory"] = ["limit": 33554432]
            res["pids"] = ["limit": 77]
            linux["resources"] = res
            spec["linux"] = linux
        }
        let root = DaemonRoot("compat")
        defer { root.stop() }
        let theirs = try shell("runc run --bundle \(bundle.path) kuasar-compat-\(getpid())")
        let ours = try root.run("run --bundle \(bundle.path) --id compat")
        #expect(theirs.code == 7 && ours.code == 7, "runc \(theirs.code), kuasar \(ours.code): \(ours.out)")
        let theirLines = theirs.out.split(separator: "\n").filter { !$0.contains(" - ") }
        let ourLines = ours.out.split(separator: "\n").filter { !$0.contains(" - ") }
        #expect(theirLines == ourLines, "stdout, hostname, capabilities, limits differ:\nrunc:\n\(theirLines.joined(separator: "\n"))\nkuasar:\n\(ourLines.joined(separator: "\n"))")
        #expect(ourLines.contains("33554432") && ourLines.contains("77"))
        let theirMounts = Self.normalizedMounts(theirs.out), ourMounts = Self.normalizedMounts(ours.out)
        #expect(theirMounts == ourMounts, "mounts differ:\nrunc:\n\(theirMounts.joined(separator: "\n"))\nkuasar:\n\(ourMounts.joined(separator: "\n"))")
    }

    @Test func userNamespaceBundleMatchesRuncRun() throws {
        let bundle = try TestBundle("compat-userns")
        defer { bundle.remove() }
        try bundle.editSpec { spec in
            var p = spec["process"] as! [String: Any]
            p["terminal"] = false
            p["args"] = ["sh", "-c", "id; cat /proc/self/uid_map /proc/self/gid_map; hostname; ls -ln /dev/null; grep Cap /proc/self/status; exit 4"]
            spec["process"] = p
            var linux = spec["linux"] as! [String: Any]
            var ns = linux["namespaces"] as! [[String: Any]]
            ns.append(["type": "user"])
            linux["namespaces"] = ns
            linux["uidMappings"] = [["containerID": 0, "hostID": 100000, "size": 65536]]
            linux["gidMappings"] = [["containerID": 0, "hostID": 100000, "size": 65536]]
            spec["linux"] = linux
        }
        let root = DaemonRoot("userns")
        defer { root.stop() }
        let theirs = try shell("runc run --bundle \(bundle.path) kuasar-userns-\(getpid())")
        let ours = try root.run("run --bundle \(bundle.path) --id userns")
        #expect(theirs.code == 4 && ours.code == 4, "runc \(theirs.code) \(theirs.out), kuasar \(ours.code): \(ours.out)")
        #expect(theirs.out == ours.out, "runc:\n\(theirs.out)\nkuasar:\n\(ours.out)")
        #expect(ours.out.contains("100000"))
    }

    @Test func cliRunExecPsKillAndBadInput() throws {
        let bundle = try TestBundle("cli")
        defer { bundle.remove() }
        let root = DaemonRoot("cli")
        defer { root.stop() }
        var r = try root.run("run --rootfs \(bundle.rootfs) --hostname h1 -- sh -c 'echo hi; hostname; exit 6'")
        #expect(r.code == 6 && r.out == "hi\nh1\n", "\(r.code) \(r.out)")
        r = try root.run("run -d --id bg --rootfs \(bundle.rootfs) -- sleep 300")
        #expect(r.code == 0 && r.out == "bg\n", "\(r.out)")
        r = try root.run("ps")
        #expect(r.out.contains("bg") && r.out.contains("running"), "\(r.out)")
        r = try root.run("exec bg -- sh -c 'echo in exec $$; exit 2'")
        #expect(r.code == 2 && r.out.hasPrefix("in exec "), "\(r.out)")
        r = try root.run("rm bg")
        #expect(r.code != 0 && r.out.contains("is running"), "\(r.out)")
        r = try root.run("kill bg KILL")
        #expect(r.code == 0, "\(r.out)")
        try waitUntil { try root.run("ps").out.contains("stopped") }
        #expect(try root.run("ps").out.contains("stopped"))
        r = try root.run("rm bg")
        let afterRm = try root.run("ps").out
        #expect(r.code == 0 && !afterRm.contains("bg"), "\(r.out) \(afterRm)")
        // A detached container's output goes to its log, not to a FIFO nobody reads.
        r = try root.run("run -d --id lg --rootfs \(bundle.rootfs) -- sh -c 'seq 1 20000; echo err >&2'")
        #expect(r.code == 0, "\(r.out)")
        try waitUntil { try root.run("ps").out.contains("stopped") }
        r = try root.run("logs lg")
        #expect(r.code == 0 && r.out.hasPrefix("1\n2\n") && r.out.hasSuffix("20000\nerr\n"), "\(r.out.suffix(100))")
        r = try root.run("rm -f lg")
        #expect(r.code == 0, "\(r.out)")
        r = try root.run("logs lg")
        #expect(r.code != 0 && r.out.contains("no container lg"), "\(r.out)")

        // Bad input: each gets a clear error and the daemon keeps serving.
        r = try root.run("run --rootfs \(bundle.rootfs) -- no-such-command")
        #expect(r.code != 0 && r.out.contains("exec no-such-command: ENOENT"), "\(r.out)")
        r = try root.run("run --rootfs /nonexistent-rootfs -- true")
        #expect(r.code != 0 && r.out.contains("/nonexistent-rootfs"), "\(r.out)")
        r = try root.run("run --id ../evil --rootfs \(bundle.rootfs) -- true")
        #expect(r.code != 0 && r.out.contains("must start with a letter or digit"), "\(r.out)")
        r = try root.run("run --id a/b --rootfs \(bundle.rootfs) -- true")
        #expect(r.code != 0 && r.out.contains("may only contain"), "\(r.out)")
        try bundle.editSpec { spec in
            var linux = spec["linux"] as! [String: Any]
            linux["namespaces"] = [["type": "mount"], ["type": "nope"]]
            spec["linux"] = linux
        }
        r = try root.run("run --bundle \(bundle.path) --id badspec")
        #expect(r.code != 0 && r.out.contains("linux.namespaces[1].type: unknown namespace \"nope\""), "\(r.out)")
        r = try root.run("exec no-such-container -- true")
        #expect(r.code != 0 && r.out.contains("no container no-such-container"), "\(r.out)")
        r = try root.run("run --rootfs \(bundle.rootfs) -- sh -c 'echo still serving'")
        #expect(r.code == 0 && r.out == "still serving\n", "\(r.out)")
    }
}
}
