import KuasarSystem
import KuasarReactor
/// The status codes gRPC and ttrpc share (google.rpc.Code).
public enum RPCCode: Int32, Sendable, CustomStringConvertible {
    case ok = 0
    case cancelled = 1
    case unknown = 2
    case invalidArgument = 3
    case deadlineExceeded = 4
    case notFound = 5
    case alreadyExists = 6
    case permissionDenied = 7
    case resourceExhausted = 8
    case failedPrecondition = 9
    case aborted = 10
    case outOfRange = 11
    case unimplemented = 12
    case `internal` = 13
    case unavailable = 14
    case dataLoss = 15
    case unauthenticated = 16

    public var description: String {
        switch self {
        case .ok: return "OK"
        case .cancelled: return "Canceled"
        case .unknown: return "Unknown"
        case .invalidArgument: return "InvalidArgument"
        case .deadlineExceeded: return "DeadlineExceeded"
        case .notFound: return "NotFound"
        case .alreadyExists: return "AlreadyExists"
        case .permissionDenied: return "PermissionDenied"
        case .resourceExhausted: return "ResourceExhausted"
        case .failedPrecondition: return "FailedPrecondition"
        case .aborted: return "Aborted"
        case .outOfRange: return "OutOfRange"
        case .unimplemented: return "Unimplemented"
        case .internal: return "Internal"
        case .unavailable: return "Unavailable"
        case .dataLoss: return "DataLoss"
        case .unauthenticated: return "Unauthenticated"
        }
    }
}

/// An RPC failure as it travels on the wire: a code and a message a person can act on.
public struct RPCError: Error, Equatable, Sendable, CustomStringConvertible {
    public var code: RPCCode
    public var message: String

    public init(_ code: RPCCode, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }

    /// The one place where an error from anywhere in the runtime becomes a wire status.
    public static func from(_ error: any Error) -> RPCError {
        switch error {
        case let e as RPCError:
            return e
        case let e as RPCStatusConvertible:
            return e.rpcError
        case let e as SystemError:
            return RPCError(RPCCode(errno: e.errno), e.description)
        default:
            return RPCError(.internal, String(describing: error))
        }
    }
}

/// A domain error that knows its wire status (container and sandbox errors); keeps
/// `RPCError.from` the one mapping without the wire layer knowing those types.
public protocol RPCStatusConvertible: Error {
    var rpcError: RPCError { get }
}

extension RPCCode {
    /// The one errno → status mapping: a system call's failure keeps its meaning on the
    /// wire, however many layers it went through (they carry the errno, not a string).
    public init(errno: Errno) {
        switch errno {
        case .ENOENT, .ESRCH: self = .notFound
        case .EEXIST, .EADDRINUSE: self = .alreadyExists
        case .EINVAL, .ERANGE, .ENAMETOOLONG: self = .invalidArgument
        case .EPERM, .EACCES: self = .permissionDenied
        case .ETIMEDOUT: self = .deadlineExceeded
        case .ECONNREFUSED, .ECONNRESET, .EPIPE, .ENOTCONN: self = .unavailable
        case .ENOMEM, .EMFILE, .ENOSPC: self = .resourceExhausted
        default: self = .internal
        }
    }
}
