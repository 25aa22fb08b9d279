#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem
import KuasarWire

/// A pod's /etc/hostname, /etc/hosts and /etc/resolv.conf, kept in its state directory
/// and bound into its containers (`Sandbox.adapt`): written alike by every kind that makes
/// pods (the namespace kind's holder pods, the guest agent's VM pod).
public enum PodFiles {
    public static let defaultHosts = """
        127.0.0.1\tlocalhost
        ::1\tlocalhost ip6-localhost ip6-loopback
        fe00::0\tip6-localnet
        ff00::0\tip6-mcastprefix
        ff02::1\tip6-allnodes
        ff02::2\tip6-allrouters

        """

    /// resolv.conf from the CRI's DNS config (servers, then search, then options).
    public static func resolvConf(servers: [String], searches: [String], options: [String]) -> String {
        var text = servers.map { "nameserver \($0)\n" }.joined()
        if !searches.isEmpty { text += "search \(searches.joined(separator: " "))\n" }
        if !options.isEmpty { text += "options \(options.joined(separator: " "))\n" }
        return text
    }

    /// As containerd does for a pod without a DNS config: the node's.
    public static func nodeResolvConf() -> String { (try? Files.readString("/etc/resolv.conf")) ?? "" }

    /// A pod's hostname from the CRI must be one a kernel takes: at most 64 bytes, no NUL.
    public static func check(hostname: String) throws(RPCError) {
        guard hostname.utf8.count <= 64, !hostname.contains("\0") else {
            throw RPCError(.invalidArgument, "options: hostname \"\(hostname.prefix(80))\" is longer than 64 bytes")
        }
    }

    /// This host's (or guest's) hostname.
    public static func hostname() -> String {
        var buf = [CChar](repeating: 0, count: 256)
        _ = gethostname(&buf, buf.count)
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Writes the three files of `s`; nil leaves that file as it is. In place (no rename,
    /// no fsync: they are remade with the pod, and a rewrite reaches running containers,
    /// whose bind mounts hold the file's inode).
    public static func write(_ s: Sandbox, hostname: String?, hosts: String?, resolvConf: String?) throws(SystemError) {
        for (file, text) in [(s.hostnameFile, hostname.map { $0 + "\n" }), (s.hostsFile, hosts), (s.resolvConfFile, resolvConf)] {
            if let text { try Files.write(file, text, create: true, mode: 0o644) }
        }
    }
}
