import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
import CAgentInit
#endif

/// The guest agent's services on a host: `kuasar agent --listen unix://…` is the same
/// program a VM runs as PID 1, serving the Task API and the Agent service (stdio streams,
/// events, sandbox setup) on one ttrpc channel. Driven through its socket as the host
/// side of the VM kind drives it through virtio-serial.
extension AllTests {
@Suite(.serialized) struct AgentTests {
    static let task = "containerd.task.v3.Task"
    static let agent = "kuasar.agent.v1.Agent"

    /// A running `kuasar agent`; `stop` checks it exits 0 and left nothing behind.
    final class AgentProcess: AgentPeer {
        let dir: String
        let socket: String
        let cgroupParent: String
        var process: SpawnedProcess?
        let pid: pid_t
        let log: Int32
        let client: OneShotClient

        init(_ name: String, bundleRoot: String? = nil, extra: [String] = []) throws {
            dir = try scratchDirectory("agent-\(name)")
            socket = dir + "/agent.sock"
            cgroupParent = "kuasar-agent-test-\(getpid())-\(name)"
            let logPath = dir + "/agent.log"
            log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            var args = ["kuasar", "agent", "--listen", "unix://" + socket, "--root", dir + "/root", "--cgroup-parent", cgroupParent, "--sandbox-id", "pod-\(name)"]
            if let bundleRoot { args += ["--bundle-root", bundleRoot] }
            var spec = ProcessSpec(executable: AllTests.DaemonTests.binary, arguments: args + extra)
            spec.fdMap = [(from: log, to: 2)]
            let p = try Spawner.spawn(spec)
            pid = p.pid
            let path = socket
            #expect(waitUntil(timeoutMS: 10_000) { access(path, F_OK) == 0 }, "agent socket \(path)")
            do {
                client = try OneShotClient(path: path)
            } catch {
                // No agent to talk to: stop the one started, leaving nothing behind.
                try? sendSignal(pidfd: p.pidfd.rawValue, SIGKILL)
                _ = try? Spawner.wait(p)
                _ = close(log)
                throw error
            }
            process = consume p
        }

        var logText: String { (try? Files.readString(dir + "/agent.log")) ?? "" }

        func call<Resp: SwiftProtobuf.Message>(_ service: String, _ m: String, _ r: some SwiftProtobuf.Message, _: Resp.Type) throws -> Resp {
            try client.call(service, m, r, as: Resp.self, namespace: "k8s.io")
        }

        func expectFailure(_ service: String, _ m: String, _ r: some SwiftProtobuf.Message, code: RPCCode, _ text: String,
                           sourceLocation: SourceLocation = #_sourceLocation) {
            do {
                _ = try client.call(service, m, r, as: Google_Protobuf_Empty.self, namespace: "k8s.io")
                Issue.record("\(m) succeeded; expected \(code)", sourceLocation: sourceLocation)
            } catch let e as RPCError {
                #expect(e.code == code && e.message.contains(text), "\(m): \(e)", sourceLocation: sourceLocation)
            } catch {
                Issue.record("\(m): \(error)", sourceLocation: sourceLocation)
            }
        }

        func stop() throws {
            client.close()
            guard let p = process.take() else { return }
            try sendSignal(pidfd: p.pidfd.rawValue, SIGTERM)
            let status = try Spawner.wait(p)
            #expect(status.code == 0, "agent exit \(status): \(logText)")
            _ = close(log)
            #expect(mountsUnder(dir).isEmpty, "\(mountsUnder(dir))")
            #expect(!Files.exists(dir + "/agent.sock"), "the agent removes its socket")
            for h in ["memory", "pids", "freezer", "cpu,cpuacct"] {
                #expect(!Files.exists(CgroupTestPaths.ownV1(h) + "/" + cgroupParent), "cgroup \(h)/\(cgroupParent) left behind")
            }
            Files.removeTree(dir)
        }
    }

    @Test func containersOverTheAgentChannelWithStreamsAndEvents() throws {
        let bundle = try TestBundle("agent-life")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["sh", "-c", "echo to-out; echo to-err >&2; cat /etc/hostname; exit 3"])
        let a = try AgentProcess("life", bundleRoot: "/tmp/kuasar-test-bundles")
        defer { try? a.stop() }

        let check = try a.call(Self.agent, "Check", Kuasar_Agent_V1_CheckRequest(), Kuasar_Agent_V1_CheckResponse.self)
        #expect(check.version == KuasarVersion.string && check.pid == UInt32(a.pid) && check.sandboxID == "pod-life")
        #expect(check.channels == ["unix://" + a.socket])

        // The pod's identity: its files (bound into each container), not this host's.
        var setup = Kuasar_Agent_V1_SetupSandboxRequest()
        setup.sandboxID = "pod-life"
        setup.hostname = "agent-pod"
        setup.dnsServers = ["10.0.0.53"]
        setup.dnsSearches = ["svc.cluster.local"]
        _ = try a.call(Self.agent, "SetupSandbox", setup, Google_Protobuf_Empty.self)
        let podDir = a.dir + "/root/sandboxes/pod-life"
        #expect((try? Files.readString(podDir + "/hostname")) == "agent-pod\n")
        #expect(((try? Files.readString(podDir + "/resolv.conf")) ?? "").contains("nameserver 10.0.0.53"))

        let pid = try a.run("c1", bundle: bundle.path)
        #expect(pid > 0)
        #expect(String(decoding: try a.readAll("c1"), as: UTF8.self) == "to-out\nagent-pod\n")
        #expect(String(decoding: try a.readAll("c1", .stderr), as: UTF8.self) == "to-err\n")
        #expect(try a.wait("c1") == 3)

        // Events in order, each once, acknowledged by the next call's `after`.
        var next = Kuasar_Agent_V1_NextEventsRequest()
        var topics: [String] = []
        var exitStatus: UInt32?
        while !topics.contains("/tasks/exit") {
            let got = try a.call(Self.agent, "NextEvents", next, Kuasar_Agent_V1_NextEventsResponse.self).events
            for e in got {
                #expect(e.seq > next.after)
                topics.append(e.envelope.topic)
                if e.envelope.topic == "/tasks/exit" { exitStatus = try Containerd_Events_TaskExit(serializedBytes: e.envelope.event.value).exitStatus }
            }
            next.after = got.last?.seq ?? next.after
        }
        #expect(topics == ["/tasks/create", "/tasks/start", "/tasks/exit"], "\(topics)")
        #expect(exitStatus == 3)
        try a.delete("c1")
        let afterDelete = try a.call(Self.agent, "NextEvents", next, Kuasar_Agent_V1_NextEventsResponse.self).events
        #expect(afterDelete.map(\.envelope.topic) == ["/tasks/delete"])
        #expect(!Files.exists(a.dir + "/root/io/c1.init.stdout"), "the stream's FIFO goes with the container")
    }

    @Test func tenMiBArriveCompleteAndInOrderAndStdinReachesEOF() throws {
        let bundle = try TestBundle("agent-bulk")
        defer { bundle.remove() }
        // ~10.4 MiB of numbered lines: any loss or reordering shows.
        try bundle.setProcess(args: ["seq", "1", "1400000"])
        let a = try AgentProcess("bulk")
        defer { try? a.stop() }
        _ = try a.run("big", bundle: bundle.path)
        // Small reads first: the container blocks on a full FIFO meanwhile (back-pressure).
        let got = try a.readAll("big", max: 64 << 10)
        #expect(try a.wait("big") == 0)
        let expected = (1...1_400_000).map(String.init).joined(separator: "\n") + "\n"
        #expect(got.count == expected.utf8.count, "\(got.count) bytes of \(expected.utf8.count)")
        #expect(got == Array(expected.utf8), "output differs")
        try a.delete("big")

        // stdin: 1 MiB through `cat`, then CloseStdin: every byte comes back, then EOF.
        try bundle.setProcess(args: ["cat"])
        _ = try a.run("cat", bundle: bundle.path, stdin: true)
        var input: [UInt8] = []
        for i in 0..<(1 << 20) { input.append(UInt8(truncatingIfNeeded: i &* 31 &+ i >> 8)) }
        var w = Kuasar_Agent_V1_WriteStdinRequest()
        w.containerID = "cat"
        for off in stride(from: 0, to: input.count, by: 64 << 10) {
            w.data = Data(input[off..<min(off + (64 << 10), input.count)])
            #expect(try a.call(Self.agent, "WriteStdin", w, Kuasar_Agent_V1_WriteStdinResponse.self).written == UInt32(w.data.count))
        }
        var close = Kuasar_Agent_V1_CloseStdinRequest()
        close.containerID = "cat"
        _ = try a.call(Self.agent, "CloseStdin", close, Google_Protobuf_Empty.self)
        let echoed = try a.readAll("cat")
        #expect(echoed.count == input.count && echoed == input, "\(echoed.count) bytes back of \(input.count)")
        #expect(try a.wait("cat") == 0)
        try a.delete("cat")
    }

    /// A ttrpc peer written frame by frame, as a restarted daemon looks to an agent whose
    /// virtio-serial port never closed: the same connection, stream ids from 1 again.
    struct RawHost {
        let fd: Int32
        init(_ path: String) throws { fd = try Socket.connectUnix(path: path, blocking: true).take() }
        func send(_ stream: UInt32, _ method: String, _ m: some SwiftProtobuf.Message) throws {
            var req = Ttrpc_Request()
            req.service = method == "Check" || method == "ReadStdio" ? AgentTests.agent : AgentTests.task
            req.method = method
            req.payload = try m.serializedData()
            req.metadata = [.with { $0.key = "containerd-namespace-ttrpc"; $0.value = "k8s.io" }]
            _ = writeRaw(fd, TTRPC.encode(TTRPC.Frame(streamID: stream, type: .request, payload: try req.serializedBytes())))
        }
        /// Every response frame that arrives within `ms`.
        func responses(ms: Int32) -> [(UInt32, Ttrpc_Response)] {
            var d = TTRPCFrameDecoder()
            var out: [(UInt32, Ttrpc_Response)] = []
            var buf = [UInt8](repeating: 0, count: 65536)
            let end = MonotonicClock.nanoseconds() + UInt64(ms) * 1_000_000
            while MonotonicClock.nanoseconds() < end {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, 20) > 0 else { continue }
                let n = read(fd, &buf, buf.count)
                if n <= 0 { break }
                d.append(Array(buf[..<n]))
                while case .frame(let f)? = d.next() {
                    if let r = try? Ttrpc_Response(serializedBytes: f.payload) { out.append((f.streamID, r)) }
                }
            }
            return out
        }
        func close() { _ = Glibc.close(fd) }
    }

    /// A daemon killed while its long polls wait, and the next one on the same channel
    /// before the agent saw it go: the new Check's session ends the old calls, so the
    /// new host's stream ids are free and the output they were waiting for is not spent
    /// on a host that is gone. Output is acknowledged by the next read: a chunk a host
    /// took but did not acknowledge comes again (offset, or resume after a restart).
    @Test func aNewHostSessionTakesOverTheChannelAndLosesNoOutput() throws {
        let bundle = try TestBundle("agent-takeover")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["cat"])
        let a = try AgentProcess("takeover")
        defer { try? a.stop() }
        _ = try a.run("cat", bundle: bundle.path, stdin: true)

        var read = Kuasar_Agent_V1_ReadStdioRequest()
        read.containerID = "cat"
        let old = try RawHost(a.socket)
        defer { old.close() }
        try old.send(1, "Check", Kuasar_Agent_V1_CheckRequest.with { $0.session = 11 })
        try old.send(3, "ReadStdio", read)   // waits: cat has read nothing yet
        #expect(old.responses(ms: 200).map(\.0) == [1])
        // The "new daemon", same connection, ids from 1 again.
        try old.send(1, "Check", Kuasar_Agent_V1_CheckRequest.with { $0.session = 22 })
        try old.send(3, "ReadStdio", read)
        #expect(old.responses(ms: 200).map(\.0) == [1], "the new session's read waits; the old one was dropped unanswered")
        #expect(a.logText.contains("a new host session on this channel: 1 call(s) of the previous one dropped"), "\(a.logText)")

        var w = Kuasar_Agent_V1_WriteStdinRequest()
        w.containerID = "cat"
        w.data = Data("hello".utf8)
        _ = try a.call(Self.agent, "WriteStdin", w, Kuasar_Agent_V1_WriteStdinResponse.self)
        let got = old.responses(ms: 300)
        #expect(got.count == 1 && got.first?.0 == 3, "one answer, on the new session's stream: \(got.map(\.0))")
        if let (_, r) = got.first, let resp = try? Kuasar_Agent_V1_ReadStdioResponse(serializedBytes: r.payload) {
            #expect(String(decoding: resp.data, as: UTF8.self) == "hello" && resp.offset == 0)
        } else {
            Issue.record("no ReadStdio answer: \(got)")
        }

        // Not acknowledged (offset still 0): sent again; resume: again, from the last acknowledged byte.
        func pull(_ r: Kuasar_Agent_V1_ReadStdioRequest) throws -> Kuasar_Agent_V1_ReadStdioResponse {
            try a.call(Self.agent, "ReadStdio", r, Kuasar_Agent_V1_ReadStdioResponse.self)
        }
        #expect(String(decoding: try pull(read).data, as: UTF8.self) == "hello")
        var resume = read
        resume.resume = true
        let again = try pull(resume)
        #expect(String(decoding: again.data, as: UTF8.self) == "hello" && again.offset == 0)
        var bad = read
        bad.offset = 99
        a.expectFailure(Self.agent, "ReadStdio", bad, code: .outOfRange, "offset 99")
        // Acknowledged: what comes next starts at 5.
        w.data = Data(" world".utf8)
        _ = try a.call(Self.agent, "WriteStdin", w, Kuasar_Agent_V1_WriteStdinResponse.self)
        var next = read
        next.offset = 5
        let tail = try pull(next)
        #expect(String(decoding: tail.data, as: UTF8.self) == " world" && tail.offset == 5)
        var close = Kuasar_Agent_V1_CloseStdinRequest()
        close.containerID = "cat"
        _ = try a.call(Self.agent, "CloseStdin", close, Google_Protobuf_Empty.self)
        next.offset = 11
        #expect(try pull(next).eof)
        #expect(try a.wait("cat") == 0)
        try a.delete("cat")
    }

    @Test func terminalExecKillAndPids() throws {
        let bundle = try TestBundle("agent-tty")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["sh", "-c", "tty; echo tty-ok"], terminal: true)
        let a = try AgentProcess("tty")
        defer { try? a.stop() }
        _ = try a.run("t", bundle: bundle.path, terminal: true)
        let out = String(decoding: try a.readAll("t"), as: UTF8.self)
        #expect(out.contains("/dev/pts/") && out.contains("tty-ok"), "\(out)")
        #expect(try a.wait("t") == 0)
        try a.delete("t")

        try bundle.setProcess(args: ["sleep", "300"])
        let pid = try a.run("long", bundle: bundle.path)
        try a.exec("long", "e1", ["sh", "-c", "echo from exec; exit 5"])
        #expect(String(decoding: try a.readAll("long", exec: "e1"), as: UTF8.self) == "from exec\n")
        #expect(try a.wait("long", exec: "e1") == 5)
        try a.delete("long", exec: "e1")
        // An exec that leaves a child holding its stdout: the stream still ends, with what
        // was written, OutputStream.exitDrainNS (2 s) after the exec exited.
        try a.exec("long", "e2", ["sh", "-c", "sleep 60 & echo left a child"])
        let t0 = MonotonicClock.nanoseconds()
        #expect(String(decoding: try a.readAll("long", exec: "e2"), as: UTF8.self) == "left a child\n")
        let endedMS = (MonotonicClock.nanoseconds() - t0) / 1_000_000
        #expect(endedMS >= 1_500 && endedMS < 10_000, "the stream ended \(endedMS) ms after the exec started")
        #expect(try a.wait("long", exec: "e2") == 0)
        try a.delete("long", exec: "e2")
        var pids = Containerd_Task_V3_PidsRequest()
        pids.id = "long"
        #expect(try a.task("Pids", pids, Containerd_Task_V3_PidsResponse.self).processes.map(\.pid).contains(pid))
        try a.kill("long")
        #expect(try a.wait("long") == 137)
        try a.delete("long")
        #expect(waitUntil { processGone(pid_t(pid)) })
    }

    @Test func badInputIsRefusedAndTheAgentKeepsServing() throws {
        let share = try scratchDirectory("agent-share")
        defer { Files.removeTree(share) }
        let outside = try TestBundle("agent-outside")
        defer { outside.remove() }
        try outside.setProcess(args: ["true"])
        symlink(outside.path, share + "/escape")
        let a = try AgentProcess("bad", bundleRoot: share)
        defer { try? a.stop() }

        var create = Containerd_Task_V3_CreateTaskRequest()
        create.id = "x"
        for bundle in [outside.path, share + "/escape", share + "/.." + String(outside.path.dropFirst(4))] {
            create.bundle = bundle
            a.expectFailure(Self.task, "Create", create, code: .permissionDenied, "outside the host's share")
        }
        create.bundle = share + "/missing"
        a.expectFailure(Self.task, "Create", create, code: .notFound, "does not exist in the guest")
        create.id = "../etc"
        create.bundle = share
        a.expectFailure(Self.task, "Create", create, code: .invalidArgument, "container")
        var state = Containerd_Task_V3_StateRequest()
        state.id = "ghost"
        a.expectFailure(Self.task, "State", state, code: .notFound, "ghost")
        var read = Kuasar_Agent_V1_ReadStdioRequest()
        read.containerID = "ghost"
        a.expectFailure(Self.agent, "ReadStdio", read, code: .notFound, "no stdout stream for container ghost")
        var clock = Kuasar_Agent_V1_SyncClockRequest()
        clock.hostUnixNs = 1
        a.expectFailure(Self.agent, "SyncClock", clock, code: .failedPrecondition, "does not set this host's clock")
        var setup = Kuasar_Agent_V1_SetupSandboxRequest()
        setup.sysctls = ["net.ipv4.ip_forward": "1"]
        a.expectFailure(Self.agent, "SetupSandbox", setup, code: .failedPrecondition, "sysctls")
        setup.sysctls = [:]
        var nic = Kuasar_Agent_V1_Interface()
        nic.name = "eth0"
        nic.addresses = ["10.9.9.9/24"]
        setup.interfaces = [nic]
        a.expectFailure(Self.agent, "SetupSandbox", setup, code: .failedPrecondition, "does not configure this host's interfaces")
        setup.interfaces = []
        setup.sysctls = ["../../etc/passwd": "x"]
        a.expectFailure(Self.agent, "SetupSandbox", setup, code: .invalidArgument, "not a sysctl name")
        a.expectFailure(Self.agent, "NoSuchCall", Kuasar_Agent_V1_CheckRequest(), code: .unimplemented, "NoSuchCall")

        // Garbage and an oversized frame on a connection of their own: refused there.
        let raw = try Socket.connectUnix(path: a.socket, blocking: true)
        _ = writeRaw(raw.rawValue, [UInt8](repeating: 0xAB, count: 64))
        var huge: [UInt8] = []
        TTRPC.appendHeader(to: &huge, length: 0, streamID: 9, type: .request, flags: [])
        huge[0] = 0x7F
        _ = writeRaw(raw.rawValue, huge + [UInt8](repeating: 0, count: 512))
        raw.close()
        // The agent's own connection was served all along.
        let check = try a.call(Self.agent, "Check", Kuasar_Agent_V1_CheckRequest(), Kuasar_Agent_V1_CheckResponse.self)
        #expect(check.pid == UInt32(a.pid))
        #expect(!a.logText.contains("Fatal error"), "\(a.logText)")
    }

    /// vsock: the channel a guest serves on real hosts (vhost-vsock). This machine has no
    /// transport to reach it, so the test checks that the agent listens on it beside unix.
    @Test func theAgentListensOnVsockBesideUnix() throws {
        let port = UInt32(20_000 + getpid() % 10_000)
        let a = try AgentProcess("vsock", extra: ["--listen", "vsock://\(port)"])
        defer { try? a.stop() }
        let check = try a.call(Self.agent, "Check", Kuasar_Agent_V1_CheckRequest(), Kuasar_Agent_V1_CheckResponse.self)
        #expect(check.channels == ["unix://" + a.socket, "vsock://\(port)"], "\(check.channels)")
        // The agent holds the port: a second listener on it is refused.
        do {
            let fd = try Socket.listenVsock(port: port)
            fd.close()
            Issue.record("vsock port \(port) was free: the agent does not listen on it")
        } catch {
            #expect(error.errno == .EADDRINUSE, "\(error)")
        }
    }

    @Test func kernelCommandLineAndModulesDep() throws {
        let s = GuestSettings(cmdline: "console=ttyS0 quiet kuasar.channel=serial://agent,vsock://2048 kuasar.share=pod kuasar.share_type=virtiofs kuasar.log=debug kuasar.debug=1 kuasar.bogus=1\n")
        #expect(s.channels == ["serial://agent", "vsock://2048"] && s.shareTag == "pod" && s.shareType == "virtiofs" && s.logLevel == "debug" && s.debug)
        #expect(s.unknown == ["kuasar.bogus=1"])
        #expect(GuestSettings(cmdline: "quiet").channels == ["serial://agent", "vsock://1024"])
        #expect(try AgentChannel("vsock://") == .vsock(1024))
        #expect(throws: AgentError.self) { try AgentChannel("tcp://1.2.3.4:5") }
        #expect(throws: AgentError.self) { try AgentChannel("serial://../x") }
        let dir = try scratchDirectory("agent-modules")
        defer { Files.removeTree(dir) }
        try Files.write(dir + "/modules.dep", """
            kernel/fs/9p/9p.ko: kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko
            kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
            kernel/drivers/virtio/virtio-mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
            kernel/net/9p/9pnet.ko:

            """, create: true)
        // The kernel's list of loaded modules, as /sys/module shows it: empty first.
        let sys = dir + "/sys-module"
        try makeDirectories(sys, mode: 0o755)
        let mods = try KernelModules(directory: dir, kernelModules: sys)
        #expect(mods.knows("9p") && mods.knows("virtio_mmio") && mods.knows("virtio-mmio") && !mods.knows("ext4"))
        #expect(KernelModules.name(of: "kernel/x/vmw_vsock_virtio_transport.ko.xz") == "vmw_vsock_virtio_transport")
        for (path, name) in [("kernel/drivers/virtio/virtio-mmio.ko", "virtio_mmio"), ("virtio-mmio", "virtio_mmio"), ("9p.ko.zst", "9p"),
                             ("overlay", "overlay"), ("kernel/x/crc32c-generic.ko.gz", "crc32c_generic"), (".ko", ".ko"), ("a/b.kox", "b.kox")] {
            #expect(KernelModules.name(of: path) == name, "\(path)")
        }
        // The boot's order: dependencies first, each once, built-in ones (not in
        // modules.dep: virtio_ring, virtio, netfs here) left out.
        #expect(mods.plan(["9pnet_virtio", "virtio_mmio", "9p", "ext4"]).map(\.name) == ["9pnet", "9pnet_virtio", "virtio_mmio", "9p"])
        #expect(mods.plan(["9p"]).map(\.file).last == dir + "/kernel/fs/9p/9p.ko")
        // Planning after the boot thread (or anyone) loaded some: the kernel lists them,
        // and they are left out — a dependency of another as well.
        for loaded in ["9pnet", "virtio_mmio"] { try makeDirectories(sys + "/" + loaded, mode: 0o755) }
        #expect(mods.isLoaded("virtio-mmio") && !mods.isLoaded("9p"))
        #expect(mods.plan(["9pnet_virtio", "virtio_mmio", "9p"]).map(\.name) == ["9pnet_virtio", "9p"])
    }

    /// PID 1's boot thread (CAgentInit), as its constructor starts it but on files of this
    /// test: each module the list names is loaded in order and reported by path, one that
    /// is missing or no module fails with its errno, and the caller hears of every step.
    @Test func bootThreadLoadsTheListedModulesInOrderAndReportsEach() throws {
        let dir = try scratchDirectory("agent-boot")
        defer { Files.removeTree(dir) }
        for f in ["kernel/net/9p/9pnet.ko", "kernel/fs/9p/9p.ko"] {
            try makeDirectories(dir + "/" + f.split(separator: "/").dropLast().joined(separator: "/"), mode: 0o755)
            try Files.write(dir + "/" + f, "not a module", create: true)
        }
        try Files.write(dir + "/kuasar.boot", "kernel/net/9p/9pnet.ko\n# a comment\n\nkernel/missing.ko\nkernel/fs/9p/9p.ko\n", create: true)
        func steps(_ count: Int32) -> [(what: String, result: Int32)] {
            (0..<count).compactMap { i in
                var kind: Int32 = 0, result: Int32 = 0, ns: UInt64 = 0
                var what: UnsafePointer<CChar>?
                guard ks_agent_boot_step(i, &kind, &what, &result, &ns) == 0, let what, kind == Int32(KS_BOOT_MODULE) else { return nil }
                return (String(cString: what), result)
            }
        }
        #expect(ks_agent_boot_running() == 0)
        #expect(ks_agent_boot_start(dir, dir + "/kuasar.boot", 0) == 0)
        #expect(ks_agent_boot_start(dir, dir + "/kuasar.boot", 0) == -EBUSY)
        var waited: UInt64 = 0, thread: UInt64 = 0
        let loaded = steps(ks_agent_boot_wait(&waited, &thread))
        #expect(loaded.map(\.what) == ["kernel/net/9p/9pnet.ko", "kernel/missing.ko", "kernel/fs/9p/9p.ko"])
        #expect(loaded[1].result == -ENOENT)
        #expect(loaded[0].result < 0 && loaded[2].result < 0 && loaded[0].result != -ENOENT)
        #expect(thread > 0 && ks_agent_boot_running() == 0)
        var ns: UInt64 = 0
        #expect(ks_agent_boot_summary(Int32(KS_BOOT_MODULE), &ns) == 3 && ns > 0)
        #expect(ks_agent_boot_summary(Int32(KS_BOOT_CGROUP), &ns) == 0 && ns == 0)
        // A second wait has nothing to join; a list that is missing is one failed step.
        #expect(steps(ks_agent_boot_wait(&waited, &thread)).count == 3)
        #expect(ks_agent_boot_start(dir, dir + "/none.boot", 0) == 0)
        let none = steps(ks_agent_boot_wait(&waited, &thread))
        #expect(none.count == 1 && none[0].what == dir + "/none.boot" && none[0].result == -ENOENT)
        // What the agent logs of a failed step names the call, the file and the errno.
        let step = EarlyBoot.Step(kind: .module, what: "kernel/x.ko", result: -ENOEXEC, ms: 1)
        #expect("\(step)".contains("finit_module") && "\(step)".contains("kernel/x.ko") && "\(step)".contains("ENOEXEC"))
        let link = EarlyBoot.Step(kind: .link, what: "/dev/fd", result: -EEXIST, ms: 0)
        #expect("\(link)".contains("symlink") && "\(link)".contains("/dev/fd"))
        // The Swift kinds are the C side's values (PID 1's binary maps one to the other by them).
        let kinds: [(EarlyBoot.Step.Kind, Int32)] = [(.mount, Int32(KS_BOOT_MOUNT)), (.module, Int32(KS_BOOT_MODULE)),
                                                      (.cgroup, Int32(KS_BOOT_CGROUP)), (.network, Int32(KS_BOOT_NET)), (.link, Int32(KS_BOOT_LINK))]
        for (kind, c) in kinds { #expect(kind.rawValue == c, "\(kind)") }
    }

}
}

enum CgroupTestPaths {
    /// This process's own v1 cgroup directory of `hierarchy` (the agent's containers go below its own).
    static func ownV1(_ hierarchy: String) -> String {
        let lines = ((try? Files.readString("/proc/self/cgroup")) ?? "").split(separator: "\n")
        for l in lines {
            let f = l.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            if f.count == 3, f[1].split(separator: ",").map(String.init).sorted() == hierarchy.split(separator: ",").map(String.init).sorted() {
                return "/sys/fs/cgroup/\(hierarchy)\(f[2] == "/" ? "" : String(f[2]))"
            }
        }
        return "/sys/fs/cgroup/\(hierarchy)"
    }
}
