#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The OCI runtime spec (config.json, 1.0–1.2): the fields this runtime acts on. Fields
/// it cannot honour on this host (AppArmor, SELinux, Intel RDT, ...) are decoded so they
/// can be reported once, then ignored, as runc does when the host lacks them.
public struct OCISpec: Codable, Sendable {
    public var ociVersion: String
    public var process: Process?
    public var root: Root?
    public var hostname: String?
    public var domainname: String?
    public var mounts: [Mount]?
    public var hooks: Hooks?
    public var annotations: [String: String]?
    public var linux: Linux?

    public init(ociVersion: String) { self.ociVersion = ociVersion }

    public struct Process: Codable, Sendable {
        public var terminal: Bool?
        public var consoleSize: ConsoleSize?
        public var user: User
        public var args: [String]?
        public var env: [String]?
        public var cwd: String
        public var capabilities: Capabilities?
        public var rlimits: [Rlimit]?
        public var noNewPrivileges: Bool?
        public var apparmorProfile: String?
        public var oomScoreAdj: Int?
        public var selinuxLabel: String?
        public init(args: [String], env: [String] = [], cwd: String = "/", user: User = User(uid: 0, gid: 0)) {
            self.args = args
            self.env = env
            self.cwd = cwd
            self.user = user
        }
    }
    public struct ConsoleSize: Codable, Sendable {
        public var height: UInt32
        public var width: UInt32
        public init(height: UInt32, width: UInt32) { self.height = height; self.width = width }
    }
    public struct User: Codable, Sendable {
        public var uid: UInt32
        public var gid: UInt32
        public var umask: UInt32?
        public var additionalGids: [UInt32]?
        public init(uid: UInt32, gid: UInt32) { self.uid = uid; self.gid = gid }
    }
    public struct Capabilities: Codable, Sendable {
        public var bounding, effective, inheritable, permitted, ambient: [String]?
        public init(bounding: [String]? = nil, effective: [String]? = nil, inheritable: [String]? = nil, permitted: [String]? = nil, ambient: [String]? = nil) {
            self.bounding = bounding
            self.effective = effective
            self.inheritable = inheritable
            self.permitted = permitted
            self.ambient = ambient
        }
    }
    public struct Rlimit: Codable, Sendable {
        public var type: String
        public var hard: UInt64
        public var soft: UInt64
        public init(type: String, hard: UInt64, soft: UInt64) {
            self.type = type
            self.hard = hard
            self.soft = soft
        }
    }
    public struct Root: Codable, Sendable {
        public var path: String
        public var readonly: Bool?
        public init(path: String, readonly: Bool? = nil) {
            self.path = path
            self.readonly = readonly
        }
    }
    public struct Mount: Codable, Sendable {
        public var destination: String
        public var type: String?
        public var source: String?
        public var options: [String]?
        public init(destination: String, type: String?, source: String?, options: [String]?) {
            self.destination = destination; self.type = type; self.source = source; self.options = options
        }
    }
    public struct Hook: Codable, Sendable {
        public var path: String
        public var args: [String]?
        public var env: [String]?
        public var timeout: Int?
        public init(path: String, args: [String]? = nil, env: [String]? = nil, timeout: Int? = nil) {
            self.path = path
            self.args = args
            self.env = env
            self.timeout = timeout
        }
    }
    public struct Hooks: Codable, Sendable {
        public var prestart, createRuntime, createContainer, startContainer, poststart, poststop: [Hook]?
        public init(prestart: [Hook]? = nil, createRuntime: [Hook]? = nil, createContainer: [Hook]? = nil, startContainer: [Hook]? = nil, poststart: [Hook]? = nil, poststop: [Hook]? = nil) {
            self.prestart = prestart
            self.createRuntime = createRuntime
            self.createContainer = createContainer
            self.startContainer = startContainer
            self.poststart = poststart
            self.poststop = poststop
        }
    }
    public struct IDMapping: Codable, Sendable {
        public var containerID: UInt32
        public var hostID: UInt32
        public var size: UInt32
        public init(containerID: UInt32, hostID: UInt32, size: UInt32) {
            self.containerID = containerID
            self.hostID = hostID
            self.size = size
        }
    }
    public struct Namespace: Codable, Sendable {
        public var type: String
        public var path: String?
        public init(type: String, path: String? = nil) { self.type = type; self.path = path }
    }
    public struct Device: Codable, Sendable {
        public var type: String
        public var path: String
        public var major: Int64?
        public var minor: Int64?
        public var fileMode: UInt32?
        public var uid: UInt32?
        public var gid: UInt32?
        public init(type: String, path: String, major: Int64? = nil, minor: Int64? = nil, fileMode: UInt32? = nil, uid: UInt32? = nil, gid: UInt32? = nil) {
            self.type = type
            self.path = path
            self.major = major
            self.minor = minor
            self.fileMode = fileMode
            self.uid = uid
            self.gid = gid
        }
    }
    public struct Linux: Codable, Sendable {
        public var uidMappings: [IDMapping]?
        public var gidMappings: [IDMapping]?
        public var sysctl: [String: String]?
        public var resources: Resources?
        public var cgroupsPath: String?
        public var namespaces: [Namespace]?
        public var devices: [Device]?
        public var seccomp: Seccomp?
        public var rootfsPropagation: String?
        public var maskedPaths: [String]?
        public var readonlyPaths: [String]?
        public var mountLabel: String?
        public var intelRdt: IgnoredField?
        public var personality: IgnoredField?
        public init() {}
    }
    public struct Resources: Codable, Sendable {
        public var memory: Memory?
        public var cpu: CPU?
        public var pids: Pids?
        public var blockIO: BlockIO?
        public var devices: [DeviceRule]?
        public var hugepageLimits: IgnoredField?
        public var network: IgnoredField?
        public var rdma: IgnoredField?
        public var unified: [String: String]?
        public init() {}
    }
    public struct DeviceRule: Codable, Sendable {
        public var allow: Bool
        public var type: String?
        public var major: Int64?
        public var minor: Int64?
        public var access: String?
        public init(allow: Bool, type: String? = nil, major: Int64? = nil, minor: Int64? = nil, access: String? = nil) {
            self.allow = allow
            self.type = type
            self.major = major
            self.minor = minor
            self.access = access
        }
    }
    public struct Memory: Codable, Sendable {
        public var limit: Int64?
        public var reservation: Int64?
        public var swap: Int64?
        public var kernel: Int64?
        public var kernelTCP: Int64?
        public var swappiness: UInt64?
        public var disableOOMKiller: Bool?
        public init(limit: Int64? = nil, reservation: Int64? = nil, swap: Int64? = nil, kernel: Int64? = nil, kernelTCP: Int64? = nil, swappiness: UInt64? = nil, disableOOMKiller: Bool? = nil) {
            self.limit = limit
            self.reservation = reservation
            self.swap = swap
            self.kernel = kernel
            self.kernelTCP = kernelTCP
            self.swappiness = swappiness
            self.disableOOMKiller = disableOOMKiller
        }
    }
    public struct CPU: Codable, Sendable {
        public var shares: UInt64?
        public var quota: Int64?
        public var period: UInt64?
        public var realtimeRuntime: Int64?
        public var realtimePeriod: UInt64?
        public var cpus: String?
        public var mems: String?
        public init(shares: UInt64? = nil, quota: Int64? = nil, period: UInt64? = nil, realtimeRuntime: Int64? = nil, realtimePeriod: UInt64? = nil, cpus: String? = nil, mems: String? = nil) {
            self.shares = shares
            self.quota = quota
            self.period = period
            self.realtimeRuntime = realtimeRuntime
            self.realtimePeriod = realtimePeriod
            self.cpus = cpus
            self.mems = mems
        }
    }
    public struct Pids: Codable, Sendable {
        public var limit: Int64
        public init(limit: Int64) { self.limit = limit }
    }
    public struct BlockIO: Codable, Sendable {
        public var weight: UInt16?
        public init(weight: UInt16? = nil) { self.weight = weight }
    }
    public struct Seccomp: Codable, Sendable {
        public var defaultAction: String
        public var defaultErrnoRet: UInt32?
        public var architectures: [String]?
        public var flags: [String]?
        public var listenerPath: String?
        public var syscalls: [Syscall]?
        public init(defaultAction: String, defaultErrnoRet: UInt32? = nil, architectures: [String]? = nil, flags: [String]? = nil, listenerPath: String? = nil, syscalls: [Syscall]? = nil) {
            self.defaultAction = defaultAction
            self.defaultErrnoRet = defaultErrnoRet
            self.architectures = architectures
            self.flags = flags
            self.listenerPath = listenerPath
            self.syscalls = syscalls
        }
    }
    public struct Syscall: Codable, Sendable {
        public var names: [String]
        public var action: String
        public var errnoRet: UInt32?
        public var args: [SyscallArg]?
        public init(names: [String], action: String, errnoRet: UInt32? = nil, args: [SyscallArg]? = nil) {
            self.names = names
            self.action = action
            self.errnoRet = errnoRet
            self.args = args
        }
    }
    public struct SyscallArg: Codable, Sendable {
        public var index: UInt32
        public var value: UInt64
        public var valueTwo: UInt64?
        public var op: String
        public init(index: UInt32, value: UInt64, valueTwo: UInt64? = nil, op: String) {
            self.index = index
            self.value = value
            self.valueTwo = valueTwo
            self.op = op
        }
    }
    /// A field we decode only to notice that it is there.
    public struct IgnoredField: Codable, Sendable {
        public init(from decoder: Decoder) throws {}
        public func encode(to encoder: Encoder) throws {}
    }
}

/// An invalid spec, naming the field: `linux.namespaces[1].type: unknown namespace "foo"`.
public struct SpecError: Error, CustomStringConvertible, Sendable {
    public let field: String
    public let problem: String
    public init(_ field: String, _ problem: String) { self.field = field; self.problem = problem }
    public var description: String { "invalid OCI spec: \(field): \(problem)" }
}

extension OCISpec {
    /// Decodes config.json; a JSON or type error names the path of the bad field.
    public static func decode(_ data: [UInt8]) throws(SpecError) -> OCISpec {
        do {
            return try JSONDecoder().decode(OCISpec.self, from: Data(data))
        } catch let DecodingError.keyNotFound(key, ctx) {
            throw SpecError(Self.path(ctx.codingPath + [key]), "required field is missing")
        } catch let DecodingError.typeMismatch(_, ctx) {
            throw SpecError(Self.path(ctx.codingPath), "wrong type: \(ctx.debugDescription)")
        } catch let DecodingError.valueNotFound(_, ctx) {
            throw SpecError(Self.path(ctx.codingPath), "null where a value is required")
        } catch let DecodingError.dataCorrupted(ctx) {
            throw SpecError(ctx.codingPath.isEmpty ? "config.json" : Self.path(ctx.codingPath), "not valid JSON: \(ctx.debugDescription)")
        } catch {
            throw SpecError("config.json", "\(error)")
        }
    }

    static func path(_ keys: [CodingKey]) -> String {
        var out = ""
        for k in keys {
            if let i = k.intValue { out += "[\(i)]" } else { out += (out.isEmpty ? "" : ".") + k.stringValue }
        }
        return out.isEmpty ? "config.json" : out
    }

    public static let namespaceTypes = ["pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"]

    /// Checks what decoding cannot: values, references and combinations.
    public func validate(requireProcess: Bool = true) throws(SpecError) {
        guard ociVersion.hasPrefix("1.") else { throw SpecError("ociVersion", "\"\(ociVersion)\" is not a 1.x runtime spec") }
        if requireProcess {
            guard let process else { throw SpecError("process", "required to create a container") }
            try OCISpec.validate(process: process, field: "process")
        }
        guard let root, !root.path.isEmpty else { throw SpecError("root.path", "required") }
        for (i, m) in (mounts ?? []).enumerated() {
            guard m.destination.hasPrefix("/") else { throw SpecError("mounts[\(i)].destination", "\"\(m.destination)\" must be absolute") }
            if m.destination.split(separator: "/").contains("..") {
                throw SpecError("mounts[\(i)].destination", "\"\(m.destination)\" must not contain \"..\"")
            }
            for o in m.options ?? [] where MountOptions.flag(o) == nil && MountOptions.isUnknownFlagLike(o) {
                throw SpecError("mounts[\(i)].options", "unknown option \"\(o)\"")
            }
        }
        guard let linux else {
            if let hostname, !hostname.isEmpty { throw SpecError("hostname", "needs a uts namespace (linux.namespaces)") }
            return
        }
        var seen = Set<String>()
        for (i, n) in (linux.namespaces ?? []).enumerated() {
            guard OCISpec.namespaceTypes.contains(n.type) else { throw SpecError("linux.namespaces[\(i)].type", "unknown namespace \"\(n.type)\"") }
            guard seen.insert(n.type).inserted else { throw SpecError("linux.namespaces[\(i)].type", "namespace \"\(n.type)\" listed twice") }
            if let p = n.path, !p.hasPrefix("/") { throw SpecError("linux.namespaces[\(i)].path", "\"\(p)\" must be absolute") }
        }
        if let hostname, !hostname.isEmpty {
            let ns = linux.namespaces ?? []
            guard ns.contains(where: { $0.type == "uts" }) else { throw SpecError("hostname", "needs a uts namespace (linux.namespaces)") }
        }
        if seen.contains("user") && (linux.namespaces?.first { $0.type == "user" }?.path == nil) {
            if (linux.uidMappings ?? []).isEmpty || (linux.gidMappings ?? []).isEmpty {
                throw SpecError("linux.uidMappings", "a new user namespace needs uidMappings and gidMappings")
            }
        }
        for (i, d) in (linux.devices ?? []).enumerated() {
            guard ["c", "b", "u", "p"].contains(d.type) else { throw SpecError("linux.devices[\(i)].type", "\"\(d.type)\" is not c, b, u or p") }
            guard d.path.hasPrefix("/dev/") else { throw SpecError("linux.devices[\(i)].path", "\"\(d.path)\" must be under /dev") }
            if d.type != "p" && (d.major == nil || d.minor == nil) { throw SpecError("linux.devices[\(i)]", "major and minor are required for type \(d.type)") }
        }
        if let p = linux.rootfsPropagation, MountOptions.propagation(p) == nil {
            throw SpecError("linux.rootfsPropagation", "unknown propagation \"\(p)\"")
        }
        for key in (linux.sysctl ?? [:]).keys where key.contains("/") || key.contains("..") || key.isEmpty {
            throw SpecError("linux.sysctl", "bad key \"\(key)\"")
        }
        if let s = linux.seccomp {
            guard SeccompNames.action(s.defaultAction, errno: s.defaultErrnoRet) != nil else { throw SpecError("linux.seccomp.defaultAction", "unknown action \"\(s.defaultAction)\"") }
            for a in s.architectures ?? [] where SeccompNames.arch(a) == nil { throw SpecError("linux.seccomp.architectures", "unknown architecture \"\(a)\"") }
            for (i, sc) in (s.syscalls ?? []).enumerated() {
                guard SeccompNames.action(sc.action, errno: sc.errnoRet) != nil else { throw SpecError("linux.seccomp.syscalls[\(i)].action", "unknown action \"\(sc.action)\"") }
                for (j, a) in (sc.args ?? []).enumerated() where SeccompNames.op(a.op) == nil || a.index > 5 {
                    throw SpecError("linux.seccomp.syscalls[\(i)].args[\(j)]", "bad index \(a.index) or op \"\(a.op)\"")
                }
            }
        }
        if let cpu = linux.resources?.cpu, let q = cpu.quota, q > 0, let p = cpu.period, p == 0 {
            throw SpecError("linux.resources.cpu.period", "must be positive when a quota is set")
        }
    }

    public static func validate(process p: Process, field: String) throws(SpecError) {
        guard let args = p.args, !args.isEmpty, !args[0].isEmpty else { throw SpecError("\(field).args", "at least the program to run is required") }
        guard p.cwd.hasPrefix("/") else { throw SpecError("\(field).cwd", "\"\(p.cwd)\" must be absolute") }
        for (name, list) in [("bounding", p.capabilities?.bounding), ("effective", p.capabilities?.effective),
                             ("inheritable", p.capabilities?.inheritable), ("permitted", p.capabilities?.permitted),
                             ("ambient", p.capabilities?.ambient)] {
            for c in list ?? [] where CapabilityNames.number(c) == nil {
                throw SpecError("\(field).capabilities.\(name)", "unknown capability \"\(c)\"")
            }
        }
        for (i, r) in (p.rlimits ?? []).enumerated() {
            guard Rlimits.resource(r.type) != nil else { throw SpecError("\(field).rlimits[\(i)].type", "unknown rlimit \"\(r.type)\"") }
            guard r.soft <= r.hard else { throw SpecError("\(field).rlimits[\(i)]", "soft \(r.soft) exceeds hard \(r.hard)") }
        }
        if let o = p.oomScoreAdj, o < -1000 || o > 1000 { throw SpecError("\(field).oomScoreAdj", "\(o) is outside -1000...1000") }
        for (i, e) in (p.env ?? []).enumerated() where !e.contains("=") {
            throw SpecError("\(field).env[\(i)]", "\"\(e)\" is not KEY=value")
        }
    }

    /// Fields present that this runtime ignores (logged once per container).
    public var ignoredFields: [String] {
        var out: [String] = []
        if process?.apparmorProfile?.isEmpty == false { out.append("process.apparmorProfile") }
        if process?.selinuxLabel?.isEmpty == false { out.append("process.selinuxLabel") }
        if linux?.mountLabel?.isEmpty == false { out.append("linux.mountLabel") }
        if linux?.intelRdt != nil { out.append("linux.intelRdt") }
        if linux?.personality != nil { out.append("linux.personality") }
        if linux?.resources?.hugepageLimits != nil { out.append("linux.resources.hugepageLimits") }
        if linux?.resources?.network != nil { out.append("linux.resources.network") }
        if linux?.resources?.rdma != nil { out.append("linux.resources.rdma") }
        if linux?.seccomp?.listenerPath != nil { out.append("linux.seccomp.listenerPath") }
        if !(hooks?.prestart ?? []).isEmpty { out.append("hooks.prestart (deprecated; run as createRuntime)") }
        return out
    }
}

/// Capability names to numbers (linux/capability.h).
public enum CapabilityNames {
    package static let names = [
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
        "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN",
        "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
        "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
    ]
    public static func number(_ name: String) -> Int? { names.firstIndex(of: name) }
    package static func mask(_ list: [String]?) -> UInt64 {
        (list ?? []).reduce(0) { acc, n in number(n).map { acc | (1 << UInt64($0)) } ?? acc }
    }
}

public enum Rlimits {
    static let table: [String: Int32] = [
        "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4, "RLIMIT_RSS": 5,
        "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10,
        "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
    ]
    package static func resource(_ name: String) -> Int32? { table[name] }
}

/// OCI seccomp names to libseccomp values (seccomp.h).
public enum SeccompNames {
    /// SCMP_ACT_* → libseccomp's action value; ERRNO and TRACE carry their errno in the low bits.
    package static let actions: [String: UInt32] = [
        "SCMP_ACT_KILL": 0x0000_0000, "SCMP_ACT_KILL_THREAD": 0x0000_0000, "SCMP_ACT_KILL_PROCESS": 0x8000_0000,
        "SCMP_ACT_TRAP": 0x0003_0000, "SCMP_ACT_ERRNO": 0x0005_0000, "SCMP_ACT_TRACE": 0x7ff0_0000,
        "SCMP_ACT_LOG": 0x7ffc_0000, "SCMP_ACT_ALLOW": 0x7fff_0000,
    ]
    package static let arches: [String: UInt32] = [
        "SCMP_ARCH_X86_64": 0xC000_003E, "SCMP_ARCH_X86": 0x4000_0003, "SCMP_ARCH_X32": 0x4000_003E,
        "SCMP_ARCH_AARCH64": 0xC000_00B7, "SCMP_ARCH_ARM": 0x4000_0028, "SCMP_ARCH_RISCV64": 0xC000_00F3,
        "SCMP_ARCH_PPC64LE": 0xC000_0015, "SCMP_ARCH_S390X": 0x8000_0016,
    ]
    package static let operators: [String: Int32] = [
        "SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
        "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7,
    ]

    package static func action(_ name: String, errno: UInt32?) -> UInt32? {
        guard let base = actions[name] else { return nil }
        return name == "SCMP_ACT_ERRNO" || name == "SCMP_ACT_TRACE" ? base | ((errno ?? 1) & 0xffff) : base
    }
    package static func arch(_ name: String) -> UInt32? { arches[name] }
    package static func op(_ name: String) -> Int32? { operators[name] }
}

/// mount(8)-style options to MS_* flags.
public enum MountOptions {
    // MS_ values from sys/mount.h.
    package static let RDONLY: UInt = 1, NOSUID: UInt = 2, NODEV: UInt = 4, NOEXEC: UInt = 8, SYNCHRONOUS: UInt = 16
    package static let REMOUNT: UInt = 32, MANDLOCK: UInt = 64, DIRSYNC: UInt = 128, NOATIME: UInt = 1024
    package static let NODIRATIME: UInt = 2048, BIND: UInt = 4096, REC: UInt = 16384, SILENT: UInt = 32768
    static let UNBINDABLE: UInt = 1 << 17, PRIVATE: UInt = 1 << 18, SLAVE: UInt = 1 << 19, SHARED: UInt = 1 << 20
    static let RELATIME: UInt = 1 << 21, STRICTATIME: UInt = 1 << 24

    /// Flag options → (set, clear); anything else is filesystem data.
    package static let flags: [String: (set: UInt, clear: UInt)] = [
        "ro": (RDONLY, 0), "rw": (0, RDONLY), "nosuid": (NOSUID, 0), "suid": (0, NOSUID),
        "nodev": (NODEV, 0), "dev": (0, NODEV), "noexec": (NOEXEC, 0), "exec": (0, NOEXEC),
        "sync": (SYNCHRONOUS, 0), "async": (0, SYNCHRONOUS), "dirsync": (DIRSYNC, 0),
        "mand": (MANDLOCK, 0), "nomand": (0, MANDLOCK), "noatime": (NOATIME, 0), "atime": (0, NOATIME),
        "nodiratime": (NODIRATIME, 0), "diratime": (0, NODIRATIME), "relatime": (RELATIME, 0),
        "norelatime": (0, RELATIME), "strictatime": (STRICTATIME, 0), "bind": (BIND, 0), "rbind": (BIND | REC, 0),
        "remount": (REMOUNT, 0), "defaults": (0, 0), "silent": (0, 0), "loud": (0, 0),
    ]
    package static let propagations: [String: UInt] = [
        "private": PRIVATE, "rprivate": PRIVATE | REC, "shared": SHARED, "rshared": SHARED | REC,
        "slave": SLAVE, "rslave": SLAVE | REC, "unbindable": UNBINDABLE, "runbindable": UNBINDABLE | REC,
    ]

    /// (set, clear) for a flag option; nil when it is not a flag (then it is fs data).
    package static func flag(_ o: String) -> (set: UInt, clear: UInt)? {
        flags[o] ?? propagation(o).map { ($0, 0) }
    }

    package static func propagation(_ o: String) -> UInt? { propagations[o] }

    /// Options that look like a flag but are none of ours (fs data has "=" or is
    /// filesystem specific; we only refuse obvious typos of the common flags).
    static func isUnknownFlagLike(_ o: String) -> Bool {
        ["r", "w", "rdonly", "read-only", "nosuids", "nodevs"].contains(o)
    }
}
