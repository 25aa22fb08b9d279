import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// Pods whose containers Debian's runc and crun run (`oci:<runtime>` sandboxers), under
/// the one daemon: the containers are made from containerd 2.3's CRI spec, join the pod's
/// namespaces, and are driven through the Task API like the engine's own.
extension AllTests {
@Suite struct ExternalRuntimeTests {
    static let task = "containerd.task.v3.Task"

    /// crun refuses this machine's hybrid cgroups unless /sys/fs/cgroup/unified is gone:
    /// the test's wrapper runs it in a private mount namespace (never the product).
    static func crunWrapper(_ dir: String) throws -> String {
        let path = dir + "/crun-wrapper"
        try Files.write(path, "#!/bin/sh\nexec unshare -m sh -c 'umount /sys/fs/cgroup/unified 2>/dev/null; exec /usr/bin/crun \"$@\"' crun \"$@\"\n", create: true, mode: 0o755)
        return path
    }

    static func config(_ dir: String) throws -> String {
        let failing = dir + "/failing-runtime"
        // As runc does: the error as a JSON line in --log (its stderr is the container's).
        try Files.write(failing, "#!/bin/sh\necho '{\"level\":\"error\",\"msg\":\"failing-runtime: cannot '\"$7\"' anything today\"}' > \"$4\"\nexit 4\n", create: true, mode: 0o755)
        // Hangs at create; writes garbage to its pid file; both answer every other call.
        let hanging = dir + "/hanging-runtime", garbage = dir + "/garbage-runtime"
        try Files.write(hanging, "#!/bin/sh\n[ \"$7\" = create ] && exec sleep 60\nexit 0\n", create: true, mode: 0o755)
        try Files.write(garbage, "#!/bin/sh\n[ \"$7\" = create ] && echo 'not-a-pid' > \"${11}\"\nexit 0\n", create: true, mode: 0o755)
        return """
        [sandboxers]
        kuasar-hanging = "oci:hanging"
        kuasar-garbage = "oci:garbage"
        kuasar = "namespace"
        kuasar-runc = "oci:runc"
        kuasar-crun = "oci:crun"
        kuasar-missing = "oci:missing"
        kuasar-failing = "oci:failing"
        [runtimes.runc]
        path = "/usr/sbin/runc"
        [runtimes.crun]
        path = "\(try crunWrapper(dir))"
        [runtimes.missing]
        path = "/nonexistent/runtime-\(getpid())"
        [runtimes.failing]
        path = "\(failing)"
        [runtimes.hanging]
        path = "\(hanging)"
        timeout_secs = 1
        [runtimes.garbage]
        path = "\(garbage)"

        """
    }

    /// The v1 cgroups a runtime made at the absolute cgroupsPath the test gave (runc and
    /// crun leave the parent behind).
    static func removeRuntimeCgroups(_ root: String, _ containers: [String]) {
        for c in containers + [""] {
            for h in ["memory", "pids", "cpu,cpuacct", "cpuset", "blkio", "devices", "freezer", "systemd"] { _ = rmdir("/sys/fs/cgroup/\(h)\(root)/\(c)") }
        }
    }

    /// containerd's fixture spec with our args, the runtime's cgroup at `<cgroupRoot>/<name>`.
    static func bundle(_ node: PodTests.Node, _ name: String, holder: pid_t, cgroupRoot: String, _ args: [String], terminal: Bool = false) throws -> String {
        try node.bundle(name, pid: holder, args: args) { json in
            var linux = json["linux"] as! [String: Any]
            linux["cgroupsPath"] = cgroupRoot + "/" + name
            json["linux"] = linux
            if terminal {
                var p = json["process"] as! [String: Any]
                p["terminal"] = true
                json["process"] = p
            }
        }
    }

    static func call<Resp: SwiftProtobuf.Message>(_ t: OneShotClient, _ m: String, _ r: some SwiftProtobuf.Message, _: Resp.Type) throws -> Resp {
        try t.call(task, m, r, as: Resp.self, namespace: "k8s.io")
    }

    @Test(arguments: ["runc", "crun"])
    func runtimeRunsThePodsContainers(runtime: String) throws {
        let scratch = try scratchDirectory("ext-\(runtime)")
        defer { Files.removeTree(scratch) }
        let cgroupRoot = "/kuasar-ext-\(getpid())-\(runtime)"
        try PodTests.Node.with("ext-\(runtime)", config: try Self.config(scratch)) { node in
            let (holder, address) = try node.runPod("xp", PodTests.podConfig(hostname: "xp-\(runtime)"), sandboxer: "kuasar-\(runtime)")
            func bundle(_ name: String, _ args: [String]) throws -> String {
                try Self.bundle(node, name, holder: holder, cgroupRoot: cgroupRoot, args)
            }
            let t = try OneShotClient(path: address)
            defer { t.close() }

            // Output and exit status, from containerd's own spec, in the pod's namespaces.
            let b1 = try bundle("c1", ["sh", "-c", "echo hello from \(runtime) on $(hostname); exit 3"])
            var create = Containerd_Task_V3_CreateTaskRequest()
            create.id = "c1"
            create.bundle = b1
            create.stdout = "file://" + b1 + "/out"
            create.stderr = "file://" + b1 + "/out"
            let created = try Self.call(t, "Create", create, Containerd_Task_V3_CreateTaskResponse.self)
            #expect(created.pid > 0 && pid_t(created.pid) != holder)
            #expect(PodTests.nsInode(String(created.pid), "net") == PodTests.nsInode(String(holder), "net"), "not in the pod's network namespace")
            var start = Containerd_Task_V3_StartRequest()
            start.id = "c1"
            _ = try Self.call(t, "Start", start, Containerd_Task_V3_StartResponse.self)
            var wait = Containerd_Task_V3_WaitRequest()
            wait.id = "c1"
            let w1 = try Self.call(t, "Wait", wait, Containerd_Task_V3_WaitResponse.self)
            #expect(w1.exitStatus == 3)
            #expect(node.output(b1).contains("hello from \(runtime) on xp-\(runtime)"), "\(node.output(b1))")
            var del = Containerd_Task_V3_DeleteRequest()
            del.id = "c1"
            let d1 = try Self.call(t, "Delete", del, Containerd_Task_V3_DeleteResponse.self)
            #expect(d1.exitStatus == 3 && d1.pid == created.pid)

            // A terminal: the runtime sends the pty's master to our --console-socket.
            let bt = try Self.bundle(node, "ct", holder: holder, cgroupRoot: cgroupRoot, ["sh", "-c", "tty; echo tty-ok"], terminal: true)
            create.id = "ct"
            create.bundle = bt
            create.terminal = true
            create.stdout = "file://" + bt + "/out"
            create.stderr = ""
            _ = try Self.call(t, "Create", create, Containerd_Task_V3_CreateTaskResponse.self)
            start.id = "ct"
            _ = try Self.call(t, "Start", start, Containerd_Task_V3_StartResponse.self)
            wait.id = "ct"
            #expect(try Self.call(t, "Wait", wait, Containerd_Task_V3_WaitResponse.self).exitStatus == 0)
            #expect(node.output(bt).contains("/dev/pts/") && node.output(bt).contains("tty-ok"), "\(node.output(bt))")
            del.id = "ct"
            _ = try Self.call(t, "Delete", del, Containerd_Task_V3_DeleteResponse.self)
            create.terminal = false

            // A long one: exec, pause/resume, pids, kill.
            let b2 = try bundle("c2", ["sleep", "300"])
            create.id = "c2"
            create.bundle = b2
            create.stdout = "file://" + b2 + "/out"
            create.stderr = "file://" + b2 + "/out"
            let c2 = try Self.call(t, "Create", create, Containerd_Task_V3_CreateTaskResponse.self)
            start.id = "c2"
            _ = try Self.call(t, "Start", start, Containerd_Task_V3_StartResponse.self)
            var exec = Containerd_Task_V3_ExecProcessRequest()
            exec.id = "c2"
            exec.execID = "e1"
            exec.stdout = "file://" + b2 + "/exec-out"
            exec.spec.typeURL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
            exec.spec.value = try JSONEncoder().encode(OCISpec.Process(args: ["sh", "-c", "echo from exec; exit 5"], env: ["PATH=/bin"], cwd: "/"))
            _ = try Self.call(t, "Exec", exec, Google_Protobuf_Empty.self)
            start.execID = "e1"
            let e1 = try Self.call(t, "Start", start, Containerd_Task_V3_StartResponse.self)
            #expect(e1.pid > 0)
            wait.id = "c2"
            wait.execID = "e1"
            #expect(try Self.call(t, "Wait", wait, Containerd_Task_V3_WaitResponse.self).exitStatus == 5)
            #expect(((try? Files.readString(b2 + "/exec-out")) ?? "").contains("from exec"))
            del.id = "c2"
            del.execID = "e1"
            _ = try Self.call(t, "Delete", del, Containerd_Task_V3_DeleteResponse.self)

            var pause = Containerd_Task_V3_PauseRequest()
            pause.id = "c2"
            _ = try Self.call(t, "Pause", pause, Google_Protobuf_Empty.self)
            var st = Containerd_Task_V3_StateRequest()
            st.id = "c2"
            #expect(try Self.call(t, "State", st, Containerd_Task_V3_StateResponse.self).status == .paused)
            var resume = Containerd_Task_V3_ResumeRequest()
            resume.id = "c2"
            _ = try Self.call(t, "Resume", resume, Google_Protobuf_Empty.self)
            #expect(try Self.call(t, "State", st, Containerd_Task_V3_StateResponse.self).status == .running)
            var pids = Containerd_Task_V3_PidsRequest()
            pids.id = "c2"
            let listed = try Self.call(t, "Pids", pids, Containerd_Task_V3_PidsResponse.self).processes.map(\.pid)
            #expect(listed.contains(c2.pid), "\(listed)")
            // Stats from the cgroup the runtime made (its pids controller counts the init).
            var stats = Containerd_Task_V3_StatsRequest()
            stats.id = "c2"
            let metrics = try Self.call(t, "Stats", stats, Containerd_Task_V3_StatsResponse.self).stats
            #expect(metrics.typeURL.hasSuffix("io.containerd.cgroups.v1.Metrics") || metrics.typeURL.hasSuffix("io.containerd.cgroups.v2.Metrics"), "\(metrics.typeURL)")
            if metrics.typeURL.hasSuffix("v1.Metrics") {
                let m = try Io_Containerd_Cgroups_V1_Metrics(serializedBytes: metrics.value)
                #expect(m.pids.current >= 1 && m.memory.usage.usage > 0, "\(m.pids) \(m.memory.usage)")
            }
            // Deleting a running task is refused; a kill ends it with 137.
            del.execID = ""
            do {
                _ = try Self.call(t, "Delete", del, Containerd_Task_V3_DeleteResponse.self)
                Issue.record("a running container was deleted")
            } catch let e as RPCError { #expect(e.code == .failedPrecondition) }
            var kill = Containerd_Task_V3_KillRequest()
            kill.id = "c2"
            kill.signal = 9
            _ = try Self.call(t, "Kill", kill, Google_Protobuf_Empty.self)
            wait.execID = ""
            #expect(try Self.call(t, "Wait", wait, Containerd_Task_V3_WaitResponse.self).exitStatus == 137)
            _ = try Self.call(t, "Delete", del, Containerd_Task_V3_DeleteResponse.self)
            #expect(waitUntil { processGone(pid_t(c2.pid)) })

            // A container left running goes with the pod.
            let b3 = try bundle("c3", ["sleep", "300"])
            create.id = "c3"
            create.bundle = b3
            let c3 = try Self.call(t, "Create", create, Containerd_Task_V3_CreateTaskResponse.self)
            start.id = "c3"
            start.execID = ""
            _ = try Self.call(t, "Start", start, Containerd_Task_V3_StartResponse.self)
            try node.shutdown("xp")
            #expect(waitUntil { processGone(pid_t(c3.pid)) && processGone(holder) })
            // The runtime forgot them all: the pod's runtime root (its containers' state) is gone.
            #expect(waitUntil { !Files.exists(node.root + "/runtimes/\(runtime)/xp") }, "the pod's runtime root was left: \(Files.list(node.root + "/runtimes/\(runtime)/xp"))")
        }
        Self.removeRuntimeCgroups(cgroupRoot, ["c1", "c2", "c3", "ct"])
    }

    /// A runtime that is not there makes its kind unavailable (Create says why); one that
    /// fails makes the Task API answer with what it said, and leaves nothing behind.
    @Test func missingAndFailingRuntimesAnswerWithTheReason() throws {
        let scratch = try scratchDirectory("ext-bad")
        defer { Files.removeTree(scratch) }
        try PodTests.Node.with("ext-bad", config: try Self.config(scratch)) { node in
            do {
                _ = try node.runPod("nope", PodTests.podConfig(hostname: "nope"), sandboxer: "kuasar-missing")
                Issue.record("a pod of a missing runtime was created")
            } catch let e as RPCError {
                #expect(e.code == .failedPrecondition && e.message.contains("/nonexistent/runtime-"), "\(e)")
            }
            #expect(!Files.exists(node.root + "/nope"))
            let (holder, address) = try node.runPod("fp", PodTests.podConfig(hostname: "fp"), sandboxer: "kuasar-failing")
            let b = try node.bundle("f1", pid: holder, args: ["true"])
            let t = try OneShotClient(path: address)
            defer { t.close() }
            var create = Containerd_Task_V3_CreateTaskRequest()
            create.id = "f1"
            create.bundle = b
            do {
                _ = try Self.call(t, "Create", create, Containerd_Task_V3_CreateTaskResponse.self)
                Issue.record("a failing runtime's create was answered OK")
            } catch let e as RPCError {
                #expect(e.message.contains("failing-runtime: cannot create anything today") && e.message.contains("exited with 4"), "\(e)")
            }
            #expect(!Files.exists(node.root + "/fp/f1"), "the container's bundle was left")
            // A runtime that hangs is killed at its deadline; one that writes garbage for a pid is refused.
            for (kind, pod, expected) in [("hanging", "hp", "no answer after 1 s; killed"), ("garbage", "gp", "wrote \"not-a-pid\" to its pid file")] {
                let (h, a) = try node.runPod(pod, PodTests.podConfig(hostname: pod), sandboxer: "kuasar-\(kind)")
                let c = try OneShotClient(path: a)
                defer { c.close() }
                var req = Containerd_Task_V3_CreateTaskRequest()
                req.id = "x"
                req.bundle = try node.bundle("\(pod)1", pid: h, args: ["true"])
                let t0 = MonotonicClock.nanoseconds()
                do {
                    _ = try Self.call(c, "Create", req, Containerd_Task_V3_CreateTaskResponse.self)
                    Issue.record("\(kind): create answered OK")
                } catch let e as RPCError {
                    #expect(e.message.contains(expected), "\(kind): \(e)")
                }
                #expect(MonotonicClock.nanoseconds() - t0 < 10_000_000_000, "\(kind): the answer took too long")
                #expect(!Files.exists(node.root + "/\(pod)/x"), "\(kind): the container's bundle was left")
                try node.shutdown(pod)
            }
            var st = Containerd_Task_V3_StateRequest()
            st.id = "f1"
            do {
                _ = try Self.call(t, "State", st, Containerd_Task_V3_StateResponse.self)
                Issue.record("a container whose create failed is listed")
            } catch let e as RPCError { #expect(e.code == .notFound) }
            try node.shutdown("fp")
        }
    }

    /// `kuasar info` runs each configured runtime's --version and features and says
    /// which are usable.
    @Test func infoListsTheRuntimes() throws {
        let scratch = try scratchDirectory("ext-info")
        defer { Files.removeTree(scratch) }
        try Files.write(scratch + "/config.toml", try Self.config(scratch), create: true)
        let r = try shell("\(AllTests.DaemonTests.binary) info --config \(scratch)/config.toml")
        #expect(r.code == 0, "\(r.out)")
        #expect(r.out.contains("runc: usable: runc version 1.") && r.out.contains("features: spec up to") && r.out.contains("sandboxers: kuasar-runc"), "\(r.out)")
        #expect(r.out.contains("missing: not usable: /nonexistent/runtime-"), "\(r.out)")
    }

    /// kill -9 of the daemon with crun containers running; one exits while no daemon runs:
    /// the new daemon reports it once (Wait) and manages the other (kill, wait, delete).
    @Test func crunContainersSurviveADaemonKill() throws {
        let scratch = try scratchDirectory("ext-rec")
        defer { Files.removeTree(scratch) }
        let cgroupRoot = "/kuasar-ext-rec-\(getpid())"
        try PodTests.Node.with("ext-rec", config: try Self.config(scratch), keep: true) { node in
            let (holder, address) = try node.runPod("rp", PodTests.podConfig(hostname: "rp"), sandboxer: "kuasar-crun")
            func run(_ id: String, _ args: [String]) throws -> (pid: UInt32, bundle: String) {
                let b = try Self.bundle(node, id, holder: holder, cgroupRoot: cgroupRoot, args)
                let t = try OneShotClient(path: address)
                defer { t.close() }
                var create = Containerd_Task_V3_CreateTaskRequest()
                create.id = id
                create.bundle = b
                create.stdout = "file://" + b + "/out"
                let c = try Self.call(t, "Create", create, Containerd_Task_V3_CreateTaskResponse.self)
                var start = Containerd_Task_V3_StartRequest()
                start.id = id
                _ = try Self.call(t, "Start", start, Containerd_Task_V3_StartResponse.self)
                return (c.pid, b)
            }
            let long = try run("long", ["sleep", "300"])
            let short = try run("short", ["sh", "-c", "echo waiting; while [ ! -e /go ]; do sleep 0.05; done; echo leaving; exit 7"])
            #expect(waitUntil { node.output(short.bundle).contains("waiting") })
            let firstKeeper = try node.killAndRestart {
                try Files.write(short.bundle + "/rootfs/go", "", create: true)
                #expect(waitUntil { processGone(pid_t(short.pid)) }, "the short container did not end while no daemon ran")
                #expect(!processGone(pid_t(long.pid)))
            }
            let t = try OneShotClient(path: address)
            defer { t.close() }
            var wait = Containerd_Task_V3_WaitRequest()
            wait.id = "short"
            #expect(try Self.call(t, "Wait", wait, Containerd_Task_V3_WaitResponse.self).exitStatus == 7)
            var st = Containerd_Task_V3_StateRequest()
            st.id = "short"
            let s1 = try Self.call(t, "State", st, Containerd_Task_V3_StateResponse.self)
            #expect(s1.status == .stopped && s1.exitStatus == 7, "\(s1)")
            #expect(node.output(short.bundle).contains("leaving"))
            st.id = "long"
            #expect(try Self.call(t, "State", st, Containerd_Task_V3_StateResponse.self).status == .running)
            var kill = Containerd_Task_V3_KillRequest()
            kill.id = "long"
            kill.signal = 9
            _ = try Self.call(t, "Kill", kill, Google_Protobuf_Empty.self)
            wait.id = "long"
            #expect(try Self.call(t, "Wait", wait, Containerd_Task_V3_WaitResponse.self).exitStatus == 137)
            for id in ["short", "long"] {
                var del = Containerd_Task_V3_DeleteRequest()
                del.id = id
                _ = try Self.call(t, "Delete", del, Containerd_Task_V3_DeleteResponse.self)
            }
            try node.shutdown("rp")
            #expect(waitUntil { processGone(holder) && processGone(pid_t(long.pid)) })
            #expect(try Spawner.wait(firstKeeper.process) == .exited(137))
            firstKeeper.log.close()
        }
        Self.removeRuntimeCgroups(cgroupRoot, ["long", "short"])
    }

    /// Debian's containerd 1.6 through the shim path: `io.containerd.kuasar-crun.v2` is the
    /// shim binary `containerd-shim-kuasar-crun-v2`, whose sandboxer `kuasar-crun` crun serves.
    @Test func containerdRunsCrunContainersThroughTheShimPath() throws {
        let scratch = try scratchDirectory("ext-ctd")
        defer { Files.removeTree(scratch) }
        try Files.write(scratch + "/config.toml", TestConfig.withoutTemplates("[daemon]\non_exit = \"stop\"\n" + (try Self.config(scratch))), create: true)
        let ctd = try ContainerdFixture("crun", config: scratch + "/config.toml", shims: ["containerd-shim-kuasar-crun-v2"])
        defer { try? ctd.stop() }
        let runtime = "io.containerd.kuasar-crun.v2"
        var r = try ctd.ctr("run --rm --runtime \(runtime) \(ContainerdFixture.image) cr1 sh -c 'echo hello from crun; exit 3'")
        #expect(r.code == 3, "\(r.out)")
        #expect(r.out.contains("hello from crun"), "\(r.out)")
        // crun, not our engine, holds it: its state is under the pod's runtime root.
        r = try ctd.ctr("run -d --runtime \(runtime) \(ContainerdFixture.image) cr2 sleep 30")
        #expect(r.code == 0, "\(r.out)")
        #expect(waitUntil { Files.exists(ctd.kuasarRoot + "/runtimes/crun/cr2/cr2") }, "no crun state for cr2: \(Files.list(ctd.kuasarRoot + "/runtimes/crun"))")
        r = try ctd.ctr("task kill -s SIGKILL cr2")
        #expect(r.code == 0, "\(r.out)")
        #expect(waitUntil { ((try? ctd.ctr("task ls"))?.out ?? "").contains("STOPPED") }, "cr2 did not stop")
        r = try ctd.ctr("task delete cr2")
        #expect(r.code == 0, "\(r.out)")
        _ = try ctd.ctr("container delete cr2")
    }
}
}
