#if canImport(Glibc)
import Glibc
#endif
import CShims

/// A VM pod's network, the way the original joins a VM to CNI: each interface CNI left in
/// the pod's network namespace (a veth) gets a tap beside it, and tc ingress redirects
/// (u32 match-all, mirred) pass every frame from one to the other. The VM's NIC on the
/// tap takes the veth's MAC, addresses and routes, so the pod looks to the cluster exactly
/// as CNI set it up. The taps are the VMM's: they vanish with its last descriptor.
public struct PodNetwork: Sendable {
    public struct Link: Sendable, Equatable {
        /// The interface's name in the netns (the guest's NIC gets the same).
        public var name: String
        public var ifindex: Int32
        public var tapIndex: Int32
        public var mac: String
        public var mtu: UInt32
        /// `a.b.c.d/prefix` each.
        public var addresses: [String]
    }

    public struct Route: Sendable, Equatable {
        /// `default` or `a.b.c.d/prefix`.
        public var destination: String
        /// Empty: on-link.
        public var gateway: String
        public var device: String
    }

    public var links: [Link] = []
    /// On-link routes first, so every gateway is reachable when its route is added.
    public var routes: [Route] = []
    /// The taps' descriptors, one per link, in order: the VMM's, once it started.
    public var tapFDs: [Int32] = []

    /// The interfaces worth a tap: up, not loopback, not a tap or tun of ours or anyone's.
    static func eligible(_ l: ks_link) -> Bool {
        let kind = text(l.kind)
        return l.flags & UInt32(IFF_LOOPBACK) == 0 && l.flags & UInt32(IFF_UP) != 0 && l.has_mac != 0 && kind != "tun"
    }

    /// A NUL-terminated C char array (the shim's text addresses) as a String.
    static func text<T>(_ chars: T) -> String {
        withUnsafeBytes(of: chars) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }

    /// Taps and redirects in the network namespace at `netnsPath` for every interface CNI
    /// made there. Nothing is left behind when it fails.
    public static func attach(netnsPath: String) throws(SystemError) -> PodNetwork {
        var net = PodNetwork()
        var touched: [Int32] = []
        do {
            try inNamespace(netnsPath) { () throws(SystemError) in
                let nl = try shim("socket(NETLINK_ROUTE)", netnsPath) { ks_nl_open() }
                defer { _ = close(nl) }
                let links = try dump("RTM_GETLINK", netnsPath, ks_link()) { ks_nl_links(nl, $0, $1) }.filter(eligible)
                let addrs = try dump("RTM_GETADDR", netnsPath, ks_addr()) { ks_nl_addrs(nl, $0, $1) }
                let routes = try dump("RTM_GETROUTE", netnsPath, ks_route()) { ks_nl_routes(nl, $0, $1) }
                var names: [Int32: String] = [:]
                for (i, l) in links.enumerated() {
                    let name = text(l.name)
                    names[l.ifindex] = name
                    var tapIndex: Int32 = 0
                    let tapName = "tap\(i)_kuasar"
                    let fd = try shim("TUNSETIFF", tapName) { tapName.withCString { ks_tap_open($0, &tapIndex) } }
                    net.tapFDs.append(fd)
                    _ = try shim("RTM_NEWLINK up", tapName) { ks_nl_link_up(nl, tapIndex, l.mtu) }
                    touched.append(l.ifindex)
                    for dev in [l.ifindex, tapIndex] {
                        var r = ks_nl_qdisc_ingress(nl, dev, 1)
                        if r == -EEXIST && dev == l.ifindex {
                            // An ingress qdisc left on the veth (redirects to a tap long gone): replaced.
                            _ = ks_nl_qdisc_ingress(nl, dev, 0)
                            r = ks_nl_qdisc_ingress(nl, dev, 1)
                        }
                        _ = try shim("RTM_NEWQDISC ingress", dev == tapIndex ? tapName : name) { r }
                    }
                    _ = try shim("RTM_NEWTFILTER mirred", "\(name) → \(tapName)") { ks_nl_redirect(nl, l.ifindex, tapIndex) }
                    _ = try shim("RTM_NEWTFILTER mirred", "\(tapName) → \(name)") { ks_nl_redirect(nl, tapIndex, l.ifindex) }
                    let mac = withUnsafeBytes(of: l.mac) { $0.map { hex($0) }.joined(separator: ":") }
                    net.links.append(Link(name: name, ifindex: l.ifindex, tapIndex: tapIndex, mac: mac, mtu: l.mtu,
                                          addresses: addrs.filter { $0.ifindex == l.ifindex }.map { "\(text($0.addr))/\($0.prefix)" }))
                }
                let ours = routes.filter { names[$0.oif] != nil }
                net.routes = (ours.filter { text($0.gateway).isEmpty } + ours.filter { !text($0.gateway).isEmpty }).map {
                    let dst = text($0.dst)
                    return Route(destination: $0.prefix == 0 && !dst.contains(":") ? "default" : "\(dst)/\($0.prefix)",
                                 gateway: text($0.gateway), device: names[$0.oif] ?? "")
                }
            }
        } catch {
            net.closeTaps()
            detach(netnsPath: netnsPath, links: touched)
            throw error
        }
        return net
    }

    /// Once the VMM holds the taps (or it never will): the daemon's copies closed.
    public mutating func closeTaps() {
        for fd in tapFDs { _ = close(fd) }
        tapFDs.removeAll()
    }

    /// Removes the redirects from the veths (`links`: their indexes) in `netnsPath`; the
    /// taps went with the VMM. Quiet when the namespace or the links are already gone.
    public static func detach(netnsPath: String, links: [Int32]) {
        guard !links.isEmpty else { return }
        try? inNamespace(netnsPath) { () throws(SystemError) in
            let nl = try shim("socket(NETLINK_ROUTE)", netnsPath) { ks_nl_open() }
            defer { _ = close(nl) }
            for l in links { _ = ks_nl_qdisc_ingress(nl, l, 0) }
        }
    }

    /// Runs `body` with the calling thread in the network namespace at `path`, then back
    /// in its own (sockets made meanwhile stay in the pod's). Quick: no blocking inside.
    static func inNamespace(_ path: String, _ body: () throws(SystemError) -> Void) throws(SystemError) {
        let target = try sys("open", path) { open(path, O_RDONLY | O_CLOEXEC) }
        defer { _ = close(target) }
        let own = try sys("open", "/proc/thread-self/ns/net") { open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC) }
        defer { _ = close(own) }
        _ = try shim("setns(CLONE_NEWNET)", path) { ks_setns(target, cloneNewNet) }
        defer {
            // The daemon cannot go on serving from a pod's network namespace.
            if ks_setns(own, cloneNewNet) != 0 { fatalError("cannot return to the daemon's network namespace from \(path)") }
        }
        try body()
    }

    static func dump<T>(_ what: StaticString, _ path: String, _ zero: T, _ call: (UnsafeMutablePointer<T>, Int32) -> Int32) throws(SystemError) -> [T] {
        var out = [T](repeating: zero, count: 64)
        let n = try shim(what, path) { out.withUnsafeMutableBufferPointer { call($0.baseAddress!, Int32($0.count)) } }
        return Array(out.prefix(Int(n)))
    }

    /// CLONE_NEWNET (sched.h keeps it behind _GNU_SOURCE).
    static let cloneNewNet: Int32 = 0x4000_0000

    static func hex(_ b: UInt8) -> String { b < 16 ? "0" + String(b, radix: 16) : String(b, radix: 16) }
}
