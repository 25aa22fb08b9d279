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
    /// its code, and leaves no QEMU and no mount behind. Booted, and cloned from a template
    /// `kuasar vm template build` made beforehand.
    @Test(arguments: [false, true]) func containerdRunsVMContainersThroughTheShimPath(cloned: Bool) throws {
        if cloned {
            try AllTests.VMTemplateTests.withTemplateDir("ctd") { try shimPath(templates: $0) }
        } else {
            try shimPath(templates: nil)
        }
    }

    func shimPath(templates: String?) throws {
        let scratch = try scratchDirectory("vm-ctd")
        defer { Files.removeTree(scratch) }
        try Files.write(scratch + "/config.toml", "[daemon]\non_exit = \"stop\"\n" + Self.config(templates: templates), create: true)
        if let templates {
            let r = try shell("\(AllTests.DaemonTests.binary) vm template build --config \(scratch)/config.toml")
            #expect(r.code == 0 && r.out.contains("template ") && r.out.contains("256 MiB, 1 vCPU, tcg"), "\(r.out)")
            let list = try shell("\(AllTests.DaemonTests.binary) vm template list --config \(scratch)/config.toml")
            #expect(list.out.contains("256 MiB, 1 vCPU, 1 NIC slot(s)") && AllTests.VMTemplateTests.installed(templates).count == 1, "\(list.out)")
        }
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
        if templates != nil {
            let cmd = Self.qemuProcesses(mentioning: ctd.kuasarRoot).map { String(decoding: ((try? Files.read("/proc/\($0)/cmdline")) ?? []).map { $0 == 0 ? 32 : $0 }, as: UTF8.self) }
            #expect(cmd.first?.contains("-incoming defer") == true && cmd.first?.contains("share=off") == true, "the first container's VM is a clone: \(cmd)")
        }
        r = try ctd.ctr("task kill -s SIGKILL vmc2")
        #expect(r.code == 0, "\(r.out)")
        #expect(waitUntil { ((try? ctd.ctr("task ls"))?.out ?? "").contains("STOPPED") }, "vmc2 did not stop")
        r = try ctd.ctr("task delete vmc2")
        #expect(r.code == 0 && r.out.contains("137"), "\(r.out)")
        _ = try ctd.ctr("container delete vmc2")
        #expect(waitUntil(timeoutMS: 10_000) { Self.qemuProcesses(mentioning: ctd.kuasarRoot).isEmpty })
        #expect(mountsUnder(ctd.kuasarRoot).isEmpty, "\(mountsUnder(ctd.kuasarRoot))")
    }

    /// containerd's devmapper snapshotter gives a container its rootfs as one ext4 on a
    /// block device (here a loop device over an image). On q35 the daemon hot-plugs it into
    /// the VM (QMP blockdev-add + device_add; the agent finds it by serial and mounts it),
    /// and unplugs it at Delete before answering; a microvm cannot hot-plug, so there the
    /// daemon mounts it on the host and shares it. Both write to the same filesystem.
    @Test func aBlockDeviceRootfsIsHotPluggedOnQ35AndSharedOnAMicroVM() throws {
        let scratch = try scratchDirectory("vm-block")
        defer { Files.removeTree(scratch) }
        let b = try TestBundle("vm-block-rootfs")
        defer { b.remove() }
        try Files.write(b.rootfs + "/marker", "from the block device\n", create: true)
        var (code, out) = try shell("mkfs.ext4 -q -F -d \(b.rootfs) \(scratch)/root.img 64M >/dev/null && losetup --find --show \(scratch)/root.img")
        #expect(code == 0, "\(out)")
        let loop = String(out.split(separator: "\n").last ?? "")
        #expect(loop.hasPrefix("/dev/loop"), "\(out)")
        guard code == 0, loop.hasPrefix("/dev/loop") else { return }
        defer { _ = try? shell("losetup -d \(loop)") }
        // q35 also as a clone: a disk hot-plugged into a restored VM.
        for (machine, cloned) in [("q35", false), ("q35", true), ("microvm", false)] {
            let templates = cloned ? "/dev/shm/kuasar-test-blk-\(getpid())" : nil
            defer { if let templates { Files.removeTree(templates) } }
            try AllTests.PodTests.Node.with("vm-blk-\(machine)", config: Self.config(machine: machine, templates: templates)) { node in
                if let templates {
                    #expect(waitUntil(timeoutMS: 120_000, everyMS: 100) { AllTests.VMTemplateTests.installed(templates).count == 1 }, "no q35 template built")
                }
                let (pid, address) = try node.runPod("blk", AllTests.PodTests.podConfig(hostname: "blk"), sandboxer: "kuasar-vm")
                let t = try OneShotClient(path: address)
                defer { t.close() }
                let bundle = try node.bundle("c", pid: pid, args: ["sh", "-c", "cat /marker; grep ' / ' /proc/mounts | cut -d' ' -f1,3; echo \(machine) > /written-by-\(machine)"])
                let io = try FIFOs(bundle, ["stdout"])
                defer { io.close() }
                var m = Containerd_Types_Mount()
                m.type = "ext4"
                m.source = loop
                m.options = ["rw"]
                _ = try Self.create(t, "c", bundle: bundle, io, rootfs: [m])
                _ = try Self.start(t, "c")
                #expect(try Self.wait(t, "c") == 0)
                let text = io.read("stdout")
                #expect(text.hasPrefix("from the block device\n"), "\(machine): \(text)")
                if cloned {
                    #expect(try AllTests.VMTemplateTests.status(node, "blk").contains("\"started_from\":\"template "))
                }
                if machine == "q35" {
                    #expect(text.contains("/dev/vda ext4"), "the guest mounted the hot-plugged disk: \(text)")
                } else {
                    #expect(text.contains(" 9p"), "the host mounted it and shared it: \(text)")
                }
                try Self.delete(t, "c")
                // Unplugged before Delete answered: QEMU holds the device no more.
                let held = (try? shell("ls -l /proc/\(pid)/fd"))?.out.contains(loop) ?? false
                #expect(!held, "\(machine): QEMU still holds \(loop) after Delete")
                #expect(mountsUnder(node.root + "/blk/share/c").isEmpty, "\(mountsUnder(node.root))")
                try AllTests.TaskServerTests.shutdown(node, "blk", "kuasar-vm")
                #expect(mountsUnder(node.root).isEmpty, "\(mountsUnder(node.root))")
            }
        }
        (code, out) = try shell("debugfs -R 'cat /written-by-q35' \(scratch)/root.img 2>/dev/null; debugfs -R 'cat /written-by-microvm' \(scratch)/root.img 2>/dev/null")
        #expect(out == "q35\nmicrovm\n", "what the containers wrote is on the filesystem: \(out)")
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
            try? AllTests.TaskServerTests.shutdown(node, "na", "kuasar-vm")
        }

        // The daemon is killed while a VM boots (its Start unanswered): the next daemon
        // kills that QEMU instead of leaving it to run unserved, and Start says what to do.
        try AllTests.PodTests.Node.with("vm-midboot", config: Self.config(initrd: scratch + "/initrd-baseline.lz4", bootTimeout: 60), keep: true) { node in
            try node.createPod("mb", AllTests.PodTests.podConfig(hostname: "mb"), sandboxer: "kuasar-vm")
            let socket = node.socket
            let starter = Thread {
                // Its own connection: the answer never comes, the daemon dies first.
                guard let c = try? GRPCClient(path: socket) else { return }
                var start = Containerd_Services_Sandbox_V1_ControllerStartRequest()
                start.sandboxID = "mb"
                start.sandboxer = "kuasar-vm"
                _ = try? c.call(AllTests.PodTests.controller, "Start", start, as: Containerd_Services_Sandbox_V1_ControllerStartResponse.self,
                                metadata: [("containerd-namespace", "k8s.io")])
            }
            starter.start()
            // Recorded as soon as QEMU is spawned, before its QMP answers.
            #expect(waitUntil(timeoutMS: 20_000) { ((try? Files.readString(node.root + "/mb/state.json")) ?? "").contains("vmm_pid") }, "the VM boots")
            let booting = Self.qemuProcesses(mentioning: node.root)
            let firstKeeper = try node.killAndRestart {}
            #expect(waitUntil(timeoutMS: 10_000) { booting.allSatisfy { processGone($0) } }, "the half-started VM is killed by the next daemon")
            var start = Containerd_Services_Sandbox_V1_ControllerStartRequest()
            start.sandboxID = "mb"
            start.sandboxer = "kuasar-vm"
            do {
                _ = try node.call("Start", start, Containerd_Services_Sandbox_V1_ControllerStartResponse.self)
                Issue.record("a pod whose VM was killed started without one")
            } catch let e as RPCError { #expect(e.code == .failedPrecondition && e.message.contains("created again"), "\(e)") }
            try AllTests.TaskServerTests.shutdown(node, "mb", "kuasar-vm")
            #expect(try Spawner.wait(firstKeeper.process) == .exited(137))
            firstKeeper.log.close()
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
            let io2 = try Self.run(t, node, "p2", pid: pid, ["sh", "-c", "echo c > /proc/sysrq-trigger"])
            defer { io2.close() }
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

extension AllTests.VMSandboxTests {
    /// What CNI leaves for a pod, made by the test in its own namespaces: a netns with a
    /// veth `eth0` (10.211.x.2/24 and fd00:211:x::2/64, default routes via .1 and ::1),
    /// whose peer sits in a second netns (.1, ::1). The VM's container has the veth's address, MAC and route on its NIC, reaches
    /// the peer (ping, and a TCP exchange with a server in the peer's netns), and after
    /// Shutdown the netns holds no tap and no tc redirect. Booted, and cloned from a
    /// template (its NIC wakes with the template's MAC and takes the veth's).
    @Test(arguments: [false, true]) func aVMPodJoinsTheNetworkCNIMadeAndReachesItsPeer(cloned: Bool) throws {
        if cloned {
            try AllTests.VMTemplateTests.withTemplateDir("net") { try joinsTheNetwork(templates: $0) }
        } else {
            try joinsTheNetwork(templates: nil)
        }
    }

    func joinsTheNetwork(templates: String?) throws {
        let tag = "kq\(getpid() % 100_000)"
        let (podNS, peerNS) = (tag + "p", tag + "q")
        let subnet = "10.211.\(getpid() % 250)"
        let subnet6 = "fd00:211:\(String(getpid() % 65_000, radix: 16))"
        defer { _ = try? shell("ip netns del \(podNS); ip netns del \(peerNS)") }
        var r = try shell("""
            set -e
            ip netns add \(podNS); ip netns add \(peerNS)
            ip link add eth0 netns \(podNS) type veth peer name eth0 netns \(peerNS)
            ip -n \(podNS) link set lo up; ip -n \(podNS) link set eth0 up
            ip -n \(podNS) addr add \(subnet).2/24 dev eth0; ip -n \(podNS) route add default via \(subnet).1
            ip -n \(peerNS) link set eth0 up; ip -n \(peerNS) addr add \(subnet).1/24 dev eth0
            ip -n \(podNS) -6 addr add \(subnet6)::2/64 dev eth0 nodad; ip -n \(peerNS) -6 addr add \(subnet6)::1/64 dev eth0 nodad
            ip -n \(podNS) -6 route add default via \(subnet6)::1
            """)
        #expect(r.code == 0, "\(r.out)")
        let vethMAC = try shell("ip netns exec \(podNS) cat /sys/class/net/eth0/address").out.trimmingWhitespace
        // The peer answers one TCP connection with a line (busybox nc in the peer's netns).
        let server = try Spawner.spawn(ProcessSpec(executable: "/usr/bin/timeout", arguments: ["timeout", "120", "ip", "netns", "exec", peerNS, "/bin/busybox", "sh", "-c", "echo hello-from-the-peer | /bin/busybox nc -l -p 7777"]))
        try AllTests.PodTests.Node.with("vm-net", config: Self.config(templates: templates)) { node in
            if let templates {
                #expect(waitUntil(timeoutMS: 120_000, everyMS: 100) { AllTests.VMTemplateTests.installed(templates).count == 1 }, "no template built")
            }
            let (pid, address) = try node.runPod("vn", AllTests.PodTests.podConfig(hostname: "vn"), sandboxer: "kuasar-vm", netns: "/run/netns/" + podNS)
            if let templates {
                let info = try AllTests.VMTemplateTests.status(node, "vn")
                #expect(info.contains("\"started_from\":\"template \(AllTests.VMTemplateTests.installed(templates).first ?? "?")\""), "\(info)")
            }
            r = try shell("ip -n \(podNS) -o link show; tc -n \(podNS) filter show dev eth0 ingress")
            #expect(r.out.contains("tap0_kuasar") && r.out.contains("mirred"), "the tap and its redirect are in the pod's netns: \(r.out)")
            let t = try OneShotClient(path: address)
            defer { t.close() }
            let io = try Self.run(t, node, "n1", pid: pid, ["sh", "-c",
                "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0; ip route; ping -c 2 -W 5 \(subnet).1 >/dev/null && echo ping-ok; ip -6 -o addr show eth0 scope global; ip -6 route show default; ping6 -c 2 -W 5 \(subnet6)::1 >/dev/null && echo ping6-ok; nc \(subnet).1 7777 </dev/null"],
                streams: ["stdout", "stderr"])
            defer { io.close() }
            #expect(try Self.wait(t, "n1") == 0, "stderr: \(io.read("stderr"))")
            let out = io.read("stdout")
            #expect(out.hasPrefix(vethMAC + "\n"), "the NIC has the veth's MAC \(vethMAC): \(out)")
            #expect(out.contains("inet \(subnet).2/24") && out.contains("default via \(subnet).1 dev eth0"), "\(out)")
            #expect(out.contains("ping-ok") && out.contains("hello-from-the-peer"), "\(out)")
            #expect(out.contains("inet6 \(subnet6)::2/64") && out.contains("default via \(subnet6)::1 dev eth0") && out.contains("ping6-ok"), "IPv6 too: \(out)")
            try Self.delete(t, "n1")
            try AllTests.TaskServerTests.shutdown(node, "vn", "kuasar-vm")
            #expect(waitUntil(timeoutMS: 10_000) { processGone(pid) })
            r = try shell("ip -n \(podNS) -o link show; tc -n \(podNS) qdisc show dev eth0")
            #expect(!r.out.contains("tap0_kuasar") && !r.out.contains("ingress"), "no tap and no redirect left: \(r.out)")
        }
        kill(server.pid, SIGKILL)
        _ = try? Spawner.wait(server)
    }
}
