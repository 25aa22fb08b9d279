#if canImport(Glibc)
import Glibc
#endif
import KuasarOCI

/// A C errno value with the names people grep for.
public struct Errno: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let EPERM = Errno(rawValue: 1)
    public static let ENOENT = Errno(rawValue: 2)
    public static let ESRCH = Errno(rawValue: 3)
    public static let EINTR = Errno(rawValue: 4)
    public static let EIO = Errno(rawValue: 5)
    public static let EBADF = Errno(rawValue: 9)
    public static let ECHILD = Errno(rawValue: 10)
    public static let EAGAIN = Errno(rawValue: 11)
    public static let ENOMEM = Errno(rawValue: 12)
    public static let EACCES = Errno(rawValue: 13)
    public static let EBUSY = Errno(rawValue: 16)
    public static let EEXIST = Errno(rawValue: 17)
    public static let ENOTDIR = Errno(rawValue: 20)
    public static let EINVAL = Errno(rawValue: 22)
    public static let EMFILE = Errno(rawValue: 24)
    public static let ENOSPC = Errno(rawValue: 28)
    public static let EPIPE = Errno(rawValue: 32)
    public static let ERANGE = Errno(rawValue: 34)
    public static let ENAMETOOLONG = Errno(rawValue: 36)
    public static let ENOSYS = Errno(rawValue: 38)
    public static let ENOTSOCK = Errno(rawValue: 88)
    public static let EADDRINUSE = Errno(rawValue: 98)
    public static let ECONNABORTED = Errno(rawValue: 103)
    public static let ECONNRESET = Errno(rawValue: 104)
    public static let ENOTCONN = Errno(rawValue: 107)
    public static let ETIMEDOUT = Errno(rawValue: 110)
    public static let ECONNREFUSED = Errno(rawValue: 111)
    public static let EINPROGRESS = Errno(rawValue: 115)
    public static let ECANCELED = Errno(rawValue: 125)

    /// The symbolic name where we know it, then the C library's text.
    public var description: String {
        let text = String(cString: strerror(rawValue))
        return "\(Errno.names[rawValue] ?? "errno \(rawValue)") (\(text))"
    }

    static let names: [Int32: String] = [
        1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 8: "ENOEXEC", 9: "EBADF", 10: "ECHILD",
        11: "EAGAIN", 12: "ENOMEM", 13: "EACCES", 16: "EBUSY", 17: "EEXIST", 20: "ENOTDIR",
        19: "ENODEV", 22: "EINVAL", 24: "EMFILE", 27: "EFBIG", 28: "ENOSPC", 32: "EPIPE", 34: "ERANGE", 36: "ENAMETOOLONG", 38: "ENOSYS", 88: "ENOTSOCK", 98: "EADDRINUSE",
        103: "ECONNABORTED", 104: "ECONNRESET", 107: "ENOTCONN", 110: "ETIMEDOUT",
        95: "EOPNOTSUPP", 111: "ECONNREFUSED", 115: "EINPROGRESS", 125: "ECANCELED",
    ]

    /// The calling thread's errno, read right after a failed libc call.
    public static var current: Errno { Errno(rawValue: errno) }
}

/// A failed system call: which call, on what, and the errno it gave.
/// Prints as `bind("/run/kuasar/kuasar.sock"): EADDRINUSE (Address already in use)`.
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    public let call: String
    public let subject: String?
    public let errno: Errno

    public init(_ call: String, _ subject: String? = nil, errno: Errno) {
        self.call = call
        self.subject = subject
        self.errno = errno
    }

    public var description: String {
        if let subject { return "\(call)(\"\(subject)\"): \(errno)" }
        return "\(call): \(errno)"
    }
}
