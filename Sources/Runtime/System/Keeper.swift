#if canImport(Glibc)
import Glibc
#endif
import CShims
import KuasarOCI

/// The daemon's keeper (CShims/keeper.c): the parent that outlives a daemon crash,
/// reaps the containers the dead daemon leaves behind and records their exit statuses
/// for the next daemon (`ExitRecords`).
public enum Keeper {
    /// The keeper's pid when this process is the daemon it started: KUASAR_KEEPER names
    /// our parent (an inherited variable naming someone else does not count). Read once
    /// and removed, so nothing the daemon starts inherits it.
    public static let pid: pid_t? = {
        guard let v = getenv("KUASAR_KEEPER") else { return nil }
        let named = pid_t(String(cString: v))
        unsetenv("KUASAR_KEEPER")
        return named == getppid() ? named : nil
    }()

    /// Replaces this process with `kuasar-keeper` (found next to `executable`), which
    /// forks and execs `executable` with `arguments` again as the daemon, and stays its
    /// parent. Returns only by throwing.
    public static func become(exitsDir: String, executable: String, arguments: [String]) throws(SystemError) -> Never {
        try makeDirectories(exitsDir, mode: 0o700)
        let dir = executable.lastIndex(of: "/").map { String(executable[..<$0]) } ?? "."
        let keeper = dir + "/kuasar-keeper"
        guard access(keeper, X_OK) == 0 else {
            throw SystemError("keeper", "\(keeper) is missing: it is installed with kuasar (make install), next to it", errno: .ENOENT)
        }
        var cargs: [UnsafeMutablePointer<CChar>?] = ([keeper, exitsDir, executable] + arguments).map { strdup($0) }
        cargs.append(nil)
        execv(keeper, &cargs)
        let e = Errno.current
        for p in cargs { free(p) }
        throw SystemError("execv", keeper, errno: e)
    }
}

/// Exit statuses the keeper recorded, one file per process: `<pid>-<starttime>`
/// holding "<si_code> <si_status>". The start time tells a recycled pid apart.
public struct ExitRecords: Sendable {
    public let dir: String
    public init(dir: String) { self.dir = dir }

    /// The start time of a live process (0 when it is gone).
    public static func startTime(of pid: pid_t) -> UInt64 { UInt64(ks_proc_starttime(pid)) }

    /// A process's parent (field 4 of /proc/<pid>/stat), 0 when it is gone.
    public static func parent(of pid: pid_t) -> pid_t {
        guard let stat = try? Files.readString("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return 0 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 1 ? pid_t(fields[1]) ?? 0 : 0
    }

    /// The file name of a process's record.
    public static func name(pid: pid_t, startTime: UInt64) -> String { "\(pid)-\(startTime)" }

    /// Takes (reads and removes) the record of a process, if the keeper wrote one.
    public func take(pid: pid_t, startTime: UInt64) -> ExitStatus? {
        let path = dir + "/" + Self.name(pid: pid, startTime: startTime)
        guard let text = try? Files.readString(path) else { return nil }
        _ = unlink(path)
        let parts = text.trimmingWhitespace.split(separator: " ")
        guard parts.count == 2, let code = Int32(parts[0]), let status = Int32(parts[1]) else { return nil }
        return ExitStatus(siginfoCode: code, status: status)
    }

    /// Removes records nobody will ask for (processes that were not containers).
    public func removeAll(except keep: Set<String>) {
        for name in Files.list(dir) where !keep.contains(name) { _ = unlink(dir + "/" + name) }
    }
}

/// The keeper's descriptor store (see CShims/keeper.c): terminal masters and stdin
/// pipes the daemon hands over so they outlive it, and that the next daemon takes back.
public final class KeeperStore: Sendable {
    let channel: Int32

    init(channel: Int32) { self.channel = channel }

    /// The channel KUASAR_KEEPER_FD names, when our parent is the keeper that made it.
    /// Read once; the variable is removed and the descriptor made close-on-exec, so
    /// nothing the daemon starts inherits either.
    public static let fromKeeper: KeeperStore? = {
        guard let v = getenv("KUASAR_KEEPER_FD") else { return nil }
        let fd = Int32(String(cString: v)) ?? -1
        unsetenv("KUASAR_KEEPER_FD")
        guard Keeper.pid != nil, fd > 2 else { return nil }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK else { return nil }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return KeeperStore(channel: fd)
    }()

    /// Keeps a duplicate of `fd` under `key` (replacing what the key held).
    public func keep(_ key: String, _ fd: Int32) {
        _ = ks_send_with_fd(channel, "+" + key, ("+" + key).utf8.count, fd)
    }

    public func drop(_ key: String) {
        _ = ks_send_with_fd(channel, "-" + key, ("-" + key).utf8.count, -1)
    }

    /// The socket through which a keeper hands its store to the next daemon.
    public static func socketPath(root: String, keeper: pid_t) -> String { root + "/keepers/\(keeper).sock" }

    /// Takes every descriptor earlier keepers hold (keepers of daemons that died), by key.
    /// A keeper that does not answer is skipped; what it holds stays with it.
    public static func takeOver(root: String, except own: pid_t?) -> [String: Int32] {
        var out: [String: Int32] = [:]
        for name in Files.list(root + "/keepers") where name.hasSuffix(".sock") {
            if let own, name == "\(own).sock" { continue }
            let path = root + "/keepers/" + name
            let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { continue }
            defer { _ = close(fd) }
            var tv = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            let connected: Bool = (try? Socket.withUnixAddress(path, "connect") { addr, len in connect(fd, addr, len) == 0 }) ?? false
            guard connected else {
                // Its keeper is gone (ECONNREFUSED): a stale name.
                _ = unlink(path)
                continue
            }
            guard send(fd, "take", 4, Int32(MSG_NOSIGNAL)) == 4 else { continue }
            var buf = [UInt8](repeating: 0, count: 1024)
            while true {
                var passed: Int32 = -1
                let n = ks_recv_with_fd(fd, &buf, buf.count, &passed)
                if n <= 0 { if passed >= 0 { _ = close(passed) }; break }
                let key = String(decoding: buf[..<n], as: UTF8.self)
                if key == "." { break }
                if passed >= 0 {
                    if let old = out[key] { _ = close(old) }
                    out[key] = passed
                }
            }
        }
        return out
    }
}
