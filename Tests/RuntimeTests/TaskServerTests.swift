import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The task-server kind (`server:<name>`): a program per pod that serves the Task API
/// itself — here `kuasar agent --listen`, as Quark's sandboxed mode would — launched in
/// the pod's namespaces and supervised by the daemon; containerd dials it directly.
extension AllTests {
@Suite struct TaskServerTests {
    static let task = "containerd.task.v3.Task"

    static func config(_ scratch: String) throws -> String {
        let bin = AllTests.DaemonTests.binary
        let agentArgs = "[\"agent\", \"--listen\", \"unix://{state_dir}/agent.sock\", \"--root\", \"{state_dir}/agent\", \"--sandbox-id\", \"{id}\", \"--namespace\", \"{namespace}\", \"--cgroup-parent\", \"agent\"]"
        return """
        [sandboxers]
        kuasar = "namespace"
        kuasar-agent = "server:agent"
        kuasar-flaky = "server:flaky"
        kuasar-printer = "server:printer"
        kuasar-crashy = "server:crashy"
        kuasar-silent = "server:silent"
        [servers.agent]
        path = "\(bin)"
        args = \(agentArgs)
        address = "unix://{state_dir}/agent.sock"
        [servers.flaky]
        path = "\(bin)"
        args = \(agentArgs)
        address = "unix://{state_dir}/agent.sock"
        restart = "on-failure"
        max_restarts = 2
        [servers.printer]
        path = "/bin/sh"
        args = ["-c", "echo unix://{state_dir}/p.sock; exec \(bin) agent --listen unix://{state_dir}/p.sock --root {state_dir}/p --cgroup-parent p"]
        [servers.crashy]
        path = "/bin/sh"
        args = ["-c", "echo crashy-server cannot start >&2; exit 7"]
        [servers.silent]
        path = "/bin/sleep"
        args = ["60"]
        address = "unix://{state_dir}/never.sock"
        ready_timeout_secs = 1

        """
    }

    static func status(_ node: PodTests.Node, _ id: String, _ sandboxer: String) throws -> Containerd_Services_Sandbox_V1_ControllerStatusResponse {
        var r = Containerd_Services_Sandbox_V1_ControllerStatusRequest()
        r.sandboxID = id
        r.sandboxer = sandboxer
        r.verbose = true
        return try node.call("Status", r, Containerd_Services_Sandbox_V1_ControllerStatusResponse.self)
    }

    static func shutdown(_ node: PodTests.Node, _ id: String, _ sandboxer: String) throws {
        var stop = Containerd_Services_Sandbox_V1_ControllerStopRequest()
        stop.sandboxID = id
        stop.sandboxer = sandboxer
        stop.timeoutSecs = 2
        _ = try node.call("Stop", stop, Containerd_Services_Sandbox_V1_ControllerStopResponse.self)
        var sd = Containerd_Services_Sandbox_V1_ControllerShutdownRequest()
        sd.sandboxID = id
        sd.sandboxer = sandboxer
        _ = try node.call("Shutdown", sd, Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self)
    }

    @Test func theAgentServesThePodThroughTheControllerAndItsCrashStopsThePod() throws {
        let scratch = try scratchDirectory("task-server")
        defer { Files.removeTree(scratch) }
        try PodTests.Node.with("tsrv", config: try Self.config(scratch)) { node in
            let (pid, address) = try node.runPod("ts1", PodTests.podConfig(hostname: "ts-pod"), sandboxer: "kuasar-agent")
            #expect(address == node.root + "/ts1/agent.sock", "\(address)")
            #expect(PodTests.nsInode(String(pid), "net") != PodTests.nsInode("self", "net"), "the program runs in the pod's network namespace, not the host's")
            #expect(((try? Files.readString("/proc/\(pid)/cmdline")) ?? "").contains("agent"))

            // containerd's CRI spec points the container at the pid Start returned.
            let b = try node.bundle("c1", pid: pid, args: ["sh", "-c", "echo served by the agent on $(cat /etc/hostname)"])
            let t = try OneShotClient(path: address)
            var create = Containerd_Task_V3_CreateTaskRequest()
            create.id = "c1"
            create.bundle = b
            create.stdout = "file://" + b + "/out"
            create.stderr = "file://" + b + "/out"
            let created = try t.call(Self.task, "Create", create, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
            #expect(PodTests.nsInode(String(created.pid), "net") == PodTests.nsInode(String(pid), "net"))
            var start = Containerd_Task_V3_StartRequest()
            start.id = "c1"
            _ = try t.call(Self.task, "Start", start, as: Containerd_Task_V3_StartResponse.self, namespace: "k8s.io")
            var wait = Containerd_Task_V3_WaitRequest()
            wait.id = "c1"
            #expect(try t.call(Self.task, "Wait", wait, as: Containerd_Task_V3_WaitResponse.self, namespace: "k8s.io").exitStatus == 0)
            #expect(node.output(b).contains("served by the agent on ts-pod"), "\(node.output(b))")
            var del = Containerd_Task_V3_DeleteRequest()
            del.id = "c1"
            _ = try t.call(Self.task, "Delete", del, as: Containerd_Task_V3_DeleteResponse.self, namespace: "k8s.io")
            t.close()

            let st = try Self.status(node, "ts1", "kuasar-agent")
            #expect(st.state == "SANDBOX_READY" && st.pid == pid)
            #expect(st.info["info"]?.contains("\"restarts\":0,\"running\":true") == true, "\(st.info)")

            // The program crashes: the pod is NOTREADY and Controller.Wait answers.
            kill(pid_t(pid), SIGKILL)
            var w = Containerd_Services_Sandbox_V1_ControllerWaitRequest()
            w.sandboxID = "ts1"
            w.sandboxer = "kuasar-agent"
            let waited = try node.call("Wait", w, Containerd_Services_Sandbox_V1_ControllerWaitResponse.self)
            #expect(waited.exitStatus == 137, "\(waited)")
            #expect(try Self.status(node, "ts1", "kuasar-agent").state == "SANDBOX_NOTREADY")
            try Self.shutdown(node, "ts1", "kuasar-agent")
            #expect(!Files.exists(node.root + "/ts1"))
        }
    }

    @Test func restartPolicyPrintedAddressAndProgramsThatNeverServe() throws {
        let scratch = try scratchDirectory("task-server-2")
        defer { Files.removeTree(scratch) }
        var leftRunning: pid_t = 0
        try PodTests.Node.with("tsrv2", config: try Self.config(scratch)) { node in
            // on-failure: a killed program comes back, serving at the same address.
            let (pid, address) = try node.runPod("fl", PodTests.podConfig(hostname: "fl"), sandboxer: "kuasar-flaky")
            kill(pid_t(pid), SIGKILL)
            var newPid: UInt32 = 0
            #expect(waitUntil(timeoutMS: 10_000) {
                newPid = (try? Self.status(node, "fl", "kuasar-flaky").pid) ?? 0
                return newPid != 0 && newPid != pid
            }, "restarted")
            #expect(waitUntil(timeoutMS: 10_000) {
                guard let t = try? OneShotClient(path: address) else { return false }
                defer { t.close() }
                return (try? t.call(Self.task, "Connect", Containerd_Task_V3_ConnectRequest(), as: Containerd_Task_V3_ConnectResponse.self, namespace: "k8s.io").shimPid) == newPid
            }, "the restarted program serves")
            let st = try Self.status(node, "fl", "kuasar-flaky")
            #expect(st.state == "SANDBOX_READY" && (st.info["info"] ?? "").contains("\"restarts\":1"), "\(st)")
            try Self.shutdown(node, "fl", "kuasar-flaky")
            #expect(waitUntil { processGone(pid_t(newPid)) })

            // The address the program prints as its first line.
            let (ppid, paddress) = try node.runPod("pr", PodTests.podConfig(hostname: "pr"), sandboxer: "kuasar-printer")
            #expect(paddress == node.root + "/pr/p.sock" && ppid > 0)
            // Left running: it goes with the daemon (the tests' on_exit = "stop").
            leftRunning = pid_t(ppid)

            // One that exits before serving, one that never answers: Start says why.
            for (id, sandboxer, code, text) in [("cr", "kuasar-crashy", RPCCode.internal, "crashy-server cannot start"),
                                                ("si", "kuasar-silent", RPCCode.deadlineExceeded, "did not answer")] {
                var create = Containerd_Services_Sandbox_V1_ControllerCreateRequest()
                create.sandboxID = id
                create.sandboxer = sandboxer
                _ = try node.call("Create", create, Containerd_Services_Sandbox_V1_ControllerCreateResponse.self)
                var start = Containerd_Services_Sandbox_V1_ControllerStartRequest()
                start.sandboxID = id
                start.sandboxer = sandboxer
                do {
                    _ = try node.call("Start", start, Containerd_Services_Sandbox_V1_ControllerStartResponse.self)
                    Issue.record("\(sandboxer) started")
                } catch let e as RPCError {
                    #expect(e.code == code && e.message.contains(text), "\(e)")
                }
                var sd = Containerd_Services_Sandbox_V1_ControllerShutdownRequest()
                sd.sandboxID = id
                sd.sandboxer = sandboxer
                _ = try node.call("Shutdown", sd, Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self)
            }
            #expect(try capture("/bin/sh", "-c", "pgrep -f '^/bin/sleep 60$' | wc -l").trimmingCharacters(in: .whitespacesAndNewlines) == "0", "the silent program was killed")
        }
        #expect(leftRunning > 0 && waitUntil { processGone(leftRunning) }, "the printer's program outlived its daemon")
    }
}
}
