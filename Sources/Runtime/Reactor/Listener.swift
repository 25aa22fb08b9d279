#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarSystem

/// Accepts connections on a listening socket registered with the reactor.
///
/// Each wake-up accepts up to a budget and relies on level-triggered readiness for the
/// rest. When the process runs out of descriptors (EMFILE/ENFILE), accepting pauses for
/// a moment instead of spinning on a listener that stays readable.
public final class Listener {
    public typealias AcceptHandler = (consuming OwnedFD) -> Void

    let reactor: Reactor
    private var fd: OwnedFD?
    private var registration: Reactor.Registration?
    private let onAccept: AcceptHandler
    private var pauseTimer: TimerID?
    public private(set) var acceptedCount = 0
    let budget = 256

    public init(reactor: Reactor, fd: consuming OwnedFD, onAccept: @escaping AcceptHandler) throws(SystemError) {
        self.reactor = reactor
        self.onAccept = onAccept
        let raw = fd.rawValue
        self.fd = consume fd
        do {
            registration = try reactor.register(fd: raw, interest: .readable) { [unowned self] _ in self.acceptBatch() }
        } catch {
            self.fd.take()?.close()
            throw error
        }
    }

    private func acceptBatch() {
        guard let raw = fd?.rawValue else { return }
        for _ in 0..<budget {
            do {
                guard let conn = try Socket.accept(raw) else { return }
                acceptedCount += 1
                onAccept(conn)
            } catch {
                switch error.errno {
                case .ECONNABORTED, .EPERM:
                    continue  // the peer gave up before we got to it
                case .EMFILE, Errno(rawValue: 23) /* ENFILE */, .ENOMEM:
                    reactor.logger.warning("accept paused for 100 ms: \(error)")
                    pause()
                    return
                default:
                    reactor.logger.error("accept: \(error)")
                    return
                }
            }
        }
    }

    private func pause() {
        guard let reg = registration, pauseTimer == nil else { return }
        try? reactor.modify(reg, interest: [])
        pauseTimer = reactor.schedule(afterNS: 100_000_000) { [unowned self] in
            self.pauseTimer = nil
            if let reg = self.registration { try? self.reactor.modify(reg, interest: .readable) }
        }
    }

    public func close() {
        if let t = pauseTimer { reactor.cancel(t) }
        pauseTimer = nil
        if let reg = registration { reactor.deregister(reg) }
        registration = nil
        fd.take()?.close()
    }
}
