#if canImport(Glibc)
import Glibc
#endif
import KuasarOCI

/// systemd's notification protocol (sd_notify(3)) without libsystemd: datagrams such as
/// "READY=1" to the unix socket named by NOTIFY_SOCKET ('@' is the abstract namespace).
/// Nothing happens when the variable is unset (not started by systemd).
public struct SystemdNotify: Sendable {
    public let socketPath: String
    /// WATCHDOG_USEC, when the unit asks for watchdog pings.
    public let watchdogUSec: UInt64?

    public init?(environment: [String: String]) {
        guard let path = environment["NOTIFY_SOCKET"], !path.isEmpty, path.hasPrefix("/") || path.hasPrefix("@") else { return nil }
        socketPath = path
        watchdogUSec = environment["WATCHDOG_USEC"].flatMap(UInt64.init).flatMap { $0 > 0 ? $0 : nil }
    }

    /// Sends one message; the state goes in newline-separated assignments.
    public func send(_ state: String) throws(SystemError) {
        let fd = try sys("socket(AF_UNIX, SOCK_DGRAM)") { socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        defer { _ = close(fd) }
        let payload = Array(state.utf8)
        _ = try Socket.withUnixAddress(socketPath, "sendto") { (addr, len) throws(SystemError) in
            try sys("sendto", socketPath) { sendto(fd, payload, payload.count, Int32(MSG_NOSIGNAL), addr, len) }
        }
    }
}
