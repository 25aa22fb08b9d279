#if canImport(Glibc)
import Glibc
#endif
import CShims

/// Whether this host's KVM really runs guests: a forked child runs a few bytes of
/// real-mode code under KVM and exits 0 once it reached its marker. The daemon watches
/// the child on its loop (`start`, `describe`); the CLI waits for it (`run`).
public enum KVMProbe {
    public static let timeoutMS = 2000

    /// Starts the probe child; the caller watches it and kills it past `timeoutMS`.
    public static func start() throws(SystemError) -> SpawnedProcess {
        let pid = try sys("fork", "KVM probe") { ks_kvm_probe_fork() }
        guard let fd = openPidfd(pid) else {
            // Ours and not waited for yet: it cannot have been reaped.
            _ = kill(pid, SIGKILL)
            _ = waitpid(pid, nil, 0)
            throw SystemError("pidfd_open", "KVM probe", errno: .ESRCH)
        }
        return SpawnedProcess(pid: pid, pidfd: OwnedFD(adopting: fd))
    }

    /// What the child's end says: passed, or the step that failed.
    public static func describe(_ status: ExitStatus?) -> (ran: Bool, detail: String) {
        switch status {
        case .exited(let code):
            var buf = [CChar](repeating: 0, count: 256)
            let ran = ks_kvm_probe_describe(code, &buf, buf.count) == 1
            return (ran, String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
        case .signaled(SIGKILL, _):
            return (false, "a test guest did not reach its marker within \(timeoutMS) ms")
        case .signaled(let sig, _):
            return (false, "the probe died of signal \(sig)")
        case nil:
            return (false, "the probe's status is unknown")
        }
    }

    /// Starts the probe and waits for it (at most `timeoutMS`): for the CLI, never the loop.
    public static func run() -> (ran: Bool, detail: String) {
        let child: SpawnedProcess
        do { child = try start() } catch { return (false, "\(error)") }
        var p = pollfd(fd: child.pidfd.rawValue, events: Int16(POLLIN), revents: 0)
        if poll(&p, 1, Int32(timeoutMS)) != 1 { try? sendSignal(pidfd: child.pidfd.rawValue, SIGKILL) }
        return describe(try? Spawner.wait(child))
    }

    /// A para-virtualised KVM (PVM: the host is a guest itself) runs only guest kernels
    /// built for it, though it passes the real-mode probe.
    public static var isPVM: Bool { access("/sys/module/kvm_pvm", F_OK) == 0 }
}
