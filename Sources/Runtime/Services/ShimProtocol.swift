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

/// `containerd-shim-kuasar-v2`: the shim v2 binary protocol containerd 1.6/1.7 (and 2.x
/// without a sandboxer) speaks to a runtime. `start` makes sure the daemon runs,
/// registers the sandbox and prints the daemon's task address; `delete` cleans up after
/// a task containerd lost. The binary exits at once: no process per pod stays behind.
public enum ShimProtocol {
    public struct Flags: Equatable {
        public var namespace = ""
        public var address = ""
        public var publishBinary = ""
        public var id = ""
        public var bundle = ""
        public var debug = false
        public var action = ""
    }

    /// Go's flag syntax as containerd passes it: `-namespace ns -address a -id x start`.
    public static func parse(_ args: [String]) throws -> Flags {
        var f = Flags()
        var i = 0
        func value(_ name: String) throws -> String {
            i += 1
            guard i < args.count else { throw ShimError("flag -\(name) needs a value") }
            return args[i]
        }
        while i < args.count {
            var a = args[i]
            if a.hasPrefix("--") { a.removeFirst() }
            var inline: String?
            if let eq = a.firstIndex(of: "="), a.hasPrefix("-") {
                inline = String(a[a.index(after: eq)...])
                a = String(a[..<eq])
            }
            switch a {
            case "-namespace": f.namespace = try inline ?? value("namespace")
            case "-address": f.address = try inline ?? value("address")
            case "-publish-binary": f.publishBinary = try inline ?? value("publish-binary")
            case "-id": f.id = try inline ?? value("id")
            case "-bundle": f.bundle = try inline ?? value("bundle")
            case "-debug": f.debug = inline.map { $0 != "false" } ?? true
            case "-v", "-version": f.action = "version"
            // containerd 2.x: `-info` is a flag, not an action (older shims choke on unknown actions).
            case "-info": if inline != "false" { f.action = "info" }
            case "-socket", "-systemd-cgroup", "-criu", "-runtime-root":
                _ = try inline ?? value(a)  // runc shim flags we accept and ignore
            default:
                if a.hasPrefix("-") { throw ShimError("unknown flag \(args[i])") }
                guard f.action.isEmpty else { throw ShimError("unexpected argument \(a)") }
                f.action = a
            }
            i += 1
        }
        return f
    }

    public struct ShimError: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d }
    }

    public static let sandboxAnnotation = "io.kubernetes.cri.sandbox-id"

    /// Runs one invocation; returns the process exit code. `stdout` gets exactly what
    /// containerd parses (it reads stdout and stderr together for `start`).
    /// The sandboxer a shim binary's name means: `containerd-shim-kuasar-v2` none (the
    /// namespace kind), `containerd-shim-kuasar-<x>-v2` (runtime `io.containerd.kuasar-<x>.v2`) `kuasar-<x>`.
    public static func sandboxer(invokedAs name: String) -> String {
        guard name.hasPrefix("containerd-shim-kuasar-"), name.hasSuffix("-v2"), name != "containerd-shim-kuasar-v2" else { return "" }
        return "kuasar-" + name.dropFirst("containerd-shim-kuasar-".count).dropLast("-v2".count)
    }

    public static func run(_ f: Flags, environment: [String: String], executable: String, sandboxer: String = "",
                           stdout: (([UInt8]) -> Void), stderr: ((String) -> Void)) -> Int32 {
        let root = environment["KUASAR_ROOT"] ?? "/run/kuasar"
        switch f.action {
        case "version":
            stdout(Array("containerd-shim-kuasar-v2:\n  Version: \(KuasarVersion.string)\n  Runtime: kuasar\n".utf8))
            return 0
        case "info":
            // containerd sends its runtime options (an Any) on stdin; they are echoed back.
            var info = Containerd_Types_RuntimeInfo()
            info.name = "io.containerd.kuasar.v2"
            info.version.version = KuasarVersion.string
            if let options = stdinOptions() { info.options = options }
            info.features.typeURL = RuntimeFeatures.typeURL
            info.features.value = RuntimeFeatures.json(cgroups: try? CgroupHost.detect())
            stdout((try? [UInt8](info.serializedData())) ?? [])
            return 0
        case "start":
            do {
                let bundle = f.bundle.isEmpty ? FileManager.default.currentDirectoryPath : f.bundle
                try Identifier.validate(f.id, what: "container")
                var sandboxID = f.id
                // A CRI pod's containers carry their pod's id: they share one sandbox.
                if let data = try? Files.read(bundle + "/config.json"),
                   let spec = try? OCISpec.decode(data), let s = spec.annotations?[sandboxAnnotation], !s.isEmpty {
                    sandboxID = s
                }
                let client = try connectOrStartDaemon(root: root, executable: executable, environment: environment)
                defer { client.close() }
                var req = Kuasar_Admin_V1_RegisterSandboxRequest()
                req.sandboxID = sandboxID
                req.namespace = f.namespace
                req.eventsAddress = environment["TTRPC_ADDRESS"] ?? ""
                req.bundle = bundle
                req.sharedNamespaces = sandboxID != f.id
                req.sandboxer = sandboxer
                let resp = try client.call(AdminService.service, "RegisterSandbox", req, as: Kuasar_Admin_V1_RegisterSandboxResponse.self)
                // containerd reads the address back from here after its own restart.
                try? Files.write(bundle + "/address", resp.taskAddress, create: true, mode: 0o600)
                stdout(Array(bootstrap(address: resp.taskAddress, environment: environment).utf8))
                return 0
            } catch {
                stderr("containerd-shim-kuasar-v2 start: \(error)\n")
                return 1
            }
        case "delete":
            let bundle = f.bundle.isEmpty ? FileManager.default.currentDirectoryPath : f.bundle
            var resp = Containerd_Task_V2_DeleteResponse()
            resp.exitStatus = 128 + UInt32(SIGKILL)
            if let client = try? OneShotClient(path: root + "/admin.sock") {
                var req = Kuasar_Admin_V1_ForceDeleteRequest()
                req.containerID = f.id
                req.namespace = f.namespace
                if let r = try? client.call(AdminService.service, "ForceDelete", req, as: Kuasar_Admin_V1_ForceDeleteResponse.self), r.found {
                    resp.pid = r.pid
                    resp.exitStatus = r.exitStatus
                }
                client.close()
            }
            Mounts.unmountAll(under: bundle + "/rootfs")
            resp.exitedAt = Google_Protobuf_Timestamp(WallTime.now())
            stdout((try? [UInt8](resp.serializedData())) ?? [])
            return 0
        default:
            stderr("containerd-shim-kuasar-v2: unknown action \"\(f.action)\" (start, delete, -v, -info)\n")
            return 2
        }
    }

    /// What `start` prints. containerd 2.x (MAX_SHIM_VERSION=3 in our environment) reads
    /// the JSON bootstrap and then talks Task API v3 to the address; 1.6 (no variable) and
    /// 1.7 (2) read a bare address, which is also what 2.x falls back to.
    static func bootstrap(address: String, environment: [String: String]) -> String {
        guard let max = environment["MAX_SHIM_VERSION"].flatMap({ Int($0) }), max >= 3 else { return address }
        let escaped = address.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
        return "{\"version\":3,\"address\":\"\(escaped)\",\"protocol\":\"ttrpc\"}"
    }

    /// The options on stdin, when stdin is a pipe or a file containerd wrote (never a
    /// terminal a person would have to close).
    static func stdinOptions() -> Google_Protobuf_Any? {
        var st = stat()
        guard fstat(0, &st) == 0, (st.st_mode & S_IFMT) == S_IFIFO || (st.st_mode & S_IFMT) == S_IFREG else { return nil }
        var bytes: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65_536)
        while bytes.count < 1 << 20 {
            let n = buf.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            bytes += buf[0..<n]
        }
        guard !bytes.isEmpty, let any = try? Google_Protobuf_Any(serializedBytes: bytes) else { return nil }
        return any
    }

    /// The admin socket of a running daemon; else starts one (detached, its own session)
    /// and waits until it answers.
    public static func connectOrStartDaemon(root: String, executable: String, environment: [String: String]) throws -> OneShotClient {
        let admin = root + "/admin.sock"
        if let c = try? OneShotClient(path: admin) { return c }
        try makeDirectories(root, mode: 0o700)
        let log = root + "/daemon.log"
        let logFD = try sys("open", log) { open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600) }
        let null = try sys("open", "/dev/null") { open("/dev/null", O_RDONLY | O_CLOEXEC) }
        defer { _ = close(logFD); _ = close(null) }
        var spec = ProcessSpec(executable: executable, arguments: ["kuasar", "daemon", "--root", root, "--socket", root + "/kuasar.sock"],
                               fdMap: [(null, 0), (logFD, 1), (logFD, 2)])
        spec.newSession = true
        let child = try Spawner.spawn(spec)
        let pid = child.pid
        // The daemon outlives us; its exit is reaped by whoever inherits it.
        child.pidfd.close()
        for _ in 0..<500 {
            if let c = try? OneShotClient(path: admin) { return c }
            if waitpid(pid, nil, WNOHANG) == pid { break }  // it exited: see the log
            usleep(10_000)
        }
        throw ShimError("the kuasar daemon did not come up on \(admin); see \(log)")
    }
}
