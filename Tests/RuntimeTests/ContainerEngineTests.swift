import Foundation
import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct ContainerEngineTests {
    /// Runs a container from `bundle` to its exit; returns (status, stdout).
    func runContainer(_ bundle: TestBundle, reactor: Reactor, cgroup: String? = nil) throws -> (ExitStatus?, String, ContainerError?) {
        let supervisor = ProcessSupervisor(reactor: reactor)
        let engine = try ContainerEngine(reactor: reactor, supervisor: supervisor)
        let out = bundle.path + "/stdout"
        unlink(out)
        var container: Container?
        var failure: ContainerError?
        var status: ExitStatus?
        let spec = try bundle.spec()
        Container.create(id: "c1", bundle: bundle.path, spec: spec, rootfs: bundle.rootfs,
                         stdio: StdioPaths(stdout: "file://" + out, stderr: "file://" + out),
                         cgroupPath: cgroup, engine: engine) { result in
            switch result {
            case .success(let c): container = c
            case .failure(let e): failure = e
            }
        }
        try spin(reactor, "create") { container != nil || failure != nil }
        if let failure {
            try spin(reactor, "children reaped") { supervisor.runningCount == 0 }
            return (nil, "", failure)
        }
        var started = false
        container!.start { r in
            if case .failure(let e) = r { failure = e }
            started = true
        }
        try spin(reactor, "start") { started }
        container!.initProcess.wait { s, _ in status = s }
        try spin(reactor, "exit") { status != nil }
        container!.destroy()
        try spin(reactor, "children reaped") { supervisor.runningCount == 0 }
        let text = (try? Files.readString(out)) ?? ""
        return (status, text, failure)
    }

    @Test func runcSpecBundleRunsWithItsNamespacesAndHostname() throws {
        let bundle = try TestBundle("basic")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["sh", "-c", "echo hello; hostname; echo pid=$$; cat /proc/self/status | grep CapEff; exit 3"])
        let fdsBefore = openFDCount()
        try withReactor(.epoll) { reactor in
            let (status, out, err) = try runContainer(bundle, reactor: reactor, cgroup: "kuasar-test/basic")
            #expect(err == nil, "\(String(describing: err))")
            #expect(status == .exited(3))
            #expect(out.contains("hello\nrunc\npid=1\n"), "stdout: \(out)")
            // runc spec grants CAP_AUDIT_WRITE, CAP_KILL, CAP_NET_BIND_SERVICE: bits 29, 5, 10.
            #expect(out.contains("CapEff:\t0000000020000420"), "stdout: \(out)")
        }
        #expect(openFDCount() == fdsBefore)
        #expect(mountsUnder(bundle.path).isEmpty, "mounts left: \(mountsUnder(bundle.path))")
    }

    @Test func mountTargetsNeverFollowASymlinkOutOfTheRootfs() throws {
        let bundle = try TestBundle("escape")
        defer { bundle.remove() }
        let outside = "/tmp/kuasar-escape-target-\(getpid())"
        Files.removeTree(outside)
        // An image whose /evil points at a host path, absolute and via "..".
        symlink(outside, bundle.rootfs + "/evil")
        symlink("../../../../..\(outside)", bundle.rootfs + "/evil2")
        try bundle.setProcess(args: ["sh", "-c", "grep -c ' /evil' /proc/self/mountinfo"])
        try bundle.editSpec { spec in
            var mounts = spec["mounts"] as! [[String: Any]]
            mounts.append(["destination": "/evil/x", "type": "tmpfs", "source": "tmpfs"])
            mounts.append(["destination": "/evil2/y", "type": "tmpfs", "source": "tmpfs"])
            spec["mounts"] = mounts
        }
        try withReactor(.epoll) { reactor in
            let (status, _, err) = try runContainer(bundle, reactor: reactor)
            #expect(err == nil, "\(String(describing: err))")
            #expect(status != nil)
        }
        #expect(!Files.exists(outside), "a mount followed the image's symlink onto the host")
        #expect(Files.isDirectory(bundle.rootfs + outside + "/x"), "the mount point belongs inside the rootfs")
        #expect(Files.isDirectory(bundle.rootfs + outside + "/y"))
        #expect(mountsUnder(outside).isEmpty)
    }

    @Test func invalidSpecsAreRefusedNamingTheField() throws {
        let bundle = try TestBundle("invalid")
        defer { bundle.remove() }
        try bundle.editSpec { spec in
            var linux = spec["linux"] as! [String: Any]
            var ns = linux["namespaces"] as! [[String: Any]]
            ns.append(["type": "bogus"])
            linux["namespaces"] = ns
            spec["linux"] = linux
        }
        try withReactor(.epoll) { reactor in
            let (_, _, err) = try runContainer(bundle, reactor: reactor)
            #expect(err?.kind == .invalid)
            #expect(err?.message.contains("linux.namespaces[5].type: unknown namespace \"bogus\"") == true, "\(String(describing: err))")
        }
        try bundle.editSpec { spec in
            var p = spec["process"] as! [String: Any]
            p["cwd"] = "relative"
            spec["process"] = p
            var linux = spec["linux"] as! [String: Any]
            linux["namespaces"] = [["type": "mount"]]
            spec["linux"] = linux
        }
        let decoded = try bundle.spec()
        #expect(throws: SpecError.self) { try decoded.validate() }
        do { try decoded.validate() } catch { #expect(error.field == "process.cwd") }
        #expect(throws: SpecError.self) { _ = try OCISpec.decode(Array("{\"ociVersion\": 3}".utf8)) }
    }

    @Test func seccompAndCgroupLimitsApplyInsideTheContainer() throws {
        let bundle = try TestBundle("limits")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["sh", "-c", "mkdir /tmp/x 2>&1; cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null; cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max 2>/dev/null; true"])
        try bundle.editSpec { spec in
            var linux = spec["linux"] as! [String: Any]
            linux["seccomp"] = ["defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                                "syscalls": [["names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1]]]
            linux["resources"] = ["memory": ["limit": 67108864], "pids": ["limit": 42]]
            var p = spec["process"] as! [String: Any]
            p["noNewPrivileges"] = true
            spec["process"] = p
            spec["linux"] = linux
            var root = spec["root"] as! [String: Any]
            root["readonly"] = false
            spec["root"] = root
        }
        let cgroup = "kuasar-test/limits-\(getpid())"
        try withReactor(.epoll) { reactor in
            let (status, out, err) = try runContainer(bundle, reactor: reactor, cgroup: cgroup)
            #expect(err == nil, "\(String(describing: err))")
            #expect(status == .exited(0))
            #expect(out.contains("Operation not permitted"), "stdout: \(out)")
            #expect(out.contains("67108864"), "stdout: \(out)")
            #expect(out.contains("42"), "stdout: \(out)")
        }
        let parent = try CgroupHost.detect().existing("kuasar-test")
        for dir in parent.dirs.values { #expect(!Files.exists(dir + "/limits-\(getpid())"), "cgroup left behind in \(dir)") }
    }

    @Test func execJoinsTheContainerAndKillReportsTheSignal() throws {
        let bundle = try TestBundle("exec")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["sleep", "30"])
        let out = bundle.path + "/exec-out"
        try withReactor(.epoll) { reactor in
            let supervisor = ProcessSupervisor(reactor: reactor)
            let engine = try ContainerEngine(reactor: reactor, supervisor: supervisor)
            var container: Container?
            Container.create(id: "e1", bundle: bundle.path, spec: try bundle.spec(), rootfs: bundle.rootfs,
                             stdio: StdioPaths(), cgroupPath: "kuasar-test/exec-\(getpid())", engine: engine) { r in
                container = try? r.get()
            }
            try spin(reactor, "create") { container != nil }
            var started = false
            container!.start { _ in started = true }
            try spin(reactor, "start") { started }
            #expect(container!.state == .running)
            let p = try container!.exec(id: "x1", process: OCISpec.Process(args: ["sh", "-c", "hostname; tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$"]),
                                        stdio: StdioPaths(stdout: "file://" + out))
            var execPid: pid_t = 0
            container!.startExec(p) { r in execPid = (try? r.get()) ?? -1 }
            var execStatus: ExitStatus?
            p.wait { s, _ in execStatus = s }
            try spin(reactor, "exec exit") { execStatus != nil }
            #expect(execPid > 0)
            #expect(execStatus == .exited(0))
            let text = try Files.readString(out)
            #expect(text == "runc\nsleep 30 \n2\n", "exec saw: \(text)")
            #expect(container!.pids().count == 1)
            var initStatus: ExitStatus?
            container!.initProcess.wait { s, _ in initStatus = s }
            try container!.kill(signal: SIGKILL, all: false)
            try spin(reactor, "init exit") { initStatus != nil }
            #expect(initStatus?.code == 137)
            container!.destroy()
            try spin(reactor, "reaped") { supervisor.runningCount == 0 }
        }
    }

    @Test func hooksRunInTheirNamespacesInOrderAndAFailingHookFailsCreate() throws {
        let bundle = try TestBundle("hooks")
        defer { bundle.remove() }
        let marks = bundle.path + "/marks"
        try makeDirectories(marks, mode: 0o755)
        try bundle.setProcess(args: ["sh", "-c", "cat /hook-ran; exit 0"])
        func host(_ name: String) -> [String: Any] {
            ["path": "/bin/sh", "args": ["sh", "-c", "cat > \(marks)/\(name).json; echo \(name) >> \(marks)/order"]]
        }
        try bundle.editSpec { spec in
            var root = spec["root"] as! [String: Any]
            root["readonly"] = false
            spec["root"] = root
            spec["hooks"] = [
                "createRuntime": [host("createRuntime")],
                // Inside the container: /bin/sh is the image's busybox, / is the container's root.
                "startContainer": [["path": "/bin/sh", "args": ["sh", "-c", "echo from-startContainer-hook > /hook-ran"]]],
                "poststart": [host("poststart")],
                "poststop": [host("poststop")],
            ]
        }
        try withReactor(.epoll) { reactor in
            let (status, out, err) = try runContainer(bundle, reactor: reactor)
            #expect(err == nil, "\(String(describing: err))")
            #expect(status == .exited(0))
            #expect(out == "from-startContainer-hook\n", "stdout: \(out)")
            try settle(reactor, ms: 200)  // poststop runs after delete
        }
        let order = (try? Files.readString(marks + "/order")) ?? ""
        #expect(order == "createRuntime\npoststart\npoststop\n", "hook order: \(order)")
        let state = (try? Files.readString(marks + "/createRuntime.json")) ?? ""
        #expect(state.contains("\"id\":\"c1\"") && state.contains("\"status\":\"created\"") && state.contains("\"pid\":"), "state: \(state)")
        #expect(!Files.exists(bundle.path + "/hook-ran"), "the in-container hook wrote on the host")

        try bundle.editSpec { spec in
            spec["hooks"] = ["createRuntime": [["path": "/bin/sh", "args": ["sh", "-c", "exit 9"]]]]
        }
        try withReactor(.epoll) { reactor in
            let (_, _, err) = try runContainer(bundle, reactor: reactor)
            #expect(err?.message.contains("createRuntime hook /bin/sh exited with 9") == true, "\(String(describing: err))")
        }
    }

    @Test func anOOMKillIsReportedOnceAndTheExitIs137() throws {
        let bundle = try TestBundle("oom")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"])
        try bundle.editSpec { spec in
            var linux = spec["linux"] as! [String: Any]
            linux["resources"] = ["memory": ["limit": 16 << 20, "swap": 16 << 20]]
            spec["linux"] = linux
        }
        try withReactor(.epoll) { reactor in
            let supervisor = ProcessSupervisor(reactor: reactor)
            let engine = try ContainerEngine(reactor: reactor, supervisor: supervisor)
            var container: Container?
            Container.create(id: "oom1", bundle: bundle.path, spec: try bundle.spec(), rootfs: bundle.rootfs,
                             stdio: StdioPaths(), cgroupPath: "kuasar-test/oom-\(getpid())", engine: engine) { r in
                container = try? r.get()
            }
            try spin(reactor, "create") { container != nil }
            var ooms = 0
            container!.onOOM = { _ in ooms += 1 }
            var status: ExitStatus?
            container!.initProcess.wait { s, _ in status = s }
            container!.start { _ in }
            try spin(reactor, "exit") { status != nil }
            container!.pollOOM()
            #expect(status == .signaled(SIGKILL, coreDumped: false), "\(String(describing: status))")
            #expect(ooms == 1, "OOM events: \(ooms)")
            container!.destroy()
            #expect(ooms == 1)
            try spin(reactor, "reaped") { supervisor.runningCount == 0 }
        }
    }
}
}
