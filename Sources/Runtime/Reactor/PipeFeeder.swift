#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem

/// Writes one buffer into a pipe (a hook's stdin, a helper's input) from the loop
/// without ever blocking it: what the pipe takes now is written at once, the rest as
/// the reader drains it. It owns the write end and closes it when everything is
/// written, when the reader goes away (EPIPE), or when `close()` is called (the
/// reader exited without reading it all).
public final class PipeFeeder {
    private let reactor: Reactor
    private var fd: Int32
    private let bytes: [UInt8]
    private var offset = 0
    private var registration: Reactor.Registration?

    /// Takes `fd` (the write end); it is made non-blocking here.
    public init(reactor: Reactor, fd: Int32, bytes: [UInt8]) {
        self.reactor = reactor
        self.fd = fd
        self.bytes = bytes
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
    }

    /// Writes what fits now and watches the pipe for the rest.
    public func start() {
        guard fd >= 0 else { return }
        guard !writeSome() else { close(); return }
        do {
            registration = try reactor.register(fd: fd, interest: .writable) { [weak self] _ in
                guard let self else { return }
                if self.writeSome() { self.close() }
            }
        } catch {
            close()
        }
    }

    /// True when nothing more is to be written (all of it, or the reader is gone).
    private func writeSome() -> Bool {
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n > 0 { offset += n; continue }
            let e = errno
            if n < 0 && e == EINTR { continue }
            return !(n < 0 && e == EAGAIN)
        }
        return true
    }

    public func close() {
        guard fd >= 0 else { return }
        if let registration { reactor.deregister(registration) }
        registration = nil
        _ = Glibc.close(fd)
        fd = -1
    }

    deinit { close() }
}
