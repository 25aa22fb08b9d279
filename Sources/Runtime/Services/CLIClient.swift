#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarHostWire
import KuasarContainer
import KuasarSandbox
import KuasarTasks

/// What `kuasar run`, `exec`, `ps` and `kill` do: they are clients of the daemon like
/// containerd is — admin.sock to find or make a sandbox, then the sandbox's Task API —
/// with the container's stdio on FIFOs pumped to the terminal by a small reactor.
public final class CLIClient {
    public static let taskService = "containerd.task.v2.Task"
    public let root: String
    let executable: String
    let environment: [String: String]

    public init(root: String, executable: String, environment: [String: String]) {
        self.root = root
        self.executable = executable
        self.environment = environment
    }

    public struct RunOptions {
        public var id: String
        public var bundle: String?
        public var rootfs: String?
        public var args: [String] = []
        public var env: [String] = []
        public var cwd = "/"
        public var hostname: String?
        public var detach = false
        public var readonlyRootfs = false
        /// A WebAssembly module run in a pod of `sandboxer` (the wasm kind): its rootfs is
        /// a directory holding only the module (and the mount points), `args` its argv.
        public var wasm: String?
        public var sandboxer = "kuasar-wasm"
        /// Spec annotations (`io.kuasar.wasm.engine`).
        public var annotations: [String: String] = [:]
        public init(id: String) { self.id = id }
    }

    /// A spec like `runc spec` writes, for `kuasar run --rootfs`.
    public static func defaultSpec(rootfs: String, args: [String], env: [String], cwd: String, hostname: String?, readonly: Bool) -> [String: Any] {
        let caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
                    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
        return [
            "ociVersion": "1.0.2",
            "process": [
                "terminal": false, "user": ["uid": 0, "gid": 0], "args": args,
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + env, "cwd": cwd,
                "capabilities": ["bounding": caps, "effective": caps, "permitted": caps],
                "rlimits": [["type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024]], "noNewPrivileges": true,
            ] as [String: Any],
            "root": ["path": rootfs, "readonly": readonly],
            "hostname": hostname ?? "kuasar",
            "mounts": [
                ["destination": "/proc", "type": "proc", "source": "proc"],
                ["destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]],
                ["destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]],
                ["destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]],
                ["destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]],
                ["destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]],
                ["destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]],
            ],
            "linux": [
                "namespaces": [["type": "pid"], ["type": "network"], ["type": "ipc"], ["type": "uts"], ["type": "mount"]],
                "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                                "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
                "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            ] as [String: Any],
        ]
    }

    /// Runs a container to its end with stdio attached; returns its exit code.
    public func run(_ o: RunOptions) throws -> Int32 {
        try Identifier.validate(o.id, what: "container")
        var bundle = o.bundle ?? ""
        var madeBundle = false
        var specToWrite: Data?
        // --wasm: a rootfs of the module alone, beside the bundle (scratch, or the sandbox's
        // state directory when detached), made once the bundle's directory exists.
        var wasmRootfs: (dir: String, module: [UInt8], name: String)?
        var o = o
        if let module = o.wasm {
            guard o.bundle == nil, o.rootfs == nil else { throw RPCError(.invalidArgument, "--wasm runs a module in a rootfs of its own: not with --bundle or --rootfs") }
            let abs = module.hasPrefix("/") ? module : FileManager.default.currentDirectoryPath + "/" + module
            let bytes: [UInt8]
            do { bytes = try Files.read(abs, limit: 256 << 20) } catch { throw RPCError(.invalidArgument, "--wasm \(abs): \(error)") }
            let name = String(abs.split(separator: "/").last ?? "module.wasm")
            let dir = o.detach ? root + "/" + o.id + "/bundle/rootfs" : root + "/run/" + o.id + ".rootfs"
            wasmRootfs = (dir, bytes, name)
            o.rootfs = dir
            o.args = ["/" + name] + o.args
        }
        func makeWasmRootfs() throws {
            guard let w = wasmRootfs else { return }
            for d in ["proc", "dev", "sys", "tmp"] { try makeDirectories(w.dir + "/" + d, mode: 0o755) }
            try Files.writeAtomically(w.dir + "/" + w.name, w.module, mode: 0o755)
        }
        if bundle.isEmpty {
            if wasmRootfs != nil, !o.detach { try makeWasmRootfs() }
            guard let rootfs = o.rootfs else { throw RPCError(.invalidArgument, "kuasar run needs --bundle or --rootfs") }
            let abs = rootfs.hasPrefix("/") ? rootfs : FileManager.default.currentDirectoryPath + "/" + rootfs
            guard Files.isDirectory(abs) || (wasmRootfs != nil && o.detach) else { throw RPCError(.invalidArgument, "rootfs \(abs) is not a directory") }
            guard !o.args.isEmpty else { throw RPCError(.invalidArgument, "kuasar run --rootfs needs a command after --") }
            var spec = Self.defaultSpec(rootfs: abs, args: o.args, env: o.env, cwd: o.cwd, hostname: o.hostname, readonly: o.readonlyRootfs)
            if !o.annotations.isEmpty { spec["annotations"] = o.annotations }
            specToWrite = try JSONSerialization.data(withJSONObject: spec, options: [.prettyPrinted])
            // A detached container's bundle lives as long as its sandbox (a restarted
            // daemon reads it again): in the sandbox's state directory, made below once
            // the daemon has made that. Attached: scratch space, gone when we return.
            if o.detach {
                bundle = root + "/" + o.id + "/bundle"
            } else {
                bundle = root + "/run/" + o.id
                try makeDirectories(bundle, mode: 0o700)
                try specToWrite!.write(to: URL(fileURLWithPath: bundle + "/config.json"))
                specToWrite = nil
                madeBundle = true
            }
        } else if !bundle.hasPrefix("/") {
            bundle = FileManager.default.currentDirectoryPath + "/" + bundle
        }
        defer {
            if madeBundle { Files.removeTree(bundle) }
            if let w = wasmRootfs, !o.detach { Files.removeTree(w.dir) }
            _ = rmdir(root + "/run")  // our scratch space, once no other run uses it
        }

        let admin = try ShimProtocol.connectOrStartDaemon(root: root, executable: executable, environment: environment)
        var reg = Kuasar_Admin_V1_RegisterSandboxRequest()
        reg.sandboxID = o.id
        reg.namespace = "kuasar"
        reg.bundle = bundle
        if wasmRootfs != nil { reg.sandboxer = o.sandboxer }
        let address: String
        do {
            address = try admin.call(AdminService.service, "RegisterSandbox", reg, as: Kuasar_Admin_V1_RegisterSandboxResponse.self).taskAddress
            admin.close()
        } catch {
            admin.close()
            throw error
        }
        if let specToWrite {
            try makeDirectories(bundle, mode: 0o700)
            if o.detach { try makeWasmRootfs() }
            try specToWrite.write(to: URL(fileURLWithPath: bundle + "/config.json"))
        }
        let session = try TaskSession(address: address)
        defer { session.close() }
        let fifoDir = root + "/run/" + o.id + ".io"
        try makeDirectories(fifoDir, mode: 0o700)
        defer { Files.removeTree(fifoDir) }
        // Attached: FIFOs we read. Detached: nobody reads, so output goes to a log file
        // in the sandbox's state directory (`kuasar logs`), never to a FIFO that fills up.
        let io: (stdout: String, stderr: String)
        if o.detach {
            let log = "file://" + Self.logPath(root: root, id: o.id)
            io = (log, log)
        } else {
            let attached = try session.attachOutput(dir: fifoDir)
            io = (attached.stdout, attached.stderr)
        }
        do {
            var create = Containerd_Task_V2_CreateTaskRequest()
            create.id = o.id
            create.bundle = bundle
            create.stdout = io.stdout
            create.stderr = io.stderr
            _ = try session.call("Create", create, as: Containerd_Task_V2_CreateTaskResponse.self)
            var start = Containerd_Task_V2_StartRequest()
            start.id = o.id
            _ = try session.call("Start", start, as: Containerd_Task_V2_StartResponse.self)
        } catch {
            session.cleanup(id: o.id)
            throw error
        }
        if o.detach {
            print(o.id)
            return 0
        }
        let code = try session.waitForwardingSignals(id: o.id, execID: "")
        session.cleanup(id: o.id)
        return code
    }

    /// Runs a process in a running container (`kuasar exec`).
    public func exec(containerID: String, execID: String, args: [String], env: [String], cwd: String) throws -> Int32 {
        // Both become a path below the root that is made and then removed.
        try Identifier.validate(containerID, what: "container")
        try Identifier.validate(execID, what: "exec")
        let (address, _) = try locate(containerID)
        let session = try TaskSession(address: address)
        defer { session.close() }
        let fifoDir = root + "/run/" + containerID + "." + execID + ".io"
        try makeDirectories(fifoDir, mode: 0o700)
        defer { Files.removeTree(fifoDir); _ = rmdir(root + "/run") }
        let io = try session.attachOutput(dir: fifoDir)
        var process = OCISpec.Process(args: args, env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + env, cwd: cwd)
        process.noNewPrivileges = true
        var req = Containerd_Task_V2_ExecProcessRequest()
        req.id = containerID
        req.execID = execID
        req.stdout = io.stdout
        req.stderr = io.stderr
        req.spec.typeURL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
        req.spec.value = try JSONEncoder().encode(process)
        _ = try session.call("Exec", req, as: Google_Protobuf_Empty.self)
        var start = Containerd_Task_V2_StartRequest()
        start.id = containerID
        start.execID = execID
        _ = try session.call("Start", start, as: Containerd_Task_V2_StartResponse.self)
        let code = try session.waitForwardingSignals(id: containerID, execID: execID)
        var del = Containerd_Task_V2_DeleteRequest()
        del.id = containerID
        del.execID = execID
        _ = try? session.call("Delete", del, as: Containerd_Task_V2_DeleteResponse.self)
        return code
    }

    public func kill(containerID: String, signal: Int32, all: Bool) throws {
        let (address, _) = try locate(containerID)
        let session = try TaskSession(address: address)
        defer { session.close() }
        var req = Containerd_Task_V2_KillRequest()
        req.id = containerID
        req.signal = UInt32(bitPattern: signal)
        req.all = all
        _ = try session.call("Kill", req, as: Google_Protobuf_Empty.self)
    }

    /// Where a detached container's stdout and stderr go.
    static func logPath(root: String, id: String) -> String { root + "/" + id + "/output.log" }

    /// `kuasar logs`: what a detached container wrote so far.
    public func logs(containerID: String) throws -> [UInt8] {
        try Identifier.validate(containerID, what: "container")
        _ = try locate(containerID)
        do { return try Files.read(Self.logPath(root: root, id: containerID), limit: 64 << 20) } catch {
            if error.errno == .ENOENT { throw RPCError(.notFound, "container \(containerID) has no log: only detached containers (run -d) write one") }
            throw error
        }
    }

    /// `kuasar rm`: deletes a stopped container and its sandbox (with `force`, a running
    /// one is killed first and waited for).
    public func remove(containerID: String, force: Bool) throws {
        let (address, _) = try locate(containerID)
        let session = try TaskSession(address: address)
        defer { session.close() }
        var st = Containerd_Task_V2_StateRequest()
        st.id = containerID
        let state = try session.call("State", st, as: Containerd_Task_V2_StateResponse.self)
        if state.status == .running || state.status == .paused {
            guard force else { throw RPCError(.failedPrecondition, "container \(containerID) is running: stop it first, or rm -f") }
            var k = Containerd_Task_V2_KillRequest()
            k.id = containerID
            k.signal = UInt32(SIGKILL)
            k.all = true
            _ = try session.call("Kill", k, as: Google_Protobuf_Empty.self)
            var w = Containerd_Task_V2_WaitRequest()
            w.id = containerID
            _ = try session.call("Wait", w, as: Containerd_Task_V2_WaitResponse.self)
        }
        try session.delete(id: containerID)
    }

    public func list() throws -> [Kuasar_Admin_V1_SandboxInfo] {
        let admin = try OneShotClient(path: root + "/admin.sock")
        defer { admin.close() }
        return try admin.call(AdminService.service, "ListSandboxes", Kuasar_Admin_V1_ListSandboxesRequest(),
                              as: Kuasar_Admin_V1_ListSandboxesResponse.self).sandboxes
    }

    func locate(_ containerID: String) throws -> (String, Kuasar_Admin_V1_SandboxInfo) {
        for s in try list() where s.containers.contains(where: { $0.id == containerID }) { return (s.taskAddress, s) }
        throw RPCError(.notFound, "no container \(containerID) in the daemon at \(root)")
    }
}

/// One Task API connection whose reactor also pumps the container's output FIFOs.
final class TaskSession {
    let session: OneShotClient
    var reactor: Reactor { session.reactor }
    var client: TTRPCClient { session.client }
    private var pumps: [Connection] = []

    init(address: String) throws {
        session = try OneShotClient(path: address)
    }

    func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ method: String, _ req: Req, as: Resp.Type,
                                                                      timeoutNS: UInt64? = 60_000_000_000) throws -> Resp {
        try session.call(CLIClient.taskService, method, req, as: Resp.self, timeoutNS: timeoutNS)
    }

    /// FIFOs for stdout/stderr, opened for reading (non-blocking) and copied to ours.
    func attachOutput(dir: String) throws -> (stdout: String, stderr: String) {
        let out = dir + "/stdout", err = dir + "/stderr"
        for (path, target) in [(out, Int32(1)), (err, Int32(2))] {
            _ = try sys("mkfifo", path) { mkfifo(path, 0o600) }
            // Read-write: opening never blocks, and we see no false end of file before
            // the daemon opens its side; the end is when the daemon closes after the exit.
            let fd = try sys("open", path) { open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC) }
            let conn = Connection(reactor: reactor, fd: OwnedFD(adopting: fd))
            conn.onRead = { _, bytes in
                var off = 0
                while off < bytes.count {
                    let n = Glibc.write(target, bytes.baseAddress! + off, bytes.count - off)
                    if n <= 0 { if errno == EINTR { continue }; break }
                    off += n
                }
            }
            try conn.start()
            pumps.append(conn)
        }
        return (out, err)
    }

    /// Waits for the exit, forwarding SIGINT/SIGTERM/SIGHUP to the process; then gives
    /// the FIFOs a moment to deliver what the daemon flushed. Returns the exit code.
    func waitForwardingSignals(id: String, execID: String) throws -> Int32 {
        try Signals.block([SIGINT, SIGTERM, SIGHUP])
        try reactor.onSignals([SIGINT, SIGTERM, SIGHUP]) { [weak self] sig in
            var k = Containerd_Task_V2_KillRequest()
            k.id = id
            k.execID = execID
            k.signal = UInt32(sig)
            self?.client.unary(service: CLIClient.taskService, method: "Kill", k, as: Google_Protobuf_Empty.self) { _ in }
        }
        var w = Containerd_Task_V2_WaitRequest()
        w.id = id
        w.execID = execID
        let resp = try call("Wait", w, as: Containerd_Task_V2_WaitResponse.self, timeoutNS: nil)
        // The daemon reports the exit only once the output is in the FIFOs: read what
        // is there without waiting for more.
        for _ in 0..<64 { try reactor.runOnce(block: false) }
        return Int32(bitPattern: resp.exitStatus)
    }

    /// Delete and Shutdown, ignoring errors (best effort on the way out).
    /// Deletes the container, then shuts its sandbox down (the CLI's sandboxes hold one
    /// container each). A failed Delete throws unless `bestEffort` (the cleanup after a
    /// run); the Shutdown is always best effort.
    func delete(id: String, bestEffort: Bool = false) throws {
        var d = Containerd_Task_V2_DeleteRequest()
        d.id = id
        do { _ = try call("Delete", d, as: Containerd_Task_V2_DeleteResponse.self) } catch { if !bestEffort { throw error } }
        var s = Containerd_Task_V2_ShutdownRequest()
        s.id = id
        _ = try? call("Shutdown", s, as: Google_Protobuf_Empty.self)
    }

    func cleanup(id: String) { try? delete(id: id, bestEffort: true) }

    func close() {
        for p in pumps { p.close() }
        pumps.removeAll()
        session.close()
    }
}
