#if canImport(Glibc)
import Glibc
#endif
import CShims
import KuasarOCI

/// Unix and vsock stream sockets. Every socket is created non-blocking and
/// close-on-exec; ownership of each descriptor is an `OwnedFD`.
public enum Socket {
    static let streamFlags = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue)

    /// Calls `body` with a `sockaddr_un` for `path`; refuses paths the kernel would truncate.
    /// A leading '@' names the abstract namespace (as systemd's NOTIFY_SOCKET does): the
    /// address is then exactly the name's bytes after a NUL.
    static func withUnixAddress<R>(
        _ path: String, _ call: StaticString, _ body: (UnsafePointer<sockaddr>, socklen_t) throws(SystemError) -> R
    ) throws(SystemError) -> R {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        let abstract = bytes.first == UInt8(ascii: "@")
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity, !bytes.contains(0) else {
            throw SystemError("\(call)", path, errno: Errno(rawValue: ENAMETOOLONG))
        }
        if abstract { bytes[0] = 0 }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let length = abstract ? MemoryLayout<sa_family_t>.size + bytes.count : MemoryLayout<sockaddr_un>.size
        return try withUnsafePointer(to: &addr) { (p) throws(SystemError) in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sa) throws(SystemError) in
                try body(sa, socklen_t(length))
            }
        }
    }

    /// Listens on a unix socket at `path` with permissions `mode` (0600 by default).
    ///
    /// The parent directory is created (0700) when missing. A socket file left by a
    /// process that died is replaced; if something still answers on it, this throws
    /// `EADDRINUSE` rather than stealing the address from a live daemon.
    ///
    /// The socket is bound and listening under a private name in the same directory
    /// before it is renamed onto `path`, so a file at `path` always accepts: a client
    /// that waits for the file to appear and then connects is never refused, as it
    /// would be between a bind and its listen on `path` itself.
    public static func listenUnix(path: String, mode: mode_t = 0o600, backlog: Int32 = 4096) throws(SystemError) -> OwnedFD {
        let abstract = path.hasPrefix("@")
        var stale = false
        if !abstract {
            try makeDirectories(parentOf: path)
            stale = try deadSocketFile(at: path)
        }
        let fd = OwnedFD(adopting: try sys("socket(AF_UNIX)") { socket(AF_UNIX, streamFlags, 0) })
        // The private name is this process's and this descriptor's (no other listen in
        // the process can hold the same number at once), so a leftover of an earlier
        // crash of the same pid may be removed; a name too long for sun_path binds `path`.
        let parent = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let staging = "\(parent)/.kb\(String(getpid(), radix: 36)).\(fd.rawValue)"
        let direct = abstract || staging.utf8.count >= MemoryLayout.size(ofValue: sockaddr_un().sun_path)
        let bindPath = direct ? path : staging
        if !direct { unlink(staging) }
        do throws(SystemError) {
            if direct && stale { _ = try sys("unlink", path) { unlink(path) } }
            // umask narrows the file bind creates, so it is never wider than `mode`,
            // even for an instant; chmod then sets exactly `mode`.
            let old = umask(~mode & 0o777)
            let rc = try withUnixAddress(bindPath, "bind") { addr, len in bind(fd.rawValue, addr, len) }
            let bindErrno = Errno.current
            umask(old)
            if rc != 0 { throw SystemError("bind", path, errno: bindErrno) }
            if !abstract { _ = try sys("chmod", path) { chmod(bindPath, mode) } }
            _ = try sys("listen", path) { listen(fd.rawValue, backlog) }
            if !direct { _ = try sys("rename", path) { rename(staging, path) } }
        } catch {
            if !direct { unlink(staging) }  // (nothing there when bind failed: removed above)
            fd.close()
            throw error
        }
        return fd
    }

    /// Whether `path` is a socket file nothing answers on (one a dead process left, for
    /// the caller to replace); throws if it is something other than a socket (never
    /// replaced) or a socket something still answers on.
    private static func deadSocketFile(at path: String) throws(SystemError) -> Bool {
        var st = stat()
        guard lstat(path, &st) == 0 else { return false }
        guard (st.st_mode & S_IFMT) == S_IFSOCK else {
            throw SystemError("bind", path, errno: .EEXIST)  // never replace a non-socket
        }
        if let probe = try? connectUnix(path: path, blocking: true) as OwnedFD? {
            probe.close()
            throw SystemError("bind", path, errno: .EADDRINUSE)
        }
        return true
    }

    /// Connects to a unix socket. Non-blocking sockets may answer EAGAIN when the
    /// listener's backlog is full; that is thrown, named, for the caller to retry.
    public static func connectUnix(path: String, blocking: Bool = false) throws(SystemError) -> OwnedFD {
        let flags = blocking ? Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) : streamFlags
        let fd = OwnedFD(adopting: try sys("socket(AF_UNIX)") { socket(AF_UNIX, flags, 0) })
        do throws(SystemError) {
            _ = try withUnixAddress(path, "connect") { (addr, len) throws(SystemError) in
                try sys("connect", path) { connect(fd.rawValue, addr, len) }
            }
        } catch {
            fd.close()
            throw error
        }
        return fd
    }

    /// Accepts one connection, non-blocking and close-on-exec; nil when none is pending.
    public static func accept(_ listener: Int32) throws(SystemError) -> OwnedFD? {
        switch try shimNonBlocking("accept4", nil, { ks_accept(listener) }) {
        case .done(let fd): return OwnedFD(adopting: fd)
        case .wouldBlock: return nil
        }
    }

    /// A connected pair of unix stream sockets, both non-blocking.
    public static func pair() throws(SystemError) -> FDPair {
        var fds: [Int32] = [-1, -1]
        _ = try sys("socketpair") { socketpair(AF_UNIX, streamFlags, 0, &fds) }
        return FDPair(OwnedFD(adopting: fds[0]), OwnedFD(adopting: fds[1]))
    }

    /// A vsock listener on `port` (any CID). Works where the host has a vsock transport
    /// (vhost-vsock, or a guest's virtio-vsock).
    public static func listenVsock(port: UInt32, backlog: Int32 = 128) throws(SystemError) -> OwnedFD {
        let fd = OwnedFD(adopting: try sys("socket(AF_VSOCK)") { socket(ks_af_vsock(), streamFlags, 0) })
        do throws(SystemError) {
            _ = try shim("bind(vsock)", "port \(port)") { ks_vsock_bind(fd.rawValue, UInt32.max, port) }
            _ = try sys("listen(vsock)") { listen(fd.rawValue, backlog) }
        } catch {
            fd.close()
            throw error
        }
        return fd
    }

    /// Connects to (cid, port) over vsock; blocking, for the agent's side.
    public static func connectVsock(cid: UInt32, port: UInt32) throws(SystemError) -> OwnedFD {
        let fd = OwnedFD(adopting: try sys("socket(AF_VSOCK)") {
            socket(ks_af_vsock(), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        })
        do throws(SystemError) {
            _ = try shim("connect(vsock)", "cid \(cid) port \(port)") { ks_vsock_connect(fd.rawValue, cid, port) }
        } catch {
            fd.close()
            throw error
        }
        return fd
    }

    /// Half-closes the write side: the peer reads end of file, and can still answer.
    public static func shutdownWrite(_ fd: Int32) throws(SystemError) {
        _ = try sys("shutdown(SHUT_WR)") { shutdown(fd, Int32(SHUT_WR)) }
    }
}

/// Creates the directories above `path` (0700), like `mkdir -p $(dirname path)`.
public func makeDirectories(parentOf path: String) throws(SystemError) {
    guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return }
    try makeDirectories(String(path[..<slash]))
}

/// `mkdir -p`. The deepest directory is tried first and parents only when it reports
/// ENOENT: a container's cgroup, made in every v1 hierarchy on each Create, then costs
/// one mkdir per hierarchy instead of one per path component.
public func makeDirectories(_ dir: String, mode: mode_t = 0o700) throws(SystemError) {
    let path = dir.count > 1 && dir.hasSuffix("/") ? String(dir.dropLast()) : dir
    if mkdir(path, mode) == 0 { return }
    switch Errno.current {
    case .EEXIST:
        return
    case .ENOENT:
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { throw SystemError("mkdir", path, errno: .ENOENT) }
        try makeDirectories(String(path[..<slash]), mode: mode)
        if mkdir(path, mode) != 0 && Errno.current != .EEXIST { throw SystemError("mkdir", path, errno: Errno.current) }
    case let e:
        throw SystemError("mkdir", path, errno: e)
    }
}

/// A pipe; both ends close-on-exec, and non-blocking when asked.
extension Socket {
    /// The pid of a unix socket's peer (SO_PEERCRED), 0 if unknown.
    public static func peerPid(_ fd: Int32) -> pid_t { ks_peer_pid(fd) }

    /// recvmsg of bytes and at most one passed descriptor (`passed`, -1 when none);
    /// returns the byte count or -errno.
    public static func receiveWithFD(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, _ passed: inout Int32) -> Int {
        Int(ks_recv_with_fd(fd, buffer, count, &passed))
    }
}

public func makePipe(nonBlocking: Bool = true) throws(SystemError) -> FDPair {
    var fds: [Int32] = [-1, -1]
    _ = try shim("pipe2") { ks_pipe(&fds, nonBlocking ? 1 : 0) }
    return FDPair(OwnedFD(adopting: fds[0]), OwnedFD(adopting: fds[1]))
}

/// A pseudo-terminal pair; the master is non-blocking.
public func makePTY() throws(SystemError) -> FDPair {
    var m: Int32 = -1, s: Int32 = -1
    _ = try shim("openpty") { ks_openpty(&m, &s) }
    return FDPair(OwnedFD(adopting: m), OwnedFD(adopting: s))
}

/// Two owned descriptors made together: a pipe (`first` reads, `second` writes), a
/// socket pair, or a pty (`first` is the master). Take each part by consuming it.
@frozen public struct FDPair: ~Copyable {
    public var first: OwnedFD
    public var second: OwnedFD
    public init(_ first: consuming OwnedFD, _ second: consuming OwnedFD) {
        self.first = first
        self.second = second
    }
}
