/// Clone flags for namespaces (sched.h).
public enum NamespaceFlag {
    public static let mount: UInt64 = 0x0002_0000
    public static let cgroup: UInt64 = 0x0200_0000
    public static let uts: UInt64 = 0x0400_0000
    public static let ipc: UInt64 = 0x0800_0000
    public static let user: UInt64 = 0x1000_0000
    public static let pid: UInt64 = 0x2000_0000
    public static let network: UInt64 = 0x4000_0000
    public static let time: UInt64 = 0x0000_0080

    /// OCI namespace type → CLONE_NEW* flag.
    public static let flags: [String: UInt64] = [
        "mount": mount, "cgroup": cgroup, "uts": uts, "ipc": ipc, "user": user, "pid": pid, "network": network, "time": time,
    ]

    public static func flag(_ type: String) -> UInt64 { flags[type] ?? 0 }

    /// The /proc/<pid>/ns/ file name of a namespace type.
    public static func procName(_ type: String) -> String {
        switch type {
        case "mount": return "mnt"
        case "network": return "net"
        default: return type
        }
    }
}
