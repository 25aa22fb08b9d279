#if canImport(Glibc)
import Glibc
#endif
import CShims

/// A guest's own interfaces and IPv4/IPv6 routes, set by ioctl (what a VM's agent needs to
/// bring its pod's network up; netlink-only features are not here).
public enum Network {
    public static func setUp(_ interface: String, up: Bool = true) throws(SystemError) {
        _ = try shim("SIOCSIFFLAGS", interface) { interface.withCString { ks_if_set_up($0, up ? 1 : 0) } }
    }

    public static func setMTU(_ interface: String, _ mtu: Int32) throws(SystemError) {
        _ = try shim("SIOCSIFMTU", "\(interface) \(mtu)") { interface.withCString { ks_if_set_mtu($0, mtu) } }
    }

    /// Renames a down interface.
    public static func rename(_ interface: String, to name: String) throws(SystemError) {
        _ = try shim("SIOCSIFNAME", "\(interface) → \(name)") { interface.withCString { a in name.withCString { ks_if_rename(a, $0) } } }
    }

    static func macBytes(_ mac: String) throws(SystemError) -> [UInt8] {
        let bytes = mac.split(separator: ":").compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
        guard bytes.count == 6, mac.split(separator: ":").count == 6 else { throw SystemError("mac", "\"\(mac)\" is not aa:bb:cc:dd:ee:ff", errno: .EINVAL) }
        return bytes
    }

    /// A down interface takes `mac` (aa:bb:cc:dd:ee:ff).
    public static func setMAC(_ interface: String, _ mac: String) throws(SystemError) {
        let bytes = try macBytes(mac)
        _ = try shim("SIOCSIFHWADDR", "\(interface) \(mac)") { interface.withCString { n in bytes.withUnsafeBufferPointer { ks_if_set_mac(n, $0.baseAddress!) } } }
    }

    /// The name of the interface whose MAC is `mac` (aa:bb:cc:dd:ee:ff).
    public static func interface(withMAC mac: String) throws(SystemError) -> String {
        let bytes = try macBytes(mac)
        var name = [CChar](repeating: 0, count: 16)
        _ = try shim("SIOCGIFHWADDR", mac) { bytes.withUnsafeBufferPointer { ks_if_by_mac($0.baseAddress!, &name) } }
        return String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `a.b.c.d/nn` on `interface`.
    public static func setAddress(_ interface: String, _ cidr: String) throws(SystemError) {
        if cidr.contains(":") {
            let (addr, prefix) = try parseCIDR6(cidr)
            // The host's side already did duplicate address detection: usable at once.
            _ = try? Files.write("/proc/sys/net/ipv6/conf/\(interface)/accept_dad", "0")
            _ = try shim("SIOCSIFADDR", "\(interface) \(cidr)") { interface.withCString { i in addr.withCString { ks_if_add_ipv6(i, $0, prefix) } } }
            return
        }
        let (addr, prefix) = try parseCIDR(cidr)
        _ = try shim("SIOCSIFADDR", "\(interface) \(cidr)") { interface.withCString { ks_if_set_ipv4($0, addr, prefix) } }
    }

    /// `default` or `a.b.c.d/nn`, via `gateway` (empty: on-link), on `device` (empty: any).
    public static func addRoute(_ destination: String, gateway: String, device: String) throws(SystemError) {
        if destination.contains(":") || gateway.contains(":") {
            let (dest, prefix) = destination == "default" || destination.isEmpty ? ("::", Int32(0)) : try parseCIDR6(destination)
            _ = try shim("SIOCADDRT", "\(destination) via \(gateway.isEmpty ? "-" : gateway) dev \(device.isEmpty ? "-" : device)") {
                withOptionalCString(gateway.isEmpty ? nil : gateway) { g in
                    withOptionalCString(device.isEmpty ? nil : device) { ks_route_add_ipv6(dest, prefix, g, $0) }
                }
            }
            return
        }
        let (dest, prefix) = destination == "default" || destination.isEmpty ? (UInt32(0), Int32(0)) : try parseCIDR(destination)
        let gw = gateway.isEmpty ? UInt32(0) : try parseIPv4(gateway)
        _ = try shim("SIOCADDRT", "\(destination) via \(gateway.isEmpty ? "-" : gateway) dev \(device.isEmpty ? "-" : device)") {
            withOptionalCString(device.isEmpty ? nil : device) { ks_route_add_ipv4(dest, prefix, gw, $0) }
        }
    }

    /// An IPv4 address in network byte order.
    public static func parseIPv4(_ s: String) throws(SystemError) -> UInt32 {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { throw SystemError("address", "\"\(s)\" is not an IPv4 address (a.b.c.d, or an IPv6 address with a colon)", errno: .EINVAL) }
        var value: UInt32 = 0
        for p in parts {
            guard let b = UInt8(p) else { throw SystemError("address", "\"\(s)\" is not an IPv4 address (a.b.c.d, or an IPv6 address with a colon)", errno: .EINVAL) }
            value = value << 8 | UInt32(b)
        }
        return value.bigEndian
    }

    /// `addr/nn` for IPv6: the address as given (the shim parses it), the prefix checked.
    public static func parseCIDR6(_ s: String) throws(SystemError) -> (String, Int32) {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let prefix = Int32(parts[1]), (0...128).contains(prefix), parts[0].contains(":"),
              parts[0].allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." }) else {
            throw SystemError("address", "\"\(s)\" is not an IPv6 address/prefix", errno: .EINVAL)
        }
        return (String(parts[0]), prefix)
    }

    public static func parseCIDR(_ s: String) throws(SystemError) -> (UInt32, Int32) {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let prefix = Int32(parts[1]), (0...32).contains(prefix) else {
            throw SystemError("address", "\"\(s)\" is not a.b.c.d/prefix", errno: .EINVAL)
        }
        return (try parseIPv4(String(parts[0])), prefix)
    }
}
