#if canImport(Glibc)
import Glibc
#endif
import KuasarOCI

/// The result of a non-blocking call: done, or it would have blocked (EAGAIN).
/// EAGAIN is a value, not an error, because on a non-blocking fd it is the normal end
/// of a drain loop.
public enum IOResult<Value> {
    case done(Value)
    case wouldBlock

}

/// The one choke point for libc calls that report failure as -1 + errno.
/// Retries EINTR; throws a `SystemError` naming the call otherwise.
@inline(__always)
public func sys<T: FixedWidthInteger>(
    _ call: StaticString, _ subject: @autoclosure () -> String? = nil, _ body: () -> T
) throws(SystemError) -> T {
    while true {
        let rc = body()
        if rc != -1 { return rc }
        let e = Errno.current
        if e == .EINTR { continue }
        throw SystemError("\(call)", subject(), errno: e)
    }
}

/// Like `sys`, but EAGAIN comes back as `.wouldBlock`.
@inline(__always)
public func sysNonBlocking<T: FixedWidthInteger>(
    _ call: StaticString, _ subject: @autoclosure () -> String? = nil, _ body: () -> T
) throws(SystemError) -> IOResult<T> {
    while true {
        let rc = body()
        if rc != -1 { return .done(rc) }
        let e = Errno.current
        if e == .EINTR { continue }
        if e == .EAGAIN { return .wouldBlock }
        throw SystemError("\(call)", subject(), errno: e)
    }
}

/// For the C shims, which return -errno instead of touching errno.
@inline(__always)
public func shim<T: FixedWidthInteger & SignedInteger>(
    _ call: StaticString, _ subject: @autoclosure () -> String? = nil, _ body: () -> T
) throws(SystemError) -> T {
    while true {
        let rc = body()
        if rc >= 0 { return rc }
        let e = Errno(rawValue: Int32(truncatingIfNeeded: -rc))
        if e == .EINTR { continue }
        throw SystemError("\(call)", subject(), errno: e)
    }
}

/// Like `shim`, but EAGAIN comes back as `.wouldBlock`.
@inline(__always)
public func shimNonBlocking<T: FixedWidthInteger & SignedInteger>(
    _ call: StaticString, _ subject: @autoclosure () -> String? = nil, _ body: () -> T
) throws(SystemError) -> IOResult<T> {
    while true {
        let rc = body()
        if rc >= 0 { return .done(rc) }
        let e = Errno(rawValue: Int32(truncatingIfNeeded: -rc))
        if e == .EINTR { continue }
        if e == .EAGAIN { return .wouldBlock }
        throw SystemError("\(call)", subject(), errno: e)
    }
}
