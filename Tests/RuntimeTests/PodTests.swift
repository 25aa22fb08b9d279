import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// CRI pods through the sandbox Controller, with containers made from the exact spec
/// containerd 2.3's CRI writes (Tests/Fixtures/containerd-2.3-cri-container-config.json,
/// captured from containerd 2.3.4 + crictl; no containerd 2.x can run here): its
/// namespace paths point at /proc/<pid>/ns/* of the pid Controller.Start returned.
extension AllTests {
@Suite struct PodTests {
    static let controller = "containerd.services.sandbox.v1.Controller"
    static let fixture = repositoryRoot + "/Tests/Fixtures/containerd-2.3-cri-container-config.json"

    final class Node {
        let root: String
        let socket: String
        var daemon: AllTests.DaemonTests.Running?
        let daemonPid: pid_t
        let grpc: GRPCClient
        let bundles: String

        init(_ name: String, config: String? = nil) throws {
            root = "/tmp/kuasar-pod-\(name)-\(getpid())"
            Files.removeTree(root)
            try makeDirectories(root, mode: 0o700)
            socket = root + "/kuasar.sock"
            bundles = root + "-bundles"
            Files.removeTree(bundles)
            try makeDirectories(bundles, mode: 0o755)
            var args = ["--root", root]
            if let config {
                try Files.write(root + "/config.toml", config, create: true)
                args += ["--config", root + "/config.toml"]
            }
            let running = try AllTests.DaemonTests.start(args, socket: socket)
            daemonPid = running.process.pid
            daemon = consume running
            #expect(AllTests.DaemonTests.waitForSocket(socket))
            grpc = try GRPCClient(path: socket)
        }

        func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ m: String, _ r: Req, _: Resp.Type) throws -> Resp {
            try grpc.call(PodTests.controller, m, r, as: Resp.self, metadata: [("containerd-namespace", "k8s.io")])
        }

        /// Controller Create + Start of a pod; returns the pid Start answered and the Task address.
        func runPod(_ id: String, _ config: Runtime_V1_PodSandboxConfig) throws -> (pid: pid_t, address: String) {
            var create = Containerd_Services_Sandbox_V1_ControllerCreateRequest()
            create.sandboxID = id
            create.sandboxer = "kuasar"
            create.options.typeURL = "type.googleapis.com/runtime.v1.PodSandboxConfig"
            create.options.value = try config.serializedData()
            _ = try call("Create", create, Containerd_Services_Sandbox_V1_ControllerCreateResponse.self)
            var start = Containerd_Services_Sandbox_V1_ControllerStartRequest()
            start.sandboxID = id
            start.sandboxer = "kuasar"
            let started = try call("Start", start, Containerd_Services_Sandbox_V1_ControllerStartResponse.self)
            return (pid_t(started.pid), String(started.address.dropFirst("ttrpc+unix://".count)))
        }

        /// A bundle whose config.json is containerd's fixture with `<P>` = `pid` and our args.
        func bundle(_ name: String, pid: pid_t, args: [String], edit: (inout [String: Any]) -> Void = { _ in }) throws -> String {
            let b = try TestBundle(name)
            let dir = bundles + "/" + name
            try makeDirectories(dir, mode: 0o755)
            try run("/bin/mv", b.rootfs, dir + "/rootfs")
            b.remove()
            let text = try Files.readString(PodTests.fixture).replacingOccurrences(of: "/proc/3082/", with: "/proc/\(pid)/")
            var json = try JSONSerialization.jsonObject(with: Data(text.utf8)) as! [String: Any]
            var p = json["process"] as! [String: Any]
            p["args"] = args
            json["process"] = p
            edit(&json)
            try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: dir + "/config.json"))
            return dir
        }

        /// Task Create + Start; stdout goes to `<bundle>/out`.
        func startContainer(_ address: String, _ id: String, bundle: String) throws -> pid_t {
            let t = try OneShotClient(path: address)
            defer { t.close() }
            var create = Containerd_Task_V3_CreateTaskRequest()
            create.id = id
            create.bundle = bundle
            create.stdout = "file://" + bundle + "/out"
            create.stderr = "file://" + bundle + "/out"
            let created = try t.call("containerd.task.v3.Task", "Create", create, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
            var start = Containerd_Task_V3_StartRequest()
            start.id = id
            _ = try t.call("containerd.task.v3.Task", "Start", start, as: Containerd_Task_V3_StartResponse.self, namespace: "k8s.io")
            return pid_t(created.pid)
        }

        func output(_ bundle: String) -> String { (try? Files.readString(bundle + "/out")) ?? "" }

        func shutdown(_ id: String) throws {
            var stop = Containerd_Services_Sandbox_V1_ControllerStopRequest()
            stop.sandboxID = id
            stop.sandboxer = "kuasar"
            _ = try call("Stop", stop, Containerd_Services_Sandbox_V1_ControllerStopResponse.self)
            var sd = Containerd_Services_Sandbox_V1_ControllerShutdownRequest()
            sd.sandboxID = id
            sd.sandboxer = "kuasar"
            _ = try call("Shutdown", sd, Containerd_Services_Sandbox_V1_ControllerShutdownResponse.self)
        }

        func stop() throws {
            if let d = daemon.take() {
                let (status, log) = try AllTests.DaemonTests.stop(d)
                #expect(status == .exited(0), "daemon: \(log)")
            }
            #expect(mountsUnder(root).isEmpty, "mounts left: \(mountsUnder(root))")
            for b in Files.list(bundles) { Mounts.unmountAll(under: bundles + "/" + b) }
            Files.removeTree(bundles)
            Files.removeTree(root)
        }
    }

    static func nsInode(_ pid: String, _ type: String) -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/\(type)")) ?? "?"
    }

    static func podConfig(hostname: String, sysctls: [String: String] = [:]) -> Runtime_V1_PodSandboxConfig {
        var c = Runtime_V1_PodSandboxConfig()
        c.hostname = hostname
        c.metadata.name = hostname
        c.metadata.uid = "uid-" + hostname
        c.metadata.namespace = "default"
        c.dnsConfig.servers = ["10.96.0.10"]
        c.dnsConfig.searches = ["default.svc.cluster.local", "svc.cluster.local"]
        c.dnsConfig.options = ["ndots:5"]
        c.linux.sysctls = sysctls
        return c
    }

    /// Children of `parent` (their pid and state letter), read from /proc.
    static func children(of parent: pid_t) -> [(pid: pid_t, state: String)] {
        Files.list("/proc").compactMap { name -> (pid_t, String)? in
            guard let pid = pid_t(name), let stat = try? Files.readString("/proc/\(name)/stat"),
                  let close = stat.lastIndex(of: ")") else { return nil }
            let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
            guard fields.count > 2, pid_t(fields[1]) == parent else { return nil }
            return (pid, String(fields[0]))
        }
    }

    @Test func containersOfACRIPodShareItsNamespacesNotTheHosts() throws {
        let node = try Node("iso")
        var finished = false
        defer { if !finished { try? node.stop() } }
        let hostUnprivPort = try Files.readString("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        let hostShmmni = try Files.readString("/proc/sys/kernel/shmmni")
        let hostName = Self.hostname()

        // A non-namespaced sysctl would change the node: refused at Create, naming it.
        do {
            _ = try node.runPod("bad-sysctl", Self.podConfig(hostname: "bad", sysctls: ["kernel.panic": "1"]))
            Issue.record("kernel.panic accepted")
        } catch let e as RPCError {
            #expect(e.code == .invalidArgument && e.message.contains("kernel.panic"), "\(e)")
        }
        #expect(!Files.exists(node.root + "/bad-sysctl"), "a refused pod left its state")

        let (pidA, addrA) = try node.runPod("pod-a", Self.podConfig(hostname: "pod-a", sysctls: [
            "net.ipv4.ip_unprivileged_port_start": "80", "kernel.shmmni": "2048"]))
        let (pidB, addrB) = try node.runPod("pod-b", Self.podConfig(hostname: "pod-b"))
        #expect(pidA != node.daemonPid && pidA > 0 && pidB > 0 && pidA != pidB)
        // The pid containerd is given lives in the pod's own namespaces, not the daemon's.
        for type in ["net", "ipc", "uts", "pid"] {
            #expect(Self.nsInode("\(pidA)", type) != Self.nsInode("\(node.daemonPid)", type), "pod holder shares the daemon's \(type) namespace")
            #expect(Self.nsInode("\(pidA)", type) != Self.nsInode("\(pidB)", type), "two pods share a \(type) namespace")
        }
        #expect((try? Files.readString("/proc/\(pidA)/comm")) == "kuasar-pod\n")

        // A SysV segment made in pod A's IPC namespace (from the host, through its pid).
        let mk = try shell("nsenter --ipc=/proc/\(pidA)/ns/ipc python3 -c 'import ctypes; print(ctypes.CDLL(None).shmget(0x4b53, 4096, 0o1666))'")
        #expect(mk.code == 0, "shmget in the pod: \(mk.out)")

        let a1 = try node.bundle("a1", pid: pidA, args: ["sh", "-c",
            "hostname; cat /etc/hostname /etc/resolv.conf /etc/hosts; cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shmmni; " +
            "grep -c 19283 /proc/sysvipc/shm; echo shared > /dev/shm/hello; echo ready; nc -ll -p 8080 -e echo pong"])
        let a1Pid = try node.startContainer(addrA, "a1", bundle: a1)
        #expect(waitUntil { node.output(a1).contains("ready") }, "a1: \(node.output(a1))")
        let out1 = node.output(a1)
        let lines = out1.split(separator: "\n").map(String.init)
        #expect(lines.first == "pod-a", "hostname in the pod: \(out1)")
        #expect(out1.contains("pod-a\nnameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"), "/etc/hostname, /etc/resolv.conf: \(out1)")
        #expect(out1.contains("127.0.0.1\tlocalhost"), "/etc/hosts: \(out1)")
        #expect(out1.contains("\n80\n2048\n1\n"), "pod sysctls and the pod's SysV segment inside: \(out1)")
        for type in ["net", "ipc", "uts", "pid"] {
            #expect(Self.nsInode("\(a1Pid)", type) == Self.nsInode("\(pidA)", type), "a1 is not in the pod's \(type) namespace")
        }
        #expect(Self.nsInode("\(a1Pid)", "mnt") != Self.nsInode("\(node.daemonPid)", "mnt"))
        // Nothing of it reached the host.
        #expect(try Files.readString("/proc/sys/net/ipv4/ip_unprivileged_port_start") == hostUnprivPort)
        #expect(try Files.readString("/proc/sys/kernel/shmmni") == hostShmmni)
        #expect(Self.hostname() == hostName)
        #expect(try shell("echo x | nc -w 1 127.0.0.1 8080").out.contains("pong") == false, "the pod's server listens on the host")

        // A second container of the pod: the same loopback, /dev/shm, SysV IPC and pids;
        // an orphan it leaves behind is reparented to the holder and reaped.
        let a2 = try node.bundle("a2", pid: pidA, args: ["sh", "-c",
            "echo hi | nc -w 2 127.0.0.1 8080; cat /dev/shm/hello; grep -c 19283 /proc/sysvipc/shm; ps -o pid,comm | grep -c 'nc'; (sleep 0.5 &); echo done2; sleep 300"])
        _ = try node.startContainer(addrA, "a2", bundle: a2)
        #expect(waitUntil { node.output(a2).contains("done2") }, "a2: \(node.output(a2))")
        #expect(node.output(a2).hasPrefix("pong\nshared\n1\n"), "a2 sees a1's server, /dev/shm and segment: \(node.output(a2))")
        #expect(!node.output(a2).contains("\n0\ndone2"), "a2 sees a1's processes: \(node.output(a2))")
        #expect(waitUntil { Self.children(of: pidA).contains { $0.state != "Z" } }, "the orphan was not reparented to the holder")
        #expect(waitUntil(timeoutMS: 3000) { Self.children(of: pidA).isEmpty }, "orphan left: \(Self.children(of: pidA))")

        // A container of another pod sees none of it.
        let b1 = try node.bundle("b1", pid: pidB, args: ["sh", "-c",
            "hostname; echo hi | nc -w 1 127.0.0.1 8080; cat /dev/shm/hello; grep -c 19283 /proc/sysvipc/shm; echo doneb"])
        _ = try node.startContainer(addrB, "b1", bundle: b1)
        #expect(waitUntil { node.output(b1).contains("doneb") }, "b1: \(node.output(b1))")
        #expect(node.output(b1).hasPrefix("pod-b\n") && !node.output(b1).contains("pong") && !node.output(b1).contains("shared"), "b1: \(node.output(b1))")
        #expect(node.output(b1).contains("\n0\ndoneb"), "b1 sees pod A's SysV segment: \(node.output(b1))")

        // A spec whose namespaces name the daemon's own pid (or any process in the host's
        // namespaces: here the keeper, the daemon's parent) would put the container on the host.
        let daemonPid = Daemon.pid(root: node.root) ?? 0
        #expect(daemonPid > 0)
        for (name, pid) in [("bad-daemon", daemonPid), ("bad-keeper", node.daemonPid)] {
            let bad = try node.bundle(name, pid: pid, args: ["true"])
            do {
                _ = try node.startContainer(addrA, name, bundle: bad)
                Issue.record("a container joined the host's namespaces through pid \(pid)")
            } catch let e as RPCError {
                #expect(e.code == .invalidArgument && e.message.contains("daemon's own namespace"), "\(e)")
            }
        }

        try node.shutdown("pod-a")
        try node.shutdown("pod-b")
        #expect(waitUntil { processGone(pidA) && processGone(pidB) }, "pod holders left behind")
        #expect(!Files.exists(node.root + "/pod-a") && !Files.exists(node.root + "/pod-b"))
        finished = true
        try node.stop()
    }

    static func hostname() -> String {
        var buf = [CChar](repeating: 0, count: 256)
        gethostname(&buf, 255)
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
}
