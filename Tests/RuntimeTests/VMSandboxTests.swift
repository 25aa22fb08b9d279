import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The vm kind end to end: the daemon as containerd's sandboxer (gRPC Controller), a QEMU
/// microVM per pod (TCG here) with the guest image `make guest` built, containerd's Task
/// API on the host forwarded to the agent, containerd's FIFOs bridged to the guest.
/// Every bundle is containerd 2.3's CRI spec (the fixture), as containerd writes it.
extension AllTests {
@Suite(.serialized) struct VMSandboxTests {
    static let task = "containerd.task.v3.Task"
    static var image: String { GuestVMTests.imageDir }

    static func config(qemu: String = "/usr/bin/qemu-system-x86_64", kernel: String = image + "/vmlinux", initrd: String = image + "/initrd.lz4",
                       bootTimeout: Int = 90, machine: String = "microvm", templates: String? = nil) -> String {
        let level = currentEnvironmentDictionary()["KUASAR_GUEST_LOG"].map { "\"kuasar.log=\($0)\"" } ?? ""
        return """
        [sandboxers]
        kuasar = "namespace"
        kuasar-vm = "vm"
        [vm]
        qemu = "\(qemu)"
        kernel = "\(kernel)"
        initrd = "\(initrd)"
        accelerator = "tcg"
        machine = "\(machine)"
        boot_timeout_secs = \(bootTimeout)
        kernel_args = [\(level)]
        \(templates.map { "template = true\ntemplate_dir = \"\($0)\"" } ?? "template = false")

        """
    }

    /// containerd's FIFOs for one process: made and opened for reading first, as
    /// containerd does before Create.
    final class FIFOs {
        let dir: String
        var readers: [String: Int32] = [:]
        var stdinWriter: Int32 = -1
        init(_ dir: String, _ names: [String]) throws {
            self.dir = dir
            for n in names {
                let path = dir + "/" + n
                _ = unlink(path)
                guard mkfifo(path, 0o600) == 0 else { throw SystemError("mkfifo", path, errno: Errno(rawValue: errno)) }
                if n == "stdin" {
                    // containerd holds stdin open for writing (O_RDWR: never blocks).
                    stdinWriter = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK)
                } else {
                    readers[n] = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
                }
            }
        }
        func path(_ n: String) -> String { dir + "/" + n }
        /// Everything in the FIFO now (the daemon closed it once the process's output ended).
        func read(_ n: String) -> String {
            guard let fd = readers[n] else { return "" }
            var out: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let k = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                if k <= 0 { break }
                out += buf[..<k]
            }
            return String(decoding: out, as: UTF8.self)
        }
        func write(_ s: String) { _ = s.withCString { Glibc.write(stdinWriter, $0, strlen($0)) } }
        func close() {
            for fd in readers.values { _ = Glibc.close(fd) }
            if stdinWriter >= 0 { _ = Glibc.close(stdinWriter) }
        }
    }

    static func create(_ t: OneShotClient, _ id: String, bundle: String, _ io: FIFOs, terminal: Bool = false, rootfs: [Containerd_Types_Mount] = []) throws -> UInt32 {
        var create = Containerd_Task_V3_CreateTaskRequest()
        create.id = id
        create.bundle = bundle
        create.rootfs = rootfs
        if io.readers["stdout"] != nil { create.stdout = io.path("stdout") }
        if io.readers["stderr"] != nil { create.stderr = io.path("stderr") }
        if io.stdinWriter >= 0 { create.stdin = io.path("stdin") }
        create.terminal = terminal
        return try t.call(task, "Create", create, as: Containerd_Task_V3_CreateTaskResponse.self, timeoutNS: 60_000_000_000, namespace: "k8s.io").pid
    }

    /// A container of `args` in the pod whose Start answered `pid`: its bundle (the CRI
    /// fixture), FIFOs for `streams`, Create and Start. The caller closes the FIFOs.
    static func run(_ t: OneShotClient, _ node: PodTests.Node, _ id: String, pid: pid_t, _ args: [String], streams: [String] = ["stdout"]) throws -> FIFOs {
        let bundle = try node.bundle(id, pid: pid, args: args)
        let io = try FIFOs(bundle, streams)
        do {
            _ = try create(t, id, bundle: bundle, io)
            _ = try start(t, id)
        } catch {
            io.close()
            throw error
        }
        return io
    }

    static func call<Resp: SwiftProtobuf.Message>(_ t: OneShotClient, _ m: String, _ r: some SwiftProtobuf.Message, _: Resp.Type) throws -> Resp {
        try t.call(task, m, r, as: Resp.self, timeoutNS: 60_000_000_000, namespace: "k8s.io")
    }

    static func start(_ t: OneShotClient, _ id: String, exec: String = "") throws -> UInt32 {
        var s = Containerd_Task_V3_StartRequest()
        s.id = id
        s.execID = exec
        return try call(t, "Start", s, Containerd_Task_V3_StartResponse.self).pid
    }

    static func wait(_ t: OneShotClient, _ id: String, exec: String = "") throws -> UInt32 {
        var w = Containerd_Task_V3_WaitRequest()
        w.id = id
        w.execID = exec
        return try call(t, "Wait", w, Containerd_Task_V3_WaitResponse.self).exitStatus
    }

    static func delete(_ t: OneShotClient, _ id: String, exec: String = "") throws {
        var d = Containerd_Task_V3_DeleteRequest()
        d.id = id
        d.execID = exec
        _ = try call(t, "Delete", d, Containerd_Task_V3_DeleteResponse.self)
    }

    /// Shell that returns once the container's init (pid 1 of its PID namespace) has exec'd
    /// `sleep`: everything its script did before is done. Metrics' one pid is not that: it
    /// is also the shell between two commands.
    static let untilSleeping = "until [ \"$(cat /proc/1/comm)\" = sleep ]; do sleep 0.05; done; "

    /// Exec of `args` with stdout on `fifo`, started.
    static func exec(_ t: OneShotClient, _ id: String, _ execID: String, _ args: [String], stdout fifo: String) throws {
        var exec = Containerd_Task_V3_ExecProcessRequest()
        exec.id = id
        exec.execID = execID
        exec.stdout = fifo
        exec.spec.typeURL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
        exec.spec.value = try JSONEncoder().encode(OCISpec.Process(args: args, env: ["PATH=/bin"], cwd: "/"))
        _ = try call(t, "Exec", exec, Google_Protobuf_Empty.self)
        _ = try start(t, id, exec: execID)
    }

    static func rssKB(_ pid: pid_t) -> Int {
        let status = (try? Files.readString("/proc/\(pid)/status")) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }

    static func qemuProcesses(mentioning text: String) -> [pid_t] {
        Files.list("/proc").compactMap { name in
            guard let pid = pid_t(name), let cmd = try? Files.read("/proc/\(name)/cmdline") else { return nil }
            let s = String(decoding: cmd.map { $0 == 0 ? 32 : $0 }, as: UTF8.self)
            return s.contains("qemu-system") && s.contains(text) ? pid : nil
        }
    }

    @Test func aPodIsAMicroVMAndContainerdsTaskAPIRunsItsContainers() throws {
        #expect(Files.exists(Self.image + "/vmlinux"), "no guest image in \(Self.image): make guest builds it")
        try PodTests.Node.with("vm", config: Self.config()) { node in
            let (pid, address) = try node.runPod("vm1", PodTests.podConfig(hostname: "vm-pod", sysctls: ["net.ipv4.ip_unprivileged_port_start": "99"]), sandboxer: "kuasar-vm")
            #expect(address == node.root + "/vm1/task.sock", "\(address)")
            let cmdline = String(decoding: ((try? Files.read("/proc/\(pid)/cmdline")) ?? []).map { $0 == 0 ? 32 : $0 }, as: UTF8.self)
            #expect(cmdline.contains("qemu-system-x86_64") && cmdline.contains("microvm") && cmdline.contains("-sandbox on"), "Start's pid is the VM's QEMU: \(cmdline)")

            var st = Containerd_Services_Sandbox_V1_ControllerStatusRequest()
            st.sandboxID = "vm1"
            st.sandboxer = "kuasar-vm"
            st.verbose = true
            let status = try node.call("Status", st, Containerd_Services_Sandbox_V1_ControllerStatusResponse.self)
            let info = status.info["info"] ?? ""
            #expect(status.state == "SANDBOX_READY" && info.contains("\"accelerator\":\"tcg\"") && info.contains("\"agent_version\":\"\(KuasarVersion.string)\"")
                    && info.contains("\"vmm_pid\":\(pid)") && info.contains("console.log"), "\(status)")

            // containerd 2.3's CRI spec: namespaces are /proc/<pid>/ns paths of Start's pid.
            let t = try OneShotClient(path: address)
            defer { t.close() }
            let b1 = try node.bundle("c1", pid: pid, args: ["sh", "-c", "echo hello from $(hostname) pid $$; cat /etc/resolv.conf; cat /proc/sys/net/ipv4/ip_unprivileged_port_start; echo to-stderr >&2; exec sleep 300"])
            let io1 = try FIFOs(b1, ["stdout", "stderr"])
            defer { io1.close() }
            let created = try Self.create(t, "c1", bundle: b1, io1)
            #expect(created > 0)
            #expect(try Self.start(t, "c1") == created)
            var state = Containerd_Task_V3_StateRequest()
            state.id = "c1"
            let s1 = try Self.call(t, "State", state, Containerd_Task_V3_StateResponse.self)
            #expect(s1.status == .running && s1.bundle == b1 && s1.stdout == io1.path("stdout"), "\(s1)")

            // Controller.Metrics: the guest's cgroup of the pod's containers, as containerd decodes it.
            var mr = Containerd_Services_Sandbox_V1_ControllerMetricsRequest()
            mr.sandboxID = "vm1"
            mr.sandboxer = "kuasar-vm"
            var metrics = Containerd_Types_Metric()
            var m2 = Io_Containerd_Cgroups_V2_Metrics()
            // Until the shell has exec'd sleep (its cat may still run just after Start).
            _ = try waitUntil(timeoutMS: 10_000, everyMS: 50) {
                metrics = try node.call("Metrics", mr, Containerd_Services_Sandbox_V1_ControllerMetricsResponse.self).metrics
                m2 = try Io_Containerd_Cgroups_V2_Metrics(serializedBytes: metrics.data.value)
                return m2.pids.current == 1
            }
            #expect(metrics.id == "vm1" && metrics.data.typeURL.hasSuffix("io.containerd.cgroups.v2.Metrics"), "\(metrics.data.typeURL)")
            #expect(m2.pids.current == 1 && m2.memory.usage > 0 && m2.cpu.usageUsec > 0, "c1 (sh exec-ed sleep): \(m2)")

            // An exec in the same container, with its own FIFO.
            let ioE = try FIFOs(b1, ["exec-out"])
            defer { ioE.close() }
            // (It first waits for the init to be sleep: its shell has written everything by then.)
            try Self.exec(t, "c1", "e1", ["sh", "-c", Self.untilSleeping + "echo exec sees $(cat /etc/hostname); exit 4"], stdout: ioE.path("exec-out"))
            #expect(try Self.wait(t, "c1", exec: "e1") == 4)
            #expect(ioE.read("exec-out") == "exec sees vm-pod\n")
            try Self.delete(t, "c1", exec: "e1")

            // Pids comes from the guest; Kill ends the init; Wait has the real status and
            // the output was in the FIFOs before it.
            var pids = Containerd_Task_V3_PidsRequest()
            pids.id = "c1"
            #expect(try Self.call(t, "Pids", pids, Containerd_Task_V3_PidsResponse.self).processes.map(\.pid).contains(created))
            var k = Containerd_Task_V3_KillRequest()
            k.id = "c1"
            k.signal = 9
            _ = try Self.call(t, "Kill", k, Google_Protobuf_Empty.self)
            #expect(try Self.wait(t, "c1") == 137)
            let out = io1.read("stdout")
            #expect(out.contains("hello from vm-pod") && out.contains("nameserver 10.96.0.10") && out.contains("search default.svc.cluster.local") && out.contains("\n99\n"), "\(out)")
            #expect(io1.read("stderr") == "to-stderr\n")
            #expect(try Self.call(t, "State", state, Containerd_Task_V3_StateResponse.self).status == .stopped)
            try Self.delete(t, "c1")
            #expect(Files.list(node.root + "/vm1/share") == [".modules"], "the container's share directory goes with Delete; the image's on-demand modules stay: \(Files.list(node.root + "/vm1/share"))")

            // stdin through CloseIO, and a second container in the same VM.
            let b2 = try node.bundle("c2", pid: pid, args: ["sh", "-c", "while read l; do echo got $l; done; echo eof; exit 5"])
            let io2 = try FIFOs(b2, ["stdin", "stdout"])
            defer { io2.close() }
            _ = try Self.create(t, "c2", bundle: b2, io2)
            _ = try Self.start(t, "c2")
            io2.write("one\ntwo\n")
            var cio = Containerd_Task_V3_CloseIORequest()
            cio.id = "c2"
            cio.stdin = true
            _ = try Self.call(t, "CloseIO", cio, Google_Protobuf_Empty.self)
            #expect(try Self.wait(t, "c2") == 5)
            #expect(io2.read("stdout") == "got one\ngot two\neof\n")
            try Self.delete(t, "c2")

            // Free page reporting: 96 MiB a container touched and freed go back to the host
            // (QEMU's RSS drops), instead of staying with the VM until it ends.
            let io3 = try Self.run(t, node, "c3", pid: pid, ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=96M count=1 2>/dev/null; echo done; exec sleep 300"])
            defer { io3.close() }
            var said = ""
            #expect(waitUntil(timeoutMS: 30_000) { said += io3.read("stdout"); return said.contains("done") }, "\(said)")
            let peak = Self.rssKB(pid_t(pid))
            #expect(waitUntil(timeoutMS: 20_000) { Self.rssKB(pid_t(pid)) < peak - 48 * 1024 },
                    "QEMU's RSS was \(peak) kB after the guest freed 96 MiB, and is \(Self.rssKB(pid_t(pid))) kB")
            var k3 = Containerd_Task_V3_KillRequest()
            k3.id = "c3"
            k3.signal = 9
            _ = try Self.call(t, "Kill", k3, Google_Protobuf_Empty.self)
            #expect(try Self.wait(t, "c3") == 137)
            try Self.delete(t, "c3")

            // Output still in the guest when its container is killed: the exit is reported
            // once those bytes are in the FIFO — State stays running until then, as the
            // engine's processes do until their drain, so a client that deletes on STOPPED
            // (ctr) loses nothing — and every byte arrives. A FIFO nobody reads holds the
            // exit back for a bounded time only (VMTasks.exitReportBoundNS).
            let mib = 1 << 20
            let io4 = try Self.run(t, node, "c4", pid: pid, ["sh", "-c", "head -c \(mib) /dev/zero; exec sleep 300"])
            defer { io4.close() }
            let io5 = try Self.run(t, node, "c5", pid: pid, ["sh", "-c", "head -c \(mib) /dev/zero; exec sleep 300"])
            defer { io5.close() }
            for id in ["c4", "c5"] {
                try Self.exec(t, id, "synced", ["sh", "-c", Self.untilSleeping], stdout: "")
                #expect(try Self.wait(t, id, exec: "synced") == 0)
                try Self.delete(t, id, exec: "synced")
            }
            let killed = MonotonicClock.nanoseconds()
            for id in ["c4", "c5"] {
                var k = Containerd_Task_V3_KillRequest()
                k.id = id
                k.signal = 9
                _ = try Self.call(t, "Kill", k, Google_Protobuf_Empty.self)
            }
            usleep(2_000_000)   // the exits have reached the host long since
            for id in ["c4", "c5"] {
                var st = Containerd_Task_V3_StateRequest()
                st.id = id
                let s = try Self.call(t, "State", st, Containerd_Task_V3_StateResponse.self)
                #expect(s.status == .running && s.exitStatus == 0, "\(id): its exit is not reported while its output is in the guest: \(s)")
            }
            var got = 0
            #expect(waitUntil(timeoutMS: 30_000) { got += io4.read("stdout").utf8.count; return got >= mib }, "\(got) of \(mib) bytes")
            #expect(try Self.wait(t, "c4") == 137)
            got += io4.read("stdout").utf8.count
            #expect(got == mib, "every byte written before the kill: \(got) of \(mib)")
            var st4 = Containerd_Task_V3_StateRequest()
            st4.id = "c4"
            #expect(try Self.call(t, "State", st4, Containerd_Task_V3_StateResponse.self).status == .stopped)
            try Self.delete(t, "c4")
            // c5's FIFO was never read: its exit comes at the bound, and Delete goes.
            #expect(try Self.wait(t, "c5") == 137)
            let heldMS = (MonotonicClock.nanoseconds() - killed) / 1_000_000
            #expect(heldMS >= 9_500 && heldMS < 25_000, "c5's exit after \(heldMS) ms: the bound is 10 s")
            try Self.delete(t, "c5")
            #expect(io5.read("stdout").utf8.count >= 64 * 1024, "what reached c5's FIFO (its pipe buffer, full) stays readable")

            // Unknown ids are NotFound; a path trick in an id is refused before anything.
            do {
                _ = try Self.wait(t, "nope")
                Issue.record("Wait of an unknown container answered")
            } catch let e as RPCError { #expect(e.code == .notFound, "\(e)") }
            var bad = Containerd_Task_V3_CreateTaskRequest()
            bad.id = "../escape"
            bad.bundle = b2
            do {
                _ = try Self.call(t, "Create", bad, Containerd_Task_V3_CreateTaskResponse.self)
                Issue.record("an id with a path accepted")
            } catch let e as RPCError { #expect(e.code == .invalidArgument, "\(e)") }

            // Stop ends the guest, then QEMU; Shutdown leaves nothing.
            try TaskServerTests.shutdown(node, "vm1", "kuasar-vm")
            #expect(waitUntil(timeoutMS: 10_000) { processGone(pid_t(pid)) }, "QEMU is gone after Stop")
            #expect(!Files.exists(node.root + "/vm1"), "state left: \(Files.list(node.root + "/vm1"))")
            #expect(mountsUnder(node.root).isEmpty)
        }
    }

    @Test func twoPodsRunInTwoVMsAndAVMThatDiesEndsItsPod() throws {
        try PodTests.Node.with("vm2", config: Self.config()) { node in
            let (pidA, addrA) = try node.runPod("vma", PodTests.podConfig(hostname: "pod-a"), sandboxer: "kuasar-vm")
            let (pidB, addrB) = try node.runPod("vmb", PodTests.podConfig(hostname: "pod-b"), sandboxer: "kuasar-vm")
            #expect(pidA != pidB)
            let ta = try OneShotClient(path: addrA)
            defer { ta.close() }
            let tb = try OneShotClient(path: addrB)
            defer { tb.close() }
            let ioA = try Self.run(ta, node, "a", pid: pidA, ["sh", "-c", "echo I am $(hostname); exec sleep 300"])
            defer { ioA.close() }
            let ioB = try Self.run(tb, node, "b", pid: pidB, ["sh", "-c", "echo I am $(hostname)"])
            defer { ioB.close() }
            #expect(try Self.wait(tb, "b") == 0)
            #expect(ioB.read("stdout") == "I am pod-b\n")

            // Pod A's QEMU dies: its container's Wait answers (killed), Controller.Wait
            // answers, and pod B keeps serving.
            kill(pidA, SIGKILL)
            #expect(try Self.wait(ta, "a") == 137)
            #expect(ioA.read("stdout") == "I am pod-a\n", "what pod A wrote before its VM died still arrives")
            var w = Containerd_Services_Sandbox_V1_ControllerWaitRequest()
            w.sandboxID = "vma"
            w.sandboxer = "kuasar-vm"
            let waited = try node.call("Wait", w, Containerd_Services_Sandbox_V1_ControllerWaitResponse.self)
            #expect(waited.exitStatus == 137, "\(waited)")
            var pids = Containerd_Task_V3_PidsRequest()
            pids.id = "b"
            _ = try Self.call(tb, "Pids", pids, Containerd_Task_V3_PidsResponse.self)
            try Self.delete(tb, "b")
            try TaskServerTests.shutdown(node, "vma", "kuasar-vm")
            try TaskServerTests.shutdown(node, "vmb", "kuasar-vm")
            #expect(waitUntil(timeoutMS: 10_000) { processGone(pidB) })
            #expect(Self.qemuProcesses(mentioning: node.root).isEmpty)
        }
    }

    @Test func aMissingImageOrAQEMUThatDiesAtStartIsAClearError() throws {
        let scratch = try scratchDirectory("vm-bad")
        defer { Files.removeTree(scratch) }
        // No kernel: the kind is unavailable, and Create says why.
        try PodTests.Node.with("vm-nokernel", config: Self.config(kernel: scratch + "/no-vmlinux")) { node in
            do {
                _ = try node.runPod("nk", PodTests.podConfig(hostname: "nk"), sandboxer: "kuasar-vm")
                Issue.record("a pod without a kernel started")
            } catch let e as RPCError {
                #expect(e.code == .failedPrecondition && e.message.contains(scratch + "/no-vmlinux"), "\(e)")
            }
        }
        // A QEMU that fails at once: its stderr is in Start's error; the daemon serves on.
        let fake = scratch + "/qemu"
        try Files.write(fake, "#!/bin/sh\necho 'qemu-system-x86_64: -accel tcg: no accelerator found (a test QEMU)' >&2\nexit 1\n", create: true, mode: 0o755)
        try PodTests.Node.with("vm-badqemu", config: Self.config(qemu: fake)) { node in
            do {
                _ = try node.runPod("bq", PodTests.podConfig(hostname: "bq"), sandboxer: "kuasar-vm")
                Issue.record("a pod whose QEMU failed started")
            } catch let e as RPCError {
                #expect(e.message.contains("no accelerator found (a test QEMU)"), "\(e)")
            }
            // The daemon still serves namespace pods.
            let (_, address) = try node.runPod("ok", PodTests.podConfig(hostname: "ok"))
            #expect(Files.exists(address))
            try node.shutdown("ok")
            var sd = Containerd_Services_Sandbox_V1_ControllerShutdownRequest()
            sd.sandboxID = "bq"
            sd.sandboxer = "kuasar-vm"
            _ = try? node.call("Shutdown", sd, Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self)
        }
    }
}
}

extension AllTests.VMSandboxTests {
    /// `kill -9` of the daemon with two VM pods: QEMU outlives it; a container that exits
    /// while no daemon runs is reported once by the next one, with the output it wrote
    /// meanwhile; the other pod keeps serving.
    @Test func vmPodsSurviveADaemonKillAndAnExitMeanwhileIsReportedOnce() throws {
        try AllTests.PodTests.Node.with("vmrec", config: Self.config(), keep: true) { node in
            let (pidA, addrA) = try node.runPod("ra", AllTests.PodTests.podConfig(hostname: "rec-a"), sandboxer: "kuasar-vm")
            let (pidB, addrB) = try node.runPod("rb", AllTests.PodTests.podConfig(hostname: "rec-b"), sandboxer: "kuasar-vm")
            let ba = try node.bundle("ra", pid: pidA, args: ["sleep", "300"])
            let ioA = try FIFOs(ba, ["stdout"])
            defer { ioA.close() }
            let bb = try node.bundle("rb", pid: pidB, args: ["sh", "-c", "echo before; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo after; exit 7"])
            let ioB = try FIFOs(bb, ["stdout"])
            defer { ioB.close() }
            do {
                let ta = try OneShotClient(path: addrA)
                defer { ta.close() }
                _ = try Self.create(ta, "a", bundle: ba, ioA)
                _ = try Self.start(ta, "a")
                let tb = try OneShotClient(path: addrB)
                defer { tb.close() }
                _ = try Self.create(tb, "b", bundle: bb, ioB)
                _ = try Self.start(tb, "b")
            }
            #expect(waitUntil(timeoutMS: 20_000) { ioB.read("stdout").contains("before") }, "b started")

            let firstKeeper = try node.killAndRestart {
                #expect(!processGone(pidA) && !processGone(pidB), "QEMU died with the daemon")
                // While no daemon runs, b is told to finish (through an exec-free path:
                // the file appears in its rootfs through the share).
                let rootfs = node.root + "/rb/share/b/rootfs/tmp"
                try makeDirectories(rootfs, mode: 0o1777)
                try Files.write(rootfs + "/go", "", create: true)
                usleep(1_500_000)
            }
            // The first keeper lives on until its orphans (the VMs) are gone: waited for
            // whatever happens below.
            do {
                let ta = try OneShotClient(path: addrA)
                defer { ta.close() }
                let tb = try OneShotClient(path: addrB)
                defer { tb.close() }
                #expect(try Self.wait(tb, "b") == 7, "the exit while down is reported")
                #expect(ioB.read("stdout") == "after\n", "the output written while no daemon ran arrives")
                var state = Containerd_Task_V3_StateRequest()
                state.id = "a"
                #expect(try Self.call(ta, "State", state, Containerd_Task_V3_StateResponse.self).status == .running)
                // Pod A still runs containers.
                let ioE = try FIFOs(ba, ["exec"])
                defer { ioE.close() }
                try Self.exec(ta, "a", "x", ["hostname"], stdout: ioE.path("exec"))
                #expect(try Self.wait(ta, "a", exec: "x") == 0)
                #expect(ioE.read("exec") == "rec-a\n")
                try Self.delete(tb, "b")
                try AllTests.TaskServerTests.shutdown(node, "ra", "kuasar-vm")
                try AllTests.TaskServerTests.shutdown(node, "rb", "kuasar-vm")
                #expect(waitUntil(timeoutMS: 10_000) { processGone(pidA) && processGone(pidB) })
            } catch {
                for pid in [pidA, pidB] { kill(pid, SIGKILL) }
                _ = try? Spawner.wait(firstKeeper.process)
                firstKeeper.log.close()
                throw error
            }
            #expect(try Spawner.wait(firstKeeper.process) == .exited(137))
            firstKeeper.log.close()
        }
    }
}
