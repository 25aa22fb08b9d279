#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer

/// What survives a daemon restart: one `state.json` per sandbox, in its state directory,
/// rewritten atomically (temporary file, fsync, rename, fsync of the directory) whenever
/// the sandbox or one of its containers (or their exec processes) changes state.
struct SandboxRecord: Codable, Equatable {
    /// 2: kind, sandboxer and the kind's own state. Version 1 files (no kind: namespace)
    /// still load.
    static let version = 2
    static let readable = 1...2
    var version = SandboxRecord.version
    var id: String
    var kind: String?
    var sandboxer: String?
    var backendState: [String: String]?
    var taskAddress: String?
    var taskVersion: UInt32?
    var namespace: String
    var eventsAddress: String
    var state: String
    var createdAt: WallTime
    var exitedAt: WallTime?
    var labels: [String: String]
    var extensions: [String: Sandbox.Extension]?
    var pinned: [String: String]
    var cgroupRoot: String
    /// A CRI pod: its holder (pid and start time), its /dev/shm, how it ended.
    var pod: Bool?
    var holderPid: Int32?
    var holderStartTime: UInt64?
    var shm: Bool?
    var exitCode: Int32?
    var exitStatus: Int32?
    var containers: [ContainerRecord]
}

struct ContainerRecord: Codable, Equatable {
    var id: String
    var bundle: String
    var rootfs: String
    var ownedMounts: [String]
    /// created, running, paused, stopped.
    var state: String
    /// Its init (`id` empty).
    var process: ProcessRecord
    /// Started exec processes (one added but never started has nothing to recover).
    var execs: [ProcessRecord]?
}

/// A container's init or one of its exec processes.
struct ProcessRecord: Codable, Equatable {
    /// The exec id; empty for the init.
    var id: String
    var stdin: String
    var stdout: String
    var stderr: String
    var terminal: Bool
    var pid: Int32
    var startTime: UInt64
    /// siginfo (si_code, si_status) once it has exited.
    var exitCode: Int32?
    var exitStatus: Int32?
    var exitedAt: WallTime?

    init(id: String, stdin: String, stdout: String, stderr: String, terminal: Bool, pid: Int32, startTime: UInt64,
         exitCode: Int32? = nil, exitStatus: Int32? = nil, exitedAt: WallTime? = nil) {
        self.id = id; self.stdin = stdin; self.stdout = stdout; self.stderr = stderr; self.terminal = terminal
        self.pid = pid; self.startTime = startTime; self.exitCode = exitCode; self.exitStatus = exitStatus; self.exitedAt = exitedAt
    }

    init(_ p: ContainerProcess) {
        let x = p.exitStatus?.siginfo
        self.init(id: p.execID, stdin: p.stdio.stdin, stdout: p.stdio.stdout, stderr: p.stdio.stderr, terminal: p.stdio.terminal,
                  pid: p.pid, startTime: p.startTime, exitCode: x?.code, exitStatus: x?.status, exitedAt: p.exitedAt)
    }

    var exit: (ExitStatus, WallTime)? {
        guard let exitCode, let exitStatus else { return nil }
        return (ExitStatus(siginfoCode: exitCode, status: exitStatus), exitedAt ?? WallTime.now())
    }

    /// The name the keeper gives this process's exit record.
    var exitRecordName: String { ExitRecords.name(pid: pid, startTime: startTime) }

    func stdio(container: String, namespace: String) -> StdioPaths {
        var paths = StdioPaths(stdin: stdin, stdout: stdout, stderr: stderr, terminal: terminal)
        paths.containerID = container
        paths.namespace = namespace
        return paths
    }
}

extension ExitStatus {
    package var siginfo: (code: Int32, status: Int32) {
        switch self {
        case .exited(let c): return (1, c)
        case .signaled(let s, let core): return (core ? 3 : 2, s)
        }
    }
}

extension SandboxRegistry {
    static let stateFile = "state.json"

    /// Writes the sandbox's state (atomically). A failure is logged: the sandbox keeps
    /// working, only a restart would not find this change.
    public func save(_ s: Sandbox) {
        guard sandboxes[s.id] === s else { return }
        var containers: [ContainerRecord] = []
        for id in s.containerOrder {
            guard let c = s.containers[id] else { continue }
            // A container still being set up is not worth a record: if the daemon dies now,
            // its init dies with the sync socket.
            if c.state == .creating { continue }
            let execs = c.execs.values.filter { $0.pid > 0 }.sorted { $0.execID < $1.execID }.map(ProcessRecord.init)
            containers.append(ContainerRecord(
                id: c.id, bundle: c.bundle, rootfs: c.rootfs, ownedMounts: c.ownedMounts, state: c.state.rawValue,
                process: ProcessRecord(c.initProcess), execs: execs.isEmpty ? nil : execs))
        }
        let record = SandboxRecord(
            id: s.id, kind: s.kind, sandboxer: s.sandboxer, backendState: backendState.map { $0(s) }.flatMap { $0.isEmpty ? nil : $0 },
            taskAddress: s.taskAddressOverride, taskVersion: s.taskAddressOverride == nil ? nil : s.taskVersionOverride, namespace: s.namespace, eventsAddress: s.eventsAddress, state: s.state.rawValue,
            createdAt: s.createdAt, exitedAt: s.exitedAt, labels: s.labels, extensions: s.extensions.isEmpty ? nil : s.extensions, pinned: s.pinned,
            cgroupRoot: s.cgroupRoot, pod: s.isPod ? true : nil, holderPid: s.holder?.pid, holderStartTime: s.holder?.startTime,
            shm: s.hasShm ? true : nil, exitCode: s.exitStatus?.siginfo.code, exitStatus: s.exitStatus?.siginfo.status,
            containers: containers)
        do {
            try Files.writeAtomically(s.stateDir + "/" + Self.stateFile, record.json())
        } catch {
            logger.error("sandbox \(s.id): state not saved: \(error)")
        }
    }

    /// A container the previous daemon recorded, rebuilt but not yet watched.
    public struct Recovered {
        public let sandbox: Sandbox
        public let container: Container
        let record: ContainerRecord
        /// The file names the keeper gives the exit records of this container's processes.
        public var exitRecordNames: [String] { ([record.process] + (record.execs ?? [])).map(\.exitRecordName) }
    }

    /// Reads every sandbox's state under `root` and rebuilds sandboxes and containers.
    /// Call `resume` on each returned container once its handlers are wired. A directory
    /// whose state cannot be read is left alone and named in the log.
    public func recover() -> (sandboxes: [Sandbox], containers: [Recovered]) {
        var found: [Sandbox] = []
        var recovered: [Recovered] = []
        for name in Files.list(root).sorted() {
            let dir = root + "/" + name
            let path = dir + "/" + Self.stateFile
            guard (try? Identifier.validate(name, what: "sandbox")) != nil, Files.exists(path) else { continue }
            let record: SandboxRecord
            do {
                record = try JSONDecoder().decode(SandboxRecord.self, from: Data(try Files.read(path)))
            } catch {
                logger.error("sandbox \(name): cannot recover \(path): \(error)")
                continue
            }
            guard record.id == name, SandboxRecord.readable.contains(record.version) else {
                logger.error("sandbox \(name): \(path) names \(record.id), format version \(record.version) (this release reads \(SandboxRecord.readable)); not recovered")
                continue
            }
            let s = Sandbox(id: record.id, namespace: record.namespace, stateDir: dir, eventsAddress: record.eventsAddress)
            s.kind = record.kind ?? "namespace"
            // Version 1 knew no sandboxer: its pods were the Controller's.
            s.sandboxer = record.sandboxer ?? (record.pod == true ? "" : nil)
            s.recoveredState = record.backendState ?? [:]
            s.taskAddressOverride = record.taskAddress
            s.taskVersionOverride = record.taskVersion ?? 3
            s.createdAt = record.createdAt
            s.exitedAt = record.exitedAt
            s.state = Sandbox.State(rawValue: record.state) ?? .ready
            s.labels = record.labels
            s.extensions = record.extensions ?? [:]
            s.pinned = record.pinned
            s.cgroupRoot = record.cgroupRoot
            s.isPod = record.pod == true
            s.hasShm = record.shm == true
            if let pid = record.holderPid, let start = record.holderStartTime { s.holder = Sandbox.Holder(pid: pid, startTime: start) }
            if let code = record.exitCode, let status = record.exitStatus { s.exitStatus = ExitStatus(siginfoCode: code, status: status) }
            for cr in record.containers {
                var spec: OCISpec
                do {
                    spec = try s.adapt(try OCISpec.decode(try Files.read(cr.bundle + "/config.json")))
                } catch {
                    // Still recovered (status, wait, kill, delete work); exec needs the spec.
                    logger.warning("container \(cr.id): \(cr.bundle)/config.json: \(error)")
                    spec = OCISpec(ociVersion: "1.0.2")
                }
                let c = Container.restore(
                    id: cr.id, bundle: cr.bundle, spec: spec, rootfs: cr.rootfs,
                    stdio: cr.process.stdio(container: cr.id, namespace: record.namespace),
                    cgroupPath: s.cgroupPath(for: cr.id), ownedMounts: cr.ownedMounts,
                    paused: cr.state == Container.State.paused.rawValue, engine: engine)
                s.add(c)
                recovered.append(Recovered(sandbox: s, container: c, record: cr))
            }
            sandboxes[s.id] = s
            found.append(s)
        }
        return (found, recovered)
    }

    /// Starts watching a recovered container (its exit, if it happened while no daemon
    /// ran, is reported now through the handlers wired since `recover`).
    public func resume(_ r: Recovered, exits: ExitRecords) {
        let cr = r.record
        for p in [cr.process] + (cr.execs ?? []) {
            r.container.resume(execID: p.id, stdio: p.stdio(container: cr.id, namespace: r.sandbox.namespace), pid: p.pid,
                               startTime: p.startTime, running: !p.id.isEmpty || cr.state != Container.State.created.rawValue,
                               exit: p.exit, exits: exits)
        }
    }
}

/// The state file is written at every state change, on the request path: encoded by
/// hand (a tenth of JSONEncoder's time), read back with JSONDecoder through the same
/// Codable keys.
struct JSONWriter {
    private(set) var bytes: [UInt8] = []
    private var needsComma = [false]

    init() { bytes.reserveCapacity(1024) }

    private mutating func separator() {
        if needsComma[needsComma.count - 1] { bytes.append(UInt8(ascii: ",")) }
        needsComma[needsComma.count - 1] = true
    }

    mutating func open(_ key: String? = nil, array: Bool = false) {
        if let key { self.key(key) } else { separator() }
        bytes.append(UInt8(ascii: array ? "[" : "{"))
        needsComma.append(false)
    }

    mutating func close(array: Bool = false) {
        needsComma.removeLast()
        bytes.append(UInt8(ascii: array ? "]" : "}"))
    }

    private mutating func key(_ k: String) {
        separator()
        quoted(k)
        bytes.append(UInt8(ascii: ":"))
    }

    private mutating func quoted(_ v: String) {
        bytes.append(UInt8(ascii: "\""))
        for b in v.utf8 {
            switch b {
            case UInt8(ascii: "\""): bytes += [UInt8(ascii: "\\"), UInt8(ascii: "\"")]
            case UInt8(ascii: "\\"): bytes += [UInt8(ascii: "\\"), UInt8(ascii: "\\")]
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                bytes += [UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"), hex[Int(b >> 4)], hex[Int(b & 15)]]
            default: bytes.append(b)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }

    mutating func field(_ k: String, _ v: String) { key(k); quoted(v) }
    mutating func element<I: BinaryInteger>(_ v: I) { separator(); bytes += Array(String(v).utf8) }
    mutating func field<I: BinaryInteger>(_ k: String, _ v: I) { key(k); bytes += Array(String(v).utf8) }
    mutating func field(_ k: String, _ v: Bool) { key(k); bytes += Array((v ? "true" : "false").utf8) }
    mutating func field(_ k: String, _ v: [String: String]) {
        open(k)
        for (mk, mv) in v.sorted(by: { $0.key < $1.key }) { field(mk, mv) }
        close()
    }
    mutating func field(_ k: String, _ v: [String]) {
        open(k, array: true)
        for item in v { separator(); quoted(item) }
        close(array: true)
    }
    mutating func field(_ k: String, _ v: WallTime?) {
        guard let v else { return }
        open(k)
        field("seconds", v.seconds)
        field("nanos", v.nanos)
        close()
    }
}

extension JSONWriter {
    mutating func process(_ p: ProcessRecord) {
        field("id", p.id)
        field("stdin", p.stdin)
        field("stdout", p.stdout)
        field("stderr", p.stderr)
        field("terminal", p.terminal)
        field("pid", p.pid)
        field("startTime", p.startTime)
        if let v = p.exitCode { field("exitCode", v) }
        if let v = p.exitStatus { field("exitStatus", v) }
        field("exitedAt", p.exitedAt)
    }
}

extension SandboxRecord {
    func json() -> [UInt8] {
        var w = JSONWriter()
        w.open()
        w.field("version", version)
        w.field("id", id)
        if let kind { w.field("kind", kind) }
        if let sandboxer { w.field("sandboxer", sandboxer) }
        if let backendState { w.field("backendState", backendState) }
        if let taskAddress { w.field("taskAddress", taskAddress) }
        if let taskVersion { w.field("taskVersion", taskVersion) }
        w.field("namespace", namespace)
        w.field("eventsAddress", eventsAddress)
        w.field("state", state)
        w.field("createdAt", createdAt)
        w.field("exitedAt", exitedAt)
        w.field("labels", labels)
        if let extensions {
            w.open("extensions")
            for (k, e) in extensions.sorted(by: { $0.key < $1.key }) {
                w.open(k)
                w.field("typeURL", e.typeURL)
                w.open("value", array: true)
                for b in e.value { w.element(b) }
                w.close(array: true)
                w.close()
            }
            w.close()
        }
        w.field("pinned", pinned)
        w.field("cgroupRoot", cgroupRoot)
        if let pod { w.field("pod", pod) }
        if let holderPid { w.field("holderPid", holderPid) }
        if let holderStartTime { w.field("holderStartTime", holderStartTime) }
        if let shm { w.field("shm", shm) }
        if let exitCode { w.field("exitCode", exitCode) }
        if let exitStatus { w.field("exitStatus", exitStatus) }
        w.open("containers", array: true)
        for c in containers {
            w.open()
            w.field("id", c.id)
            w.field("bundle", c.bundle)
            w.field("rootfs", c.rootfs)
            w.field("ownedMounts", c.ownedMounts)
            w.field("state", c.state)
            w.open("process")
            w.process(c.process)
            w.close()
            if let execs = c.execs {
                w.open("execs", array: true)
                for e in execs {
                    w.open()
                    w.process(e)
                    w.close()
                }
                w.close(array: true)
            }
            w.close()
        }
        w.close(array: true)
        w.close()
        return w.bytes
    }
}

/// Ids of sandboxes the Controller has shut down, so that a repeated Shutdown (containerd
/// retries one that timed out, also across our restarts) answers OK rather than NotFound.
/// Bounded: the newest `capacity` are kept (older ones answer NotFound, which containerd
/// also takes as "already gone"). One line per id appended to `<root>/shutdown.log`,
/// rewritten atomically with the newest ones when it holds twice as many.
public final class ShutdownLog {
    public static let capacity = 1024
    let path: String
    private var order: [String] = []
    private var ids = Set<String>()
    private var lines = 0

    public init(root: String) {
        path = root + "/shutdown.log"
        guard let bytes = try? Files.read(path, limit: 4 << 20) else { return }
        for line in bytes.split(separator: UInt8(ascii: "\n")) {
            let id = String(decoding: line, as: UTF8.self)
            // A torn last line (a crash mid-append) or a hand edit is skipped.
            guard (try? Identifier.validate(id, what: "sandbox")) != nil else { continue }
            lines += 1
            remember(id)
        }
    }

    public func contains(_ id: String) -> Bool { ids.contains(id) }
    public var count: Int { ids.count }

    public func insert(_ id: String) {
        guard !ids.contains(id) else { return }
        remember(id)
        lines += 1
        if lines > 2 * Self.capacity {
            try? Files.writeAtomically(path, Array(order.map { $0 + "\n" }.joined().utf8), mode: 0o600)
            lines = order.count
            return
        }
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        let line = Array((id + "\n").utf8)
        _ = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        _ = close(fd)
    }

    private func remember(_ id: String) {
        guard ids.insert(id).inserted else { return }
        order.append(id)
        if order.count > Self.capacity { ids.remove(order.removeFirst()) }
    }
}
