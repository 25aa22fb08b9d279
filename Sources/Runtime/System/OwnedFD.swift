#if canImport(Glibc)
import Glibc
#endif
import KuasarOCI

/// The single owner of an open file descriptor.
///
/// It closes its fd exactly once: by `close()`, by handing it off with `take()`, or —
/// as a last resort — when it is destroyed without either, which debug builds report
/// as a bug (an owner dropped on the floor usually means a leak elsewhere). Lending is
/// explicit: `rawValue` for a quick syscall, `withFD {}` for a scope.
public struct OwnedFD: ~Copyable {
    public let rawValue: Int32

    /// Takes ownership of `rawValue`, which must be open and owned by nobody else.
    public init(adopting rawValue: Int32) {
        precondition(rawValue >= 0, "OwnedFD needs an open descriptor, got \(rawValue)")
        self.rawValue = rawValue
    }

    /// Lends the descriptor for the duration of `body`.
    public borrowing func withFD<R, E: Error>(_ body: (Int32) throws(E) -> R) throws(E) -> R {
        try body(rawValue)
    }

    /// Closes the descriptor. Never retried on EINTR: on Linux the fd is gone either way,
    /// and a retry could close a descriptor another thread just opened.
    public consuming func close() {
        _ = Glibc.close(rawValue)
        discard self
    }

    /// Hands the raw descriptor to a new owner; this owner no longer closes it.
    public consuming func take() -> Int32 {
        let fd = rawValue
        discard self
        return fd
    }

    deinit {
        assert(false, "OwnedFD(\(rawValue)) destroyed without close() or take(): an fd owner was dropped")
        _ = Glibc.close(rawValue)
    }
}

extension OwnedFD {
    /// Reads into `buffer`; `.done(0)` is end of file.
    @inline(__always)
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> IOResult<Int> {
        try sysNonBlocking("read") { Glibc.read(rawValue, buffer.baseAddress, buffer.count) }
    }

    @inline(__always)
    public func write(_ buffer: UnsafeRawBufferPointer) throws(SystemError) -> IOResult<Int> {
        try sysNonBlocking("write") { Glibc.write(rawValue, buffer.baseAddress, buffer.count) }
    }

    /// Writes every byte, waiting with poll(2) on EAGAIN. For tests and tools, never the
    /// reactor.
    public func writeAll(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let r = try bytes.withUnsafeBytes { raw in
                try write(UnsafeRawBufferPointer(rebasing: raw[offset...]))
            }
            switch r {
            case .done(let n): offset += n
            case .wouldBlock: try waitReady(events: Int16(POLLOUT))
            }
        }
    }

    /// Reads exactly `count` bytes (or fewer at end of file), waiting with poll(2).
    public func readExactly(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let r = try out.withUnsafeMutableBytes { raw in
                try read(into: UnsafeMutableRawBufferPointer(rebasing: raw[got...]))
            }
            switch r {
            case .done(0): return Array(out[..<got])
            case .done(let n): got += n
            case .wouldBlock: try waitReady(events: Int16(POLLIN))
            }
        }
        return out
    }

    public func waitReady(events: Int16, timeoutMS: Int32 = -1) throws(SystemError) {
        var p = pollfd(fd: rawValue, events: events, revents: 0)
        _ = try sys("poll") { poll(&p, 1, timeoutMS) }
    }
}

/// Counts this process's open descriptors (for leak checks in tests and `kuasar info`).
public func openFDCount() -> Int {
    guard let dir = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while let entry = readdir(dir) {
        let name = entry.pointee.d_name.0
        if name != CChar(UInt8(ascii: ".")) { n += 1 }
    }
    return n - 1  // the directory stream's own fd
}
