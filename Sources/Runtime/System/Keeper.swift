#if canImport(Glibc)
import Glibc
#endif
import CShims

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

    /// pidfd_open(2) of any process (not only a child); nil when it is gone.
    public static func openPidfd(_ pid: pid_t) -> Int32? {
        let fd = ks_pidfd_open(pid)
        return fd >= 0 ? fd : nil
    }

    /// Takes (reads and removes) the record of a process, if the keeper wrote one.
    public func take(pid: pid_t, startTime: UInt64) -> ExitStatus? {
        let path = "\(dir)/\(pid)-\(startTime)"
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
