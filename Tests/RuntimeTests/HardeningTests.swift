import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
@testable import KuasarSystem
@testable import KuasarWire
@testable import KuasarGRPC
#if canImport(Glibc)
import Glibc
#endif

/// Inputs from outside the daemon that used to trap it (and with it every pod on the node).
extension AllTests {
@Suite struct HardeningTests {
    /// `grpc-timeout: 5124096H` overflowed 64-bit nanoseconds and trapped the daemon.
    @Test func hugeGRPCTimeoutIsNoDeadlineNotATrap() throws {
        #expect(GRPCServer.parseTimeout("5124096H") == .max)
        #expect(GRPCServer.parseTimeout("99999999S") == 99_999_999 * 1_000_000_000)
        #expect(GRPCServer.parseTimeout("100m") == 100_000_000)
        #expect(GRPCServer.parseTimeout("12x") == nil)
        try PodTests.Node.with("timeout") { node in
            var r = Containerd_Services_Sandbox_V1_ControllerStatusRequest()
            r.sandboxID = "nope"
            r.sandboxer = "kuasar"
            for t in ["5124096H", "99999999H", "99999999M"] {
                do {
                    _ = try node.grpc.call(PodTests.controller, "Status", r, as: Containerd_Services_Sandbox_V1_ControllerStatusResponse.self,
                                           metadata: [("containerd-namespace", "k8s.io"), ("grpc-timeout", t)])
                    Issue.record("status of an unknown sandbox answered")
                } catch let e as RPCError {
                    #expect(e.code == .notFound, "\(t): \(e)")
                }
            }
            #expect((try? HealthProbe.query(socketPath: node.socket))?.hasPrefix("ok ") == true, "the daemon went down")
        }
    }

    /// A hook `timeout` of 18446744074 s or more overflowed; `"args": []` trapped on argv[0].
    @Test func hookWithEmptyArgsAndHugeTimeoutRuns() throws {
        try PodTests.Node.with("hooks") { node in
            let (pid, address) = try node.runPod("hooks", PodTests.podConfig(hostname: "hooks"))
            let marker = node.bundles + "/created-runtime"
            let b = try node.bundle("hooked", pid: pid, args: ["sh", "-c", "echo ran"]) { json in
                json["hooks"] = [
                    "createRuntime": [["path": "/usr/bin/touch", "args": ["touch", marker], "timeout": 18446744074]],
                    "startContainer": [["path": "/bin/true", "args": [String]()]],
                    "poststart": [["path": "/bin/true", "args": [String](), "timeout": 99999999999]],
                ]
            }
            _ = try node.startContainer(address, "hooked", bundle: b)
            #expect(waitUntil { node.output(b).contains("ran") }, "\(node.output(b))")
            #expect(Files.exists(marker), "createRuntime hook did not run")
            #expect((try? HealthProbe.query(socketPath: node.socket))?.hasPrefix("ok ") == true, "the daemon went down")
            try node.shutdown("hooks")
        }
    }

    /// A blkio weight below 10 (spec or Task.Update) underflowed the io.weight conversion.
    @Test func smallBlkioWeightIsClampedOnCgroupV2() throws {
        let dir = try scratchDirectory("iow")
        defer { Files.removeTree(dir) }
        try Files.write(dir + "/io.weight", "", create: true)
        let cg = Cgroup(mode: .v2, path: "x", dirs: ["": dir], order: [""])
        for (weight, expected) in [(UInt16(5), "default 1"), (10, "default 1"), (1000, "default 10000"), (5000, "default 10000")] {
            var r = CgroupResources()
            r.blkioWeight = weight
            try cg.apply(r)
            #expect(try Files.readString(dir + "/io.weight") == expected, "weight \(weight)")
        }
    }

    /// An id whose `<root>/<id>/task.sock` cannot be a unix socket path is refused at
    /// Create naming the limit; Task.Shutdown does not remove a Controller's pod.
    @Test func sandboxStateBugs() throws {
        try PodTests.Node.with("state") { node in
            let long = String(repeating: "a", count: 100)
            do {
                _ = try node.runPod(long, PodTests.podConfig(hostname: "long"))
                Issue.record("an id too long for the task socket was accepted")
            } catch let e as RPCError {
                #expect(e.code == .invalidArgument && e.message.contains("unix socket path holds at most 107"), "\(e)")
            }
            #expect(!Files.exists(node.root + "/" + long))

            let (pid, address) = try node.runPod("owned", PodTests.podConfig(hostname: "owned"))
            let t = try OneShotClient(path: address)
            _ = try? t.call("containerd.task.v3.Task", "Shutdown", Containerd_Task_V3_ShutdownRequest(), as: Google_Protobuf_Empty.self, namespace: "k8s.io")
            t.close()
            usleep(100_000)
            var r = Containerd_Services_Sandbox_V1_ControllerStatusRequest()
            r.sandboxID = "owned"
            r.sandboxer = "kuasar"
            let st = try node.call("Status", r, Containerd_Services_Sandbox_V1_ControllerStatusResponse.self)
            #expect(st.state == "SANDBOX_READY" && st.pid == UInt32(pid), "Task.Shutdown removed the Controller's pod: \(st)")
            #expect(!processGone(pid))
            try node.shutdown("owned")
        }
    }

    /// Connections that never send their first bytes were held forever: they are closed
    /// after the handshake deadline, and one client cannot hold more than 256 of them.
    @Test func silentConnectionsAreBoundedAndTimedOut() throws {
        try PodTests.Node.with("silent") { node in
            var fds: [Int32] = []
            defer { for fd in fds { close(fd) } }
            for _ in 0..<262 { fds.append(try Socket.connectUnix(path: node.socket, blocking: true).take()) }
            func closedByPeer(_ fd: Int32, waitMS: Int32) -> Bool {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, waitMS) == 1 else { return false }
                var b: UInt8 = 0
                return recv(fd, &b, 1, Int32(MSG_DONTWAIT)) == 0
            }
            // The daemon accepts in its own time: the ones over the cap are closed at once.
            #expect(waitUntil { fds[256...].allSatisfy { closedByPeer($0, waitMS: 0) } }, "connections over the per-client cap stay open")
            #expect(!closedByPeer(fds[0], waitMS: 100), "closed before its deadline")
            // Another client is served meanwhile.
            let other = try shell("\(AllTests.DaemonTests.binary) health --socket \(node.socket)")
            #expect(other.code == 0 && other.out.hasPrefix("ok "), "\(other.out)")
            #expect(closedByPeer(fds[0], waitMS: 7000), "a silent connection outlived the handshake deadline")
        }
    }

    /// The admin ForceDelete (what `containerd-shim-kuasar-v2 delete` calls) saved no state
    /// and published no TaskDelete.
    @Test func forceDeleteSavesStateAndPublishes() throws {
        let stubs = try PodTests.eventStubs()
        defer { Files.removeTree(stubs) }
        let eventsSocket = "/tmp/kuasar-fd-events-\(getpid()).sock"
        let sink = try PodTests.EventsSink(socket: eventsSocket, stubs: stubs)
        defer { try? sink.stop(); unlink(eventsSocket) }
        try PodTests.Node.with("fdel", config: "[containerd]\naddress = \"\(eventsSocket)\"\n") { node in
            let (pid, address) = try node.runPod("fdel", PodTests.podConfig(hostname: "fdel"))
            let b = try node.bundle("fdel1", pid: pid, args: ["sleep", "300"])
            _ = try node.startContainer(address, "gone", bundle: b)
            #expect(waitUntil { sink.lines.contains("/tasks/start k8s.io gone") }, "\(sink.text)")
            let admin = try OneShotClient(path: node.root + "/admin.sock")
            var req = Kuasar_Admin_V1_ForceDeleteRequest()
            req.containerID = "gone"
            req.namespace = "k8s.io"
            let r = try admin.call(AdminService.service, "ForceDelete", req, as: Kuasar_Admin_V1_ForceDeleteResponse.self)
            admin.close()
            #expect(r.found && r.exitStatus == 137)
            #expect(waitUntil { sink.lines.contains("/tasks/delete k8s.io gone") }, "no TaskDelete: \(sink.text)")
            let state = (try? Files.readString(node.root + "/fdel/state.json")) ?? ""
            #expect(state.contains("\"id\":\"fdel\"") && !state.contains("\"gone\""), "state.json still lists it: \(state)")
            try node.shutdown("fdel")
        }
    }
    /// Removing a container's cgroup retried rmdir with usleep on the loop (50 × 2 ms per
    /// directory) and then gave up: a cgroup the container made below its own (systemd
    /// or a nested runtime does) stayed busy, stalled the daemon and leaked with its
    /// processes. Now the whole subtree is killed and removed, busy ones on a timer.
    @Test func busyCgroupIsRemovedOffTheLoop() throws {
        try PodTests.Node.with("reap", config: "[namespace]\ncgroup_parent = \"kuasar-reap-\(getpid())\"\n") { node in
            let host = try CgroupHost.detect()
            guard host.mode == .v1 else { return }  // this machine's layout; v2 is one directory
            let (pid, address) = try node.runPod("reap", PodTests.podConfig(hostname: "reap"))
            let b = try node.bundle("reap1", pid: pid, args: ["sleep", "300"])
            _ = try node.startContainer(address, "busy", bundle: b)
            let cg = host.existing("kuasar-reap-\(getpid())/reap/busy")
            let sub = cg.dirs["memory"]! + "/nested"
            try makeDirectories(sub, mode: 0o755)
            // A process of its own in the nested cgroup, as a container's systemd would have.
            let stray = try Spawner.spawn(ProcessSpec(executable: "/bin/sleep", arguments: ["sleep", "300"]))
            let strayPid = stray.pid
            let strayPidfd = stray.pidfd.take()
            try Files.write(sub + "/cgroup.procs", "\(strayPid)")
            defer { kill(strayPid, SIGKILL); _ = waitpid(strayPid, nil, __WALL); close(strayPidfd); _ = rmdir(sub) }

            let t = try OneShotClient(path: address)
            defer { t.close() }
            var k = Containerd_Task_V3_KillRequest()
            k.id = "busy"
            k.signal = 9
            _ = try t.call("containerd.task.v3.Task", "Kill", k, as: Google_Protobuf_Empty.self, namespace: "k8s.io")
            var w = Containerd_Task_V3_WaitRequest()
            w.id = "busy"
            _ = try t.call("containerd.task.v3.Task", "Wait", w, as: Containerd_Task_V3_WaitResponse.self, namespace: "k8s.io")
            var d = Containerd_Task_V3_DeleteRequest()
            d.id = "busy"
            _ = try t.call("containerd.task.v3.Task", "Delete", d, as: Containerd_Task_V3_DeleteResponse.self, namespace: "k8s.io")
            #expect(waitUntil { processGone(strayPid) || (try? Files.readString("/proc/\(strayPid)/stat"))?.contains(") Z ") == true },
                    "a process in the container's nested cgroup outlived Delete")
            #expect(waitUntil { cg.dirs.values.allSatisfy { !Files.exists($0) } },
                    "cgroup left: \(cg.dirs.values.filter { Files.exists($0) })")
            try node.shutdown("reap")
            let parent = host.existing("kuasar-reap-\(getpid())")
            #expect(waitUntil { parent.dirs.values.allSatisfy { !Files.exists($0 + "/reap") } }, "the pod's cgroup parent was left")
            for dir in parent.dirs.values { _ = rmdir(dir) }
        }
    }

    /// A hook's state (with the spec's annotations, which can be large) was written into a
    /// blocking pipe from the loop: a hook that read it late stalled every pod.
    @Test func largeHookStateDoesNotStallTheDaemon() throws {
        try PodTests.Node.with("hookstate") { node in
            let (pid, address) = try node.runPod("hs", PodTests.podConfig(hostname: "hs"))
            let got = node.bundles + "/state-bytes"
            let b = try node.bundle("hs1", pid: pid, args: ["true"]) { json in
                var a = json["annotations"] as? [String: Any] ?? [:]
                a["io.kuasar.test/big"] = String(repeating: "x", count: 600_000)
                json["annotations"] = a
                json["hooks"] = ["createRuntime": [["path": "/bin/sh", "args": ["sh", "-c", "sleep 3; wc -c > \(got)"]]]]
            }
            final class Box: @unchecked Sendable { var error: (any Error)?; var done = false }
            let box = Box()
            let creator = Thread {
                do {
                    let t = try OneShotClient(path: address)
                    defer { t.close() }
                    var create = Containerd_Task_V3_CreateTaskRequest()
                    create.id = "hooked"
                    create.bundle = b
                    _ = try t.call("containerd.task.v3.Task", "Create", create, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
                } catch { box.error = error }
                box.done = true
            }
            creator.start()
            usleep(300_000)  // the hook is running and not reading yet
            var st = Containerd_Services_Sandbox_V1_ControllerStatusRequest()
            st.sandboxID = "hs"
            st.sandboxer = "kuasar"
            let t0 = MonotonicClock.nanoseconds()
            _ = try node.call("Status", st, Containerd_Services_Sandbox_V1_ControllerStatusResponse.self)
            let ms = (MonotonicClock.nanoseconds() - t0) / 1_000_000
            #expect(ms < 1500, "Status waited \(ms) ms behind a hook that had not read its state")
            #expect(waitUntil(timeoutMS: 15_000) { box.done })
            #expect(box.error == nil, "\(String(describing: box.error))")
            let bytes = Int(((try? Files.readString(got)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            #expect(bytes > 600_000, "the hook got \(bytes) bytes of state")
            try node.shutdown("hs")
        }
    }

    /// A socket file was there before its listen: a client that waited for the file (as
    /// the agent tests and any supervisor do) and connected at once got ECONNREFUSED, and
    /// under CI load that crashed a test. Now the file appears only once it accepts.
    @Test func aListeningSocketFileAcceptsFromTheMomentItExists() throws {
        let dir = try scratchDirectory("sock-window")
        defer { Files.removeTree(dir) }
        let path = dir + "/api.sock"
        final class Box: @unchecked Sendable { var refused = 0; var connected = 0; var stop = false; var round = -1 }
        let box = Box()
        let racer = Thread {
            var seen = -1
            while !box.stop {
                let r = box.round
                guard r != seen, access(path, F_OK) == 0 else { continue }
                seen = r
                do {
                    let fd = try Socket.connectUnix(path: path, blocking: true)
                    fd.close()
                    box.connected += 1
                } catch { box.refused += 1 }
            }
        }
        racer.start()
        for i in 0..<300 {
            box.round = i
            let l = try Socket.listenUnix(path: path)
            var st = stat()
            #expect(lstat(path, &st) == 0 && st.st_mode & 0o777 == 0o600)
            _ = waitUntil(timeoutMS: 200) { box.connected + box.refused > i }
            unlink(path)
            l.close()
        }
        box.stop = true
        _ = waitUntil(timeoutMS: 1000) { racer.isFinished }
        #expect(box.refused == 0, "\(box.refused) of \(box.connected + box.refused) connects to a socket file that existed were refused")
        #expect(box.connected > 0)
        // No staging name is left, a dead socket is replaced, a live one and a non-socket are not.
        let stale = try Socket.listenUnix(path: path)
        stale.close()
        let again = try Socket.listenUnix(path: path)
        #expect(throws: SystemError.self) { let x = try Socket.listenUnix(path: path); x.close() }
        again.close()
        unlink(path)
        _ = try Files.write(path, "not a socket", create: true)
        #expect(throws: SystemError.self) { let x = try Socket.listenUnix(path: path); x.close() }
        #expect(try Files.readString(path) == "not a socket")
        unlink(path)
        #expect(Files.list(dir).isEmpty, "\(Files.list(dir))")
        // A path too long for a staging name beside it still listens (bound in place).
        let deep = dir + "/" + String(repeating: "d", count: 98 - dir.utf8.count)
        let long = try Socket.listenUnix(path: deep + "/s.sock")
        let c = try Socket.connectUnix(path: deep + "/s.sock", blocking: true)
        c.close()
        long.close()
        Files.removeTree(deep)
    }

    /// When a later rootfs mount failed, the earlier ones stayed mounted on the rootfs.
    @Test func failedRootfsMountLeavesNothingMounted() throws {
        try PodTests.Node.with("rootfs") { node in
            let (pid, address) = try node.runPod("rf", PodTests.podConfig(hostname: "rf"))
            let b = try node.bundle("rf1", pid: pid, args: ["true"])
            let lower = node.bundles + "/lower"
            try makeDirectories(lower, mode: 0o755)
            let t = try OneShotClient(path: address)
            defer { t.close() }
            for second in [("bogusfs", "none", [String]()), ("overlay", "overlay", ["lowerdir=/nonexistent-\(getpid())"])] {
                var create = Containerd_Task_V3_CreateTaskRequest()
                create.id = "rf"
                create.bundle = b
                var m1 = Containerd_Types_Mount()
                m1.type = "bind"
                m1.source = lower
                m1.options = ["rbind", "ro"]
                var m2 = Containerd_Types_Mount()
                m2.type = second.0
                m2.source = second.1
                m2.options = second.2
                create.rootfs = [m1, m2]
                do {
                    _ = try t.call("containerd.task.v3.Task", "Create", create, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
                    Issue.record("a rootfs with a \(second.0) mount was accepted")
                } catch let e as RPCError {
                    #expect(e.message.contains(second.0) || e.message.contains("rootfs mount 2"), "\(e)")
                }
                #expect(mountsUnder(b + "/rootfs").isEmpty, "after a failed \(second.0) mount: \(mountsUnder(b + "/rootfs"))")
            }
            try node.shutdown("rf")
        }
    }

    /// The Controller remembered every id it ever made (without bound) to answer a repeated
    /// Shutdown, and forgot them all on restart. Now: the newest ones, on disk.
    @Test func repeatedShutdownAnswersOKAcrossARestart() throws {
        try PodTests.Node.with("again") { node in
            _ = try node.runPod("twice", PodTests.podConfig(hostname: "twice"))
            try node.shutdown("twice")
            var sd = Containerd_Services_Sandbox_V1_ControllerShutdownRequest()
            sd.sandboxID = "twice"
            sd.sandboxer = "kuasar"
            _ = try node.call("Shutdown", sd, Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self)
            let old = try node.killAndRestart {}
            _ = try node.call("Shutdown", sd, Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self)
            sd.sandboxID = "never-made"
            do {
                _ = try node.call("Shutdown", sd, Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self)
                Issue.record("Shutdown of an id never made answered OK")
            } catch let e as RPCError {
                #expect(e.code == .notFound, "\(e)")
            }
            _ = try Spawner.wait(old.process)
            old.log.close()
        }
        // Bounded: the oldest are forgotten, on disk too.
        let dir = try scratchDirectory("shutdown-log")
        defer { Files.removeTree(dir) }
        let log = ShutdownLog(root: dir)
        let n = ShutdownLog.capacity * 2 + 10
        for i in 0..<n { log.insert("s\(i)") }
        #expect(log.count == ShutdownLog.capacity)
        #expect(!log.contains("s0") && log.contains("s\(n - 1)") && log.contains("s\(n - ShutdownLog.capacity)"))
        let again = ShutdownLog(root: dir)
        #expect(again.count == ShutdownLog.capacity && again.contains("s\(n - 1)") && !again.contains("s\(n - ShutdownLog.capacity - 1)"))
        let lines = try Files.readString(dir + "/shutdown.log").split(separator: "\n").count
        #expect(lines <= 2 * ShutdownLog.capacity, "the log grew to \(lines) lines")
    }

    /// `kuasar exec --exec-id` became part of a path that was made and then removed.
    @Test func execIDIsValidatedBeforeItBecomesAPath() throws {
        try PodTests.Node.with("execid") { node in
            let (pid, address) = try node.runPod("ex", PodTests.podConfig(hostname: "ex"))
            let b = try node.bundle("ex1", pid: pid, args: ["sleep", "300"])
            _ = try node.startContainer(address, "c1", bundle: b)
            let victim = "/tmp/kuasar-victim-\(getpid()).io"
            try makeDirectories(victim, mode: 0o755)
            try Files.write(victim + "/keep", "x", create: true)
            defer { Files.removeTree(victim) }
            // <root>/run/c1.<id>.io resolves to the victim.
            let r = try shell("\(AllTests.DaemonTests.binary) exec --root \(node.root) --exec-id 'x/../../../kuasar-victim-\(getpid())' c1 -- true 2>&1")
            #expect(r.code != 0 && r.out.contains("exec id"), "\(r.code): \(r.out)")
            #expect(Files.exists(victim + "/keep"), "a directory outside the root was removed")
            try node.shutdown("ex")
        }
    }
    /// A system call's errno became a string on its way up, and every failure answered
    /// Internal: a cgroup write the kernel refuses as invalid is InvalidArgument now.
    @Test func errnoKeepsItsWireStatus() throws {
        #expect(RPCError.from(ContainerError("update x: y", cause: SystemError("write", "cpuset.cpus", errno: .EINVAL))).code == .invalidArgument)
        #expect(RPCError.from(ContainerError("start x: y", cause: SystemError("open", "/x", errno: .ENOENT))).code == .notFound)
        #expect(RPCError.from(ContainerError(.failed, "no cause")).code == .internal)
        try PodTests.Node.with("errno") { node in
            let (pid, address) = try node.runPod("er", PodTests.podConfig(hostname: "er"))
            let b = try node.bundle("er1", pid: pid, args: ["sleep", "300"])
            _ = try node.startContainer(address, "er", bundle: b)
            let t = try OneShotClient(path: address)
            defer { t.close() }
            var u = Containerd_Task_V3_UpdateTaskRequest()
            u.id = "er"
            u.resources.typeURL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
            u.resources.value = Data(#"{"cpu":{"cpus":"100000"}}"#.utf8)
            do {
                _ = try t.call("containerd.task.v3.Task", "Update", u, as: Google_Protobuf_Empty.self, namespace: "k8s.io")
                Issue.record("a cpuset of CPU 100000 was accepted")
            } catch let e as RPCError {
                #expect(e.code == .invalidArgument && e.message.contains("cpuset.cpus"), "\(e.code): \(e.message)")
            }
            try node.shutdown("er")
        }
    }
}
}
