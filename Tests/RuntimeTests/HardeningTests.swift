import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
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
            #expect((try? HealthProtocol.query(socketPath: node.socket))?.hasPrefix("ok ") == true, "the daemon went down")
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
            #expect((try? HealthProtocol.query(socketPath: node.socket))?.hasPrefix("ok ") == true, "the daemon went down")
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
}
}
