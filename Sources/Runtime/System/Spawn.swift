#if canImport(Glibc)
import Glibc
#endif
import CShims
import KuasarOCI

/// How a child ended.
public enum ExitStatus: Equatable, Hashable, Sendable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32, coreDumped: Bool)

    /// The shell's convention: the exit code, or 128 + signal.
    public var code: Int32 {
        switch self {
        case .exited(let c): return c
        case .signaled(let s, _): return 128 + s
        }
    }

    package init(siginfoCode: Int32, status: Int32) {
        // CLD_EXITED = 1, CLD_KILLED = 2, CLD_DUMPED = 3
        switch siginfoCode {
        case 1: self = .exited(status)
        default: self = .signaled(status, coreDumped: siginfoCode == 3)
        }
    }

    public var description: String {
        switch self {
        case .exited(let c): return "exited with \(c)"
        case .signaled(let s, let core): return "killed by signal \(s)\(core ? " (core dumped)" : "")"
        }
    }
}

/// What to run and with which descriptors.
public struct ProcessSpec: Sendable {
    /// A path, or a bare name looked up in PATH.
    public var executable: String
    /// argv, including argv[0].
    public var arguments: [String]
    /// The environment; nil inherits the caller's.
    public var environment: [String]?
    public var workingDirectory: String?
    /// (parent fd → child fd) pairs. Every other descriptor is closed in the child.
    public var fdMap: [(from: Int32, to: Int32)]
    public var newSession = false
    public var parentDeathSignal: Int32 = 0
    /// Extra clone flags (CLONE_NEW*), for the container engine.
    public var cloneFlags: UInt64 = 0
    /// Run the child on a copy of our memory (clone3) rather than vfork-style on ours:
    /// for children that must wait for the parent before exec. Slower for a large parent.
    public var forkStyle = false
    /// Namespace files (`/proc/<pid>/ns/net`, a pinned ns) the child joins before exec:
    /// net, ipc and uts (a pod's, for a program that serves it).
    public var joinNamespaces: [String] = []

    public init(
        executable: String, arguments: [String]? = nil, environment: [String]? = nil,
        workingDirectory: String? = nil, fdMap: [(from: Int32, to: Int32)] = []
    ) {
        self.executable = executable
        self.arguments = arguments ?? [executable]
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.fdMap = fdMap
    }
}

/// A started child: its pid and the pidfd that owns it.
@frozen public struct SpawnedProcess: ~Copyable {
    public let pid: pid_t
    public var pidfd: OwnedFD
    public init(pid: pid_t, pidfd: consuming OwnedFD) {
        self.pid = pid
        self.pidfd = pidfd
    }
}

/// Starts processes with a pidfd from the start (CLONE_PIDFD: no window where the pid
/// could be recycled) and execs them; the clone-to-exec path is C (CShims' spawn.c).
/// Failure to exec comes back as the child's errno, so "no such file" is an error
/// here, not a mysterious exit 127 later.
public enum Spawner {
    public static func spawn(_ spec: ProcessSpec) throws(SystemError) -> SpawnedProcess {
        let path = try resolve(spec.executable, environment: spec.environment)
        let argv = CStringArray(spec.arguments)
        // An inherited environment is passed as it is, not copied string by string.
        let envp = spec.environment.map { CStringArray($0) }
        defer { argv.free(); envp?.free() }
        let map = spec.fdMap.map { ks_fd_map(from: $0.from, to: $0.to) }
        var nsFDs: [Int32] = []
        defer { for fd in nsFDs { _ = close(fd) } }
        for path in spec.joinNamespaces {
            nsFDs.append(try sys("open", path) { open(path, O_RDONLY | O_CLOEXEC) })
        }

        var pid: pid_t = 0, pidfd: Int32 = -1, stage: Int32 = 0
        let rc: Int32 = path.withCString { cpath in
            let cwd = spec.workingDirectory
            return map.withUnsafeBufferPointer { fds in
                nsFDs.withUnsafeBufferPointer { ns in
                    withOptionalCString(cwd) { ccwd in
                        var attr = ks_spawn_attr(
                            path: cpath, argv: argv.pointer, envp: envp?.pointer ?? UnsafeMutablePointer(environ), cwd: ccwd,
                            fds: fds.baseAddress, fd_count: Int32(fds.count),
                            clone_flags: spec.cloneFlags, new_session: spec.newSession ? 1 : 0,
                            parent_death_signal: spec.parentDeathSignal, fork: spec.forkStyle ? 1 : 0,
                            ns_fds: ns.baseAddress, ns_count: Int32(ns.count))
                        return ks_spawn(&attr, &pid, &pidfd, &stage)
                    }
                }
            }
        }
        if rc < 0 {
            let call: String
            switch stage {
            case 1: call = "dup2"
            case 2: call = "chdir"
            case 3: call = "setsid"
            case 4: call = "sigprocmask"
            case 5: call = "setns"
            default: call = rc == -Errno.ENOSYS.rawValue ? (spec.forkStyle ? "clone3" : "clone") : "execve"
            }
            let subject = stage == 2 ? (spec.workingDirectory ?? "") : stage == 5 ? spec.joinNamespaces.joined(separator: ", ") : path
            throw SystemError(call, subject, errno: Errno(rawValue: -rc))
        }
        return SpawnedProcess(pid: pid, pidfd: OwnedFD(adopting: pidfd))
    }

    /// Finds a bare command name in PATH, like execvp, but before the fork so the
    /// child does nothing that allocates.
    static func resolve(_ name: String, environment: [String]?) throws(SystemError) -> String {
        if name.contains("/") { return name }
        let inherited = environment == nil ? getenv("PATH").map { String(cString: $0) } : nil
        let pathVar = inherited ?? environment?
            .first { $0.hasPrefix("PATH=") }.map { String($0.dropFirst(5)) }
            ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        for dir in pathVar.split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        throw SystemError("execve", name, errno: .ENOENT)
    }

    /// A command's stdout (up to 1 MiB) when it exits 0, waiting for it: for the CLI
    /// (`kuasar info`), never the daemon's loop.
    public static func output(_ path: String, _ args: [String]) -> String? {
        guard let pipe = try? makePipe(nonBlocking: false) else { return nil }
        let null = Glibc.open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { _ = Glibc.close(null) }
        guard let child = try? spawn(ProcessSpec(executable: path, arguments: [path] + args, fdMap: [(null, 0), (pipe.second.rawValue, 1), (null, 2)])) else {
            pipe.first.close()
            pipe.second.close()
            return nil
        }
        pipe.second.close()
        let bytes = (try? pipe.first.readExactly(1 << 20)) ?? []
        pipe.first.close()
        guard (try? wait(child)) == .exited(0) else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The first line of `output`.
    public static func firstLine(_ path: String, _ args: [String]) -> String? {
        output(path, args)?.split(separator: "\n").first.map(String.init)
    }

    /// Waits for a child synchronously (tools and tests; the daemon uses the reactor).
    public static func wait(_ process: consuming SpawnedProcess) throws(SystemError) -> ExitStatus {
        var code: Int32 = 0, status: Int32 = 0
        let pid = process.pid
        let fd = process.pidfd.take()
        defer { _ = Glibc.close(fd) }
        _ = try shim("waitid(P_PIDFD)", "pid \(pid)") { ks_pidfd_wait(fd, 0, &code, &status) }
        return ExitStatus(siginfoCode: code, status: status)
    }
}

/// Sends `signal` through a pidfd, which cannot hit a recycled pid.
public func sendSignal(pidfd: Int32, _ signal: Int32) throws(SystemError) {
    _ = try shim("pidfd_send_signal", "signal \(signal)") { ks_pidfd_send_signal(pidfd, signal) }
}

/// pidfd_open(2) of any process, not only a child (close-on-exec); nil when it is gone.
public func openPidfd(_ pid: pid_t) -> Int32? {
    let fd = ks_pidfd_open(pid)
    return fd >= 0 ? fd : nil
}

public func currentEnvironment() -> [String] {
    var out: [String] = []
    var p = environ
    while let s = p.pointee {
        out.append(String(cString: s))
        p += 1
    }
    return out
}

/// A NULL-terminated `char *[]` that lives until `free()`.
struct CStringArray {
    let pointer: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>
    let count: Int

    init(_ strings: [String]) {
        count = strings.count
        pointer = .allocate(capacity: count + 1)
        for (i, s) in strings.enumerated() { pointer[i] = strdup(s) }
        pointer[count] = nil
    }

    func free() {
        for i in 0..<count { Glibc.free(pointer[i]) }
        pointer.deallocate()
    }
}

func withOptionalCString<R>(_ s: String?, _ body: (UnsafePointer<CChar>?) -> R) -> R {
    guard let s else { return body(nil) }
    return s.withCString { body($0) }
}
