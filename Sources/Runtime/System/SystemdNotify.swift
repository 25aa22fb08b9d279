#if canImport(Glibc)
import Glibc
#endif

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
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(socketPath.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw SystemError("sd_notify", socketPath, errno: .EINVAL)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in
            for (i, b) in bytes.enumerated() { dst[i] = b }
        }
        let len = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let payload = Array(state.utf8)
        _ = try sys("sendto", socketPath) {
            withUnsafePointer(to: &addr) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, payload, payload.count, Int32(MSG_NOSIGNAL), $0, len) }
            }
        }
    }
}
