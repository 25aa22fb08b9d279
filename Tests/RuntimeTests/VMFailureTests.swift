import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests.VMSandboxTests {
    /// Debian's containerd 1.6 through the shim path: runtime `io.containerd.kuasar-vm.v2`
    /// is the shim binary `containerd-shim-kuasar-vm-v2`, whose sandboxer `kuasar-vm` is the
    /// vm kind. `ctr run --rm` boots a VM for the container, prints its output, exits with
    /// its code, and leaves no QEMU and no mount behind.
    @Test func containerdRunsVMContainersThroughTheShimPath() throws {
        let scratch = try scratchDirectory("vm-ctd")
        defer { Files.removeTree(scratch) }
        try Files.write(scratch + "/config.toml", "[daemon]\non_exit = \"stop\"\n" + Self.config(), create: true)
        let ctd = try ContainerdFixture("vm", config: scratch + "/config.toml", shims: ["containerd-shim-kuasar-vm-v2"])
        defer { try? ctd.stop() }
        let runtime = "io.containerd.kuasar-vm.v2"
        // The guest's CPU under TCG is QEMU's model, not the host's: the container ran in the VM.
        var r = try ctd.ctr("run --rm --runtime \(runtime) \(ContainerdFixture.image) vmc1 sh -c 'echo hello from $(grep -m1 \"model name\" /proc/cpuinfo | cut -d: -f2); exit 3'", timeoutS: 120)
        #expect(r.code == 3, "\(r.out)")
        #expect(r.out.contains("hello from QEMU Virtual CPU"), "\(r.out)")
        #expect(waitUntil(timeoutMS: 10_000) { Self.qemuProcesses(mentioning: ctd.kuasarRoot).isEmpty }, "the VM goes with its last container")
        #expect(!Files.exists(ctd.kuasarRoot + "/vmc1"), "state left: \(Files.list(ctd.kuasarRoot + "/vmc1"))")

        // A detached one: killed through ctr, its status is the signal's.
        r = try ctd.ctr("run -d --runtime \(runtime) \(ContainerdFixture.image) vmc2 sleep 300", timeoutS: 120)
        #expect(r.code == 0, "\(r.out)")
        #expect(Self.qemuProcesses(mentioning: ctd.kuasarRoot).count == 1)
        r = try ctd.ctr("task kill -s SIGKILL vmc2")
        #expect(r.code == 0, "\(r.out)")
        #expect(waitUntil { ((try? ctd.ctr("task ls"))?.out ?? "").contains("STOPPED") }, "vmc2 did not stop")
        r = try ctd.ctr("task delete vmc2")
        #expect(r.code == 0 && r.out.contains("137"), "\(r.out)")
        _ = try ctd.ctr("container delete vmc2")
        #expect(waitUntil(timeoutMS: 10_000) { Self.qemuProcesses(mentioning: ctd.kuasarRoot).isEmpty })
        #expect(mountsUnder(ctd.kuasarRoot).isEmpty, "\(mountsUnder(ctd.kuasarRoot))")
    }

    /// A guest whose init never answers (the benchmark's baseline initrd: it prints a line
    /// and sleeps) fails Start at the boot deadline with what the console printed, and its
    /// QEMU is killed; a guest kernel that panics while its pod runs ends the pod — its
    /// containers' Waits and Controller.Wait answer — and the console keeps the panic.
    @Test func anAgentThatNeverAnswersAndAGuestThatPanicsAreClearErrors() throws {
        let scratch = try scratchDirectory("vm-noagent")
        defer { Files.removeTree(scratch) }
        let (code, out) = try shell("python3 \(repositoryRoot)/guest/build.py --baseline --out \(scratch)")
        #expect(code == 0, "\(out)")
        try AllTests.PodTests.Node.with("vm-noagent", config: Self.config(initrd: scratch + "/initrd-baseline.lz4", bootTimeout: 6)) { node in
            do {
                _ = try node.runPod("na", AllTests.PodTests.podConfig(hostname: "na"), sandboxer: "kuasar-vm")
                Issue.record("a pod whose agent never answered started")
            } catch let e as RPCError {
                #expect(e.code == .deadlineExceeded && e.message.contains("within 6 s") && e.message.contains("kuasar-baseline-ready"), "\(e)")
            }
            #expect(waitUntil(timeoutMS: 10_000) { Self.qemuProcesses(mentioning: node.root).isEmpty }, "the VM is killed")
            var sd = Containerd_Services_Sandbox_V1_ControllerShutdownRequest()
            sd.sandboxID = "na"
            sd.sandboxer = "kuasar-vm"
            _ = try? node.call("Shutdown", sd, Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self)
        }

        try AllTests.PodTests.Node.with("vm-panic", config: Self.config()) { node in
            let (pid, address) = try node.runPod("vp", AllTests.PodTests.podConfig(hostname: "vp"), sandboxer: "kuasar-vm")
            let t = try OneShotClient(path: address)
            defer { t.close() }
            // A symlink in the rootfs that points out of it: the mount through it lands
            // inside the rootfs (the host sees its mount point in the share), never in the guest's /.
            let b1 = try node.bundle("p1", pid: pid, args: ["sh", "-c", "grep -c ' /escaped tmpfs' /proc/mounts; exec sleep 300"]) { json in
                var mounts = json["mounts"] as! [[String: Any]]
                mounts.append(["destination": "/evil/escaped", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]])
                json["mounts"] = mounts
            }
            #expect(symlink("/../../../../../..", b1 + "/rootfs/evil") == 0)
            let io1 = try FIFOs(b1, ["stdout"])
            defer { io1.close() }
            _ = try Self.create(t, "p1", bundle: b1, io1)
            _ = try Self.start(t, "p1")
            #expect(Files.isDirectory(node.root + "/vp/share/p1/rootfs/escaped"), "the mount point is in the container's rootfs")
            // The guest's kernel crashes (sysrq 'c': a panic; the guest reboots, QEMU exits).
            let b2 = try node.bundle("p2", pid: pid, args: ["sh", "-c", "echo c > /proc/sysrq-trigger"])
            let io2 = try FIFOs(b2, ["stdout"])
            defer { io2.close() }
            _ = try Self.create(t, "p2", bundle: b2, io2)
            _ = try Self.start(t, "p2")
            #expect(try Self.wait(t, "p1") == 137)
            #expect(io1.read("stdout") == "1\n", "what p1 wrote before the panic arrives")
            var w = Containerd_Services_Sandbox_V1_ControllerWaitRequest()
            w.sandboxID = "vp"
            w.sandboxer = "kuasar-vm"
            _ = try node.call("Wait", w, Containerd_Services_Sandbox_V1_ControllerWaitResponse.self)
            #expect(waitUntil(timeoutMS: 10_000) { processGone(pid) })
            let console = (try? Files.readString(node.root + "/vp/console.log")) ?? ""
            // The guest's `quiet loglevel=0` keeps the panic's own lines off; sysrq's are there.
            #expect(console.contains("sysrq: Trigger a crash"), "console: \(console.suffix(2000))")
            // The daemon serves on: a namespace pod starts.
            let (_, ok) = try node.runPod("ok", AllTests.PodTests.podConfig(hostname: "ok"))
            #expect(Files.exists(ok))
            try node.shutdown("ok")
            try AllTests.TaskServerTests.shutdown(node, "vp", "kuasar-vm")
            #expect(!Files.exists(node.root + "/vp"))
        }
    }
}
