import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The guest image under QEMU (TCG here; this machine has no usable KVM): the static
/// agent as PID 1, its channel a virtio-serial port, the host's share on 9p. One guest
/// boots for the whole suite (a TCG boot takes seconds); every check drives it over the
/// channel as the VM kind's host side will.
extension AllTests {
@Suite(.serialized) struct GuestVMTests {
    static let task = "containerd.task.v3.Task"
    static let agent = "kuasar.agent.v1.Agent"
    /// `make guest` builds it here (and `make test` first, when it is missing).
    static var imageDir: String { "\(repositoryRoot)/.build/guest" }

    /// A microVM with the guest image: the command line ../shared/MACHINE.md measured
    /// fastest here, a virtio-serial port named `agent`, a 9p share tagged `kuasar`.
    final class GuestVM: AgentPeer {
        let dir: String
        let share: String
        let channel: String
        var process: SpawnedProcess?
        let pid: pid_t
        private(set) var client: OneShotClient?

        static func arguments(image: String, console: String, channel: String, share: String, extraAppend: String = "") -> [String] {
            // The guest kernel's command line is the QEMU driver's own.
            let spec = VMSpec(id: "test", stateDir: "/", kernel: "", initrd: "", memoryMiB: 256, vcpus: 2, accelerator: .tcg, sharePath: share)
            let append = QEMU.kernelCommandLine(spec) + extraAppend
            return ["qemu-system-x86_64", "-M", "microvm,pic=off,pit=off", "-accel", "tcg", "-cpu", "qemu64,+rdrand", "-m", "256", "-smp", "2",
                    "-nographic", "-no-reboot", "-nodefaults", "-serial", "file:" + console,
                    "-kernel", image + "/vmlinux", "-initrd", image + "/initrd.lz4", "-append", append,
                    "-chardev", "socket,id=ch0,path=\(channel),server=on,wait=off",
                    "-device", "virtio-serial-device", "-device", "virtserialport,chardev=ch0,name=agent",
                    "-fsdev", "local,id=fs0,path=\(share),security_model=passthrough",
                    "-device", "virtio-9p-device,fsdev=fs0,mount_tag=kuasar",
                    // A NIC (user-mode networking: nothing on the host changes).
                    "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"]
        }

        init(_ name: String, image: String = GuestVMTests.imageDir, append: String = "", extraDevices: [String] = []) throws {
            dir = try scratchDirectory("vm-\(name)")
            share = dir + "/share"
            channel = dir + "/agent.sock"
            try makeDirectories(share, mode: 0o755)
            // KUASAR_GUEST_LOG=debug: the agent's debug log on the guest's console.
            let level = currentEnvironmentDictionary()["KUASAR_GUEST_LOG"].map { " kuasar.log=" + $0 } ?? ""
            let args = Self.arguments(image: image, console: dir + "/console.log", channel: channel, share: share, extraAppend: level + append) + extraDevices
            let null = open("/dev/null", O_RDWR | O_CLOEXEC)
            defer { close(null) }
            let log = open(dir + "/qemu.log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            defer { close(log) }
            let p = try Spawner.spawn(ProcessSpec(executable: "/usr/bin/qemu-system-x86_64", arguments: args, fdMap: [(null, 0), (log, 1), (log, 2)]))
            pid = p.pid
            process = consume p
        }

        var console: String { (try? Files.readString(dir + "/console.log")) ?? "" }

        /// Connects to the channel and calls Check until the agent answers (data sent
        /// while the guest has its port closed is dropped: each try is a new call).
        func waitReady(timeoutS: Int = 90) throws -> Kuasar_Agent_V1_CheckResponse {
            let deadline = MonotonicClock.nanoseconds() + UInt64(timeoutS) * 1_000_000_000
            while MonotonicClock.nanoseconds() < deadline {
                if client == nil { client = try? OneShotClient(path: channel) }
                if let c = client {
                    if let r = try? c.call(GuestVMTests.agent, "Check", Kuasar_Agent_V1_CheckRequest(), as: Kuasar_Agent_V1_CheckResponse.self, timeoutNS: 500_000_000) {
                        return r
                    }
                } else {
                    usleep(20_000)
                }
                guard !processGone(pid) else { break }
            }
            throw RPCError(.deadlineExceeded, "the guest's agent did not answer; console: \(console.suffix(2000))")
        }

        func call<Resp: SwiftProtobuf.Message>(_ service: String, _ m: String, _ r: some SwiftProtobuf.Message, _: Resp.Type) throws -> Resp {
            try client!.call(service, m, r, as: Resp.self, timeoutNS: 60_000_000_000, namespace: "k8s.io")
        }

        /// A busybox bundle in the share; its path as the guest sees it.
        func bundle(_ name: String, _ args: [String], terminal: Bool = false, sharePid: Bool = false) throws -> String {
            let b = try TestBundle("vm-" + name)
            try b.setProcess(args: args, terminal: terminal)
            try b.editSpec { spec in
                var linux = spec["linux"] as! [String: Any]
                // The guest is the pod: no network namespace of its own (it has no other
                // interfaces either); with sharePid its orphans are PID 1's to reap.
                linux["namespaces"] = (linux["namespaces"] as! [[String: Any]]).filter { ns in
                    let t = ns["type"] as! String
                    return t != "network" && !(sharePid && t == "pid")
                }
                spec["linux"] = linux
            }
            try RuntimeTests.run("/bin/mv", b.path, share + "/" + name)
            return GuestInit.sharePath + "/" + name
        }

        func stop() throws {
            client?.close()
            client = nil
            if let p = process.take() {
                try? sendSignal(pidfd: p.pidfd.rawValue, SIGKILL)
                _ = try Spawner.wait(p)
            }
            for name in Files.list(share) { Mounts.unmountAll(under: share + "/" + name) }
            // The guest's console outlives the test, for a failure's post-mortem.
            try? Files.write("\(repositoryRoot)/.build/guest-test-console.log", console, create: true)
            Files.removeTree(dir)
        }
    }

    @Test func theAgentAsPID1RunsContainersOverVirtioSerial() throws {
        #expect(Files.exists(Self.imageDir + "/vmlinux") && Files.exists(Self.imageDir + "/initrd.lz4"), "no guest image in \(Self.imageDir): make guest builds it")
        let vm = try GuestVM("agent")
        defer { try? vm.stop() }
        let check = try vm.waitReady()
        #expect(check.pid == 1 && check.version == KuasarVersion.string, "\(check)")
        #expect(check.kernel.hasSuffix("-amd64") && check.channels == ["serial://agent"])
        for step in ["kernel", "runtime", "mounts", "modules", "init"] { #expect(check.bootMs[step] != nil, "boot breakdown has \(step): \(check.bootMs)") }
        // The kernel's part of the init ran on the constructor's boot thread: the channel's
        // modules, cgroup2 and loopback, each taking time there, none left to do after it.
        for step in ["bootThread", "modules", "cgroups", "lo"] { #expect((check.bootMs[step] ?? 0) > 0, "the boot thread did \(step): \(check.bootMs)") }

        // Identity and clock: PID 1 may set the guest's own.
        var setup = Kuasar_Agent_V1_SetupSandboxRequest()
        setup.sandboxID = "vm-pod"
        setup.hostname = "vm-pod"
        setup.sysctls = ["kernel.pid_max": "65536"]
        var eth0 = Kuasar_Agent_V1_Interface()
        eth0.name = "eth0"
        eth0.addresses = ["10.0.2.15/24"]
        eth0.mtu = 1400
        var route = Kuasar_Agent_V1_Route()
        route.destination = "default"
        route.gateway = "10.0.2.2"
        setup.interfaces = [eth0]
        setup.routes = [route]
        _ = try vm.call(Self.agent, "SetupSandbox", setup, Google_Protobuf_Empty.self)
        var badAddress = Kuasar_Agent_V1_SetupSandboxRequest()
        var v6 = Kuasar_Agent_V1_Interface()
        v6.name = "eth0"
        v6.addresses = ["fd00::zz/64"]
        badAddress.interfaces = [v6]
        do {
            _ = try vm.call(Self.agent, "SetupSandbox", badAddress, Google_Protobuf_Empty.self)
            Issue.record("a malformed IPv6 address was taken")
        } catch let e as RPCError { #expect(e.code == .invalidArgument && e.message.contains("\"fd00::zz/64\" is not an IPv6 address"), "\(e)") }
        v6.addresses = ["fd00::2/129"]
        badAddress.interfaces = [v6]
        do {
            _ = try vm.call(Self.agent, "SetupSandbox", badAddress, Google_Protobuf_Empty.self)
            Issue.record("an IPv6 prefix of 129 was taken")
        } catch let e as RPCError { #expect(e.code == .invalidArgument, "\(e)") }
        var clock = Kuasar_Agent_V1_SyncClockRequest()
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        clock.hostUnixNs = Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec)
        _ = try vm.call(Self.agent, "SyncClock", clock, Kuasar_Agent_V1_SyncClockResponse.self)

        // A container from a bundle in the share: output, its real exit status.
        let hello = try vm.bundle("hello", ["sh", "-c", "echo hello from $(cat /etc/hostname) pid_max=$(cat /proc/sys/kernel/pid_max); date +%s; exit 7"])
        _ = try vm.run("hello", bundle: hello)
        let out = String(decoding: try vm.readAll("hello"), as: UTF8.self)
        #expect(out.hasPrefix("hello from vm-pod pid_max=65536\n"), "\(out)")
        if let guestTime = out.split(separator: "\n").dropFirst().first.flatMap({ Int($0) }) {
            #expect(abs(guestTime - Int(now.tv_sec)) <= 5, "guest clock \(guestTime) vs host \(now.tv_sec)")
        } else { Issue.record("no date in \(out)") }
        #expect(try vm.wait("hello") == 7)
        try vm.delete("hello")
        // The share came after the first answer; the breakdown has it now.
        let later = try vm.call(Self.agent, "Check", Kuasar_Agent_V1_CheckRequest(), Kuasar_Agent_V1_CheckResponse.self)
        for step in ["shareModules", "share"] { #expect(later.bootMs[step] != nil, "boot breakdown has \(step): \(later.bootMs)") }

        // The pod's network as SetupSandbox made it, and loopback up, seen by a container.
        let net = try vm.bundle("net", ["sh", "-c", "ip -4 addr show eth0; ip route; ip link show lo; ip link show eth0"])
        _ = try vm.run("net", bundle: net)
        let netOut = String(decoding: try vm.readAll("net"), as: UTF8.self)
        #expect(netOut.contains("inet 10.0.2.15/24") && netOut.contains("default via 10.0.2.2 dev eth0") && netOut.contains("mtu 1400"), "\(netOut)")
        #expect(netOut.contains("lo: <LOOPBACK,UP"), "\(netOut)")
        #expect(try vm.wait("net") == 0)
        try vm.delete("net")

        // 10 MiB quickly, complete and in order.
        let bulk = try vm.bundle("bulk", ["seq", "1", "1400000"])
        _ = try vm.run("bulk", bundle: bulk)
        let got = try vm.readAll("bulk")
        #expect(try vm.wait("bulk") == 0)
        let expected = Array(((1...1_400_000).map(String.init).joined(separator: "\n") + "\n").utf8)
        #expect(got.count == expected.count && got == expected, "\(got.count) bytes of \(expected.count)")
        try vm.delete("bulk")

        // stdin to EOF, and a terminal.
        let cat = try vm.bundle("cat", ["sh", "-c", "wc -c"])
        _ = try vm.run("cat", bundle: cat, stdin: true)
        var w = Kuasar_Agent_V1_WriteStdinRequest()
        w.containerID = "cat"
        w.data = Data(repeating: 0x61, count: 300_000)
        _ = try vm.call(Self.agent, "WriteStdin", w, Kuasar_Agent_V1_WriteStdinResponse.self)
        var closeIn = Kuasar_Agent_V1_CloseStdinRequest()
        closeIn.containerID = "cat"
        _ = try vm.call(Self.agent, "CloseStdin", closeIn, Google_Protobuf_Empty.self)
        #expect(String(decoding: try vm.readAll("cat"), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) == "300000")
        #expect(try vm.wait("cat") == 0)
        try vm.delete("cat")
        let tty = try vm.bundle("tty", ["sh", "-c", "tty; echo tty-ok"], terminal: true)
        _ = try vm.run("tty", bundle: tty, terminal: true)
        let ttyOut = String(decoding: try vm.readAll("tty"), as: UTF8.self)
        #expect(ttyOut.contains("/dev/pts/") && ttyOut.contains("tty-ok"), "\(ttyOut)")
        #expect(try vm.wait("tty") == 0)
        try vm.delete("tty")

        // Exec into a running container, then Kill and Wait for the real status.
        let long = try vm.bundle("long", ["sleep", "300"])
        _ = try vm.run("long", bundle: long)
        try vm.exec("long", "e1", ["sh", "-c", "echo exec in the guest; exit 4"])
        #expect(String(decoding: try vm.readAll("long", exec: "e1"), as: UTF8.self) == "exec in the guest\n")
        #expect(try vm.wait("long", exec: "e1") == 4)
        try vm.delete("long", exec: "e1")
        try vm.kill("long")
        #expect(try vm.wait("long") == 137)
        try vm.delete("long")

        // 100 orphans in the guest's own pid namespace: PID 1 reaps them all and serves on.
        let orphans = try vm.bundle("orphans", ["sh", "-c", "for i in $(seq 100); do (sleep 0.2 &) ; done; echo forked"], sharePid: true)
        _ = try vm.run("orphans", bundle: orphans)
        #expect(String(decoding: try vm.readAll("orphans"), as: UTF8.self) == "forked\n")
        #expect(try vm.wait("orphans") == 0)
        try vm.delete("orphans")
        usleep(1_500_000)
        let ps = try vm.bundle("ps", ["sh", "-c", "ps -o stat,comm | grep -c '^Z' || true"], sharePid: true)
        _ = try vm.run("ps", bundle: ps)
        #expect(String(decoding: try vm.readAll("ps"), as: UTF8.self) == "0\n", "zombies left in the guest")
        #expect(try vm.wait("ps") == 0)
        try vm.delete("ps")

        // Bad input over the channel: a bundle outside the share, an unknown container;
        // then garbage on the channel itself: the agent opens its port again and serves.
        var create = Containerd_Task_V3_CreateTaskRequest()
        create.id = "escape"
        create.bundle = "/etc"
        do {
            _ = try vm.task("Create", create, Containerd_Task_V3_CreateTaskResponse.self)
            Issue.record("a bundle outside the share was accepted")
        } catch let e as RPCError { #expect(e.code == .permissionDenied && e.message.contains("outside the host's share"), "\(e)") }
        var state = Containerd_Task_V3_StateRequest()
        state.id = "ghost"
        do {
            _ = try vm.task("State", state, Containerd_Task_V3_StateResponse.self)
            Issue.record("an unknown container answered")
        } catch let e as RPCError { #expect(e.code == .notFound, "\(e)") }
        vm.client?.close()
        let raw = try Socket.connectUnix(path: vm.channel, blocking: true)
        var huge: [UInt8] = []
        TTRPC.appendHeader(to: &huge, length: 0, streamID: 9, type: .request, flags: [])
        huge[0] = 0x7F
        _ = writeRaw(raw.rawValue, [UInt8](repeating: 0xEE, count: 100) + huge + [UInt8](repeating: 0, count: 64))
        usleep(200_000)
        raw.close()
        let again = try GuestVMTests.reconnect(vm)
        #expect(again.pid == 1 && again.uptimeNs > check.uptimeNs, "the same agent serves on: \(again)")
        #expect(!vm.console.contains("Kernel panic") && !vm.console.contains("Fatal error"), "\(vm.console.suffix(2000))")
        // PID 1's boot lines, formatted and logged after its first answer.
        #expect(vm.console.contains("init: kernel 6.") && vm.console.contains("kuasar agent \(KuasarVersion.string) serving serial://agent")
                && vm.console.contains("channel serial://agent is /dev/vport"), "\(vm.console.suffix(2000))")
    }

    /// kuasar.debug=1 with the debug image: a shell on the port named `debug`.
    @Test func theDebugImageGivesAShellOnASecondPort() throws {
        let image = Self.imageDir + "-debug"
        #expect(Files.exists(image + "/initrd.lz4"), "make guest builds the debug image in \(image)")
        let debugSocket = "/tmp/kuasar-vm-debug-\(getpid()).sock"
        unlink(debugSocket)
        defer { unlink(debugSocket) }
        let vm = try GuestVM("debug", image: image, append: " kuasar.debug=1",
                             extraDevices: ["-chardev", "socket,id=dbg,path=\(debugSocket),server=on,wait=off", "-device", "virtserialport,chardev=dbg,name=debug"])
        defer { try? vm.stop() }
        // The share comes after the agent's first answer: a Create sent right after it
        // still finds its bundle (the agent mounts the share before it looks).
        let early = try vm.bundle("early", ["sh", "-c", "echo early"])
        let first = try vm.waitReady()
        #expect(first.bootMs["share"] == nil, "the share was mounted before the first answer: \(first.bootMs)")
        _ = try vm.run("early", bundle: early)
        #expect(String(decoding: try vm.readAll("early"), as: UTF8.self) == "early\n")
        #expect(try vm.wait("early") == 0)
        try vm.delete("early")
        let fd = try Socket.connectUnix(path: debugSocket, blocking: true).take()
        defer { close(fd) }
        var tv = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var seen = ""
        let deadline = MonotonicClock.nanoseconds() + 30_000_000_000
        while !seen.contains("debug-42"), MonotonicClock.nanoseconds() < deadline {
            // Sent again until the shell (started once a host is on the port) answers.
            _ = writeRaw(fd, Array("echo debug-$((6*7)) $$\n".utf8))
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = read(fd, &buf, buf.count)
            if n > 0 { seen += String(decoding: buf[..<n], as: UTF8.self) }
        }
        #expect(seen.contains("debug-42"), "debug shell: \(seen.suffix(500)); console: \(vm.console.suffix(1000))")
    }

    /// The same agent and kernel package give the same bytes, built twice.
    @Test func theImageBuildIsReproducible() throws {
        let agent = Self.imageDir + "/kuasar-agent"
        #expect(Files.exists(agent), "make guest leaves the stripped agent at \(agent)")
        let out = try scratchDirectory("guest-repro")
        defer { Files.removeTree(out) }
        var digests: [String] = []
        for n in 1...2 {
            let (code, text) = try shell("python3 \(repositoryRoot)/guest/build.py --agent \(agent) --out \(out)/\(n) --cache \(repositoryRoot)/.build/guest-cache", timeoutS: 300)
            #expect(code == 0, "\(text)")
            digests.append(try shell("sha256sum \(out)/\(n)/vmlinux \(out)/\(n)/initrd.lz4 | cut -d' ' -f1").out)
        }
        #expect(digests[0] == digests[1] && digests[0].count > 64, "\(digests)")
        // And the same as the image the VM test booted (make guest, from the same agent).
        let booted = try shell("sha256sum \(Self.imageDir)/vmlinux \(Self.imageDir)/initrd.lz4 | cut -d' ' -f1").out
        #expect(booted == digests[0])
        let manifest = try Files.readString(out + "/1/manifest.json")
        #expect(manifest.contains("\"virtio_console\"") && manifest.contains("\"9pnet_virtio\"") && manifest.contains("\"vmw_vsock_virtio_transport\""), "\(manifest)")
    }

    static func reconnect(_ vm: GuestVM) throws -> Kuasar_Agent_V1_CheckResponse {
        try vm.reconnectAndCheck()
    }
}
}

extension AllTests.GuestVMTests.GuestVM {
    func reconnectAndCheck() throws -> Kuasar_Agent_V1_CheckResponse {
        client?.close()
        client = nil
        return try waitReady(timeoutS: 30)
    }
}
