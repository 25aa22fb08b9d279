#if canImport(Glibc)
import Glibc
#endif
import CShims
import KuasarOCI

/// Signal masks and signalfds. A signal is read from a signalfd only if it is blocked
/// in every thread that could otherwise take it, so the daemon blocks its signals on
/// the main thread before any other thread starts (threads inherit the mask).
public enum Signals {
    public static func block(_ signals: [Int32]) throws(SystemError) {
        _ = try shim("pthread_sigmask(SIG_BLOCK)") { ks_sigmask(Int32(KS_SIG_BLOCK), signals, Int32(signals.count)) }
    }

    public static func unblock(_ signals: [Int32]) throws(SystemError) {
        _ = try shim("pthread_sigmask(SIG_UNBLOCK)") { ks_sigmask(Int32(KS_SIG_UNBLOCK), signals, Int32(signals.count)) }
    }

    public static func makeSignalFD(_ signals: [Int32]) throws(SystemError) -> OwnedFD {
        OwnedFD(adopting: try shim("signalfd") { ks_signalfd(-1, signals, Int32(signals.count)) })
    }

    /// Makes this process its descendants' subreaper: what an OCI runtime forks and leaves
    /// behind (a container's init, a detached exec) becomes our child, to be watched by
    /// pidfd and reaped here.
    public static func becomeChildSubreaper() throws(SystemError) {
        let rc = ks_set_child_subreaper()
        if rc < 0 { throw SystemError("prctl(PR_SET_CHILD_SUBREAPER)", nil, errno: Errno(rawValue: -rc)) }
    }

    /// SIGPIPE would kill the daemon on a write to a closed socket; EPIPE is enough.
    public static func ignoreSIGPIPE() {
        _ = ks_ignore_signal(SIGPIPE)
    }

    /// The calling thread's kernel id, to direct a signal at exactly this thread.
    public static func currentThreadID() -> pid_t { ks_gettid() }

    public static func sendToThread(_ tid: pid_t, _ signal: Int32) throws(SystemError) {
        _ = try shim("tgkill", "tid \(tid)") { ks_tgkill(getpid(), tid, signal) }
    }
}
