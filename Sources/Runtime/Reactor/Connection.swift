#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem

/// A buffered stream connection (unix socket, vsock, pipe pair, pty) on the reactor.
///
/// Reads go through one buffer shared by every connection of the reactor (handlers see
/// bytes only for the duration of `onRead`), so an idle connection costs no buffer at
/// all. Writes are tried at once; what the kernel does not take is queued and flushed
/// when the fd turns writable.
///
/// Back-pressure: once `queuedBytes` passes `highWatermark` the connection stops
/// reading from its peer (a peer that does not read its answers cannot make us
/// produce more) and `isWritable` turns false for producers that feed it from
/// elsewhere; below `lowWatermark` reading resumes and `onWritable` runs. A producer
/// that ignores `isWritable` and pushes the queue past `hardLimit` gets the connection
/// closed with ENOBUFS — memory stays bounded either way.
public final class Connection {
    public struct Limits: Sendable {
        public var highWatermark = 256 * 1024
        public var lowWatermark = 64 * 1024
        public var hardLimit = 8 * 1024 * 1024
        /// Reads per wake-up before yielding to other fds (level-triggered: we come back).
        public var readsPerWake = 16
        public init() {}
    }

    public enum State: Equatable, Sendable {
        case open
        /// The peer shut down its write side; we can still write.
        case readClosed
        case closed
    }

    /// What to do once the write queue is empty.
    enum AfterFlush { case nothing, shutdownWrite, close }

    public let reactor: Reactor
    public let limits: Limits
    public private(set) var state: State = .open
    private var fd: OwnedFD?
    public let rawFD: Int32
    private var registration: Reactor.Registration?

    private var queue = WriteQueue()
    public var queuedBytes: Int { queue.count }
    private var pausedByUser = false
    private var pausedByPressure = false
    private var parkedOnHangup = false
    private var afterFlush = AfterFlush.nothing
    private var corked = false
    private var writeClosed = false

    /// Never read (a FIFO opened to write into, a pipe's write end): only writes flow.
    public var isWriteOnly = false

    public var onRead: ((Connection, UnsafeRawBufferPointer) -> Void)?
    /// The peer will send no more. Default: close once everything queued is written.
    public var onReadEOF: ((Connection) -> Void)?
    /// Runs once, when the connection is closed; `error` is nil for an orderly close.
    public var onClose: ((Connection, SystemError?) -> Void)?
    /// The queue fell back below `lowWatermark`.
    public var onWritable: ((Connection) -> Void)?

    public init(reactor: Reactor, fd: consuming OwnedFD, limits: Limits = Limits()) {
        self.reactor = reactor
        self.limits = limits
        rawFD = fd.rawValue
        self.fd = consume fd
    }

    /// Registers with the reactor; set the callbacks first. The reactor keeps the
    /// connection alive until it closes.
    public func start() throws(SystemError) {
        registration = try reactor.register(fd: rawFD, interest: wantedInterest) { [self] events in
            self.handle(events)
        }
    }

    public var isWritable: Bool { queuedBytes < limits.highWatermark && isOpenForWrites }

    private var isOpenForWrites: Bool { state != .closed && afterFlush == .nothing && !writeClosed }

    private var wantedInterest: Interest {
        var i: Interest = []
        if state == .open && !pausedByUser && !pausedByPressure && !isWriteOnly { i.insert(.readable) }
        if queuedBytes > 0 { i.insert(.writable) }
        return i
    }

    private func updateInterest() {
        guard let reg = registration else {
            if parkedOnHangup && state != .closed && (wantedInterest.contains(.readable)) {
                parkedOnHangup = false
                do { try start() } catch { close(error: error) }
            }
            return
        }
        do { try reactor.modify(reg, interest: wantedInterest) } catch { close(error: error) }
    }

    // MARK: Events

    private func handle(_ events: ReadyEvents) {
        if events.contains(.writable) || (queuedBytes > 0 && events.contains(.error)) {
            flush()
            if state == .closed { return }
        }
        let reading = state == .open && !pausedByUser && !pausedByPressure && !isWriteOnly
        if reading && events.wantsRead {
            readLoop()
            return
        }
        if events.contains(.error) || events.contains(.hangup) {
            if queuedBytes > 0 { flush(); return }
            // epoll reports POLLHUP whatever the interest; while reading is paused
            // that would spin. Park off the reactor until reading resumes.
            if let reg = registration {
                reactor.deregister(reg)
                registration = nil
                parkedOnHangup = true
            }
        }
    }

    private func readLoop() {
        let size = reactor.sharedReadBuffer.count
        for _ in 0..<limits.readsPerWake {
            let chunk: UnsafeRawBufferPointer
            do {
                guard let read = try readOnce(max: size) else { return }
                chunk = read
            } catch {
                close(error: error)
                return
            }
            if chunk.isEmpty {
                peerClosedWrite()
                return
            }
            onRead?(self, chunk)
            if state != .open || pausedByUser || pausedByPressure { return }
            // Most likely drained; level-triggered readiness brings us back if not.
            if chunk.count < size { return }
        }
    }

    /// One nonblocking read of up to `max` bytes into the reactor's shared buffer: the
    /// bytes (valid until the next read), empty at end of file, nil when it would block.
    /// EIO is how a pty master reports that the slave side closed: end of file too.
    @inline(__always)
    private func readOnce(max: Int) throws(SystemError) -> UnsafeRawBufferPointer? {
        let buffer = reactor.sharedReadBuffer
        let raw = rawFD
        let result: IOResult<Int>
        do {
            result = try sysNonBlocking("read", "fd \(raw)") { Glibc.read(raw, buffer.baseAddress, Swift.min(buffer.count, max)) }
        } catch where error.errno == .EIO {
            return UnsafeRawBufferPointer(rebasing: buffer[..<0])
        }
        guard case .done(let n) = result else { return nil }
        return UnsafeRawBufferPointer(rebasing: buffer[..<n])
    }

    private func peerClosedWrite() {
        guard state == .open else { return }
        state = .readClosed
        updateInterest()
        if let onReadEOF { onReadEOF(self) } else { closeAfterFlush() }
        if writeClosed { close() }
    }

    // MARK: Writing

    /// Queues `bytes` for the peer. Returns false when the bytes were refused (the
    /// connection is closed or draining).
    @discardableResult
    public func write(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard isOpenForWrites else { return false }
        var offset = 0
        if queuedBytes == 0 && !corked {
            while offset < bytes.count {
                let result: IOResult<Int>
                do {
                    result = try sysNonBlocking("write", "fd \(rawFD)") {
                        Glibc.write(rawFD, bytes.baseAddress! + offset, bytes.count - offset)
                    }
                } catch {
                    close(error: error)
                    return false
                }
                guard case .done(let n) = result else { break }
                offset += n
            }
            if offset == bytes.count { return true }
        }
        let rest = bytes.count - offset
        if queuedBytes + rest > limits.hardLimit {
            close(error: SystemError("write", "queue over \(limits.hardLimit) bytes: peer is not reading", errno: Errno(rawValue: ENOBUFS)))
            return false
        }
        let wasEmpty = queuedBytes == 0
        queue.append(UnsafeRawBufferPointer(rebasing: bytes[offset...]), pool: reactor.chunkPool)
        if queuedBytes >= limits.highWatermark && !pausedByPressure {
            pausedByPressure = true
            updateInterest()
        } else if wasEmpty && !corked {
            updateInterest()
        }
        return true
    }

    @discardableResult
    public func write(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { write($0) }
    }

    @discardableResult
    public func write(_ text: String) -> Bool {
        var t = text
        return t.withUTF8 { write(UnsafeRawBufferPointer($0)) }
    }

    private func flush() {
        while queuedBytes > 0 {
            do {
                if try queue.flush(fd: rawFD, pool: reactor.chunkPool) == 0 { break }
            } catch {
                close(error: error)
                return
            }
        }
        if pausedByPressure && queuedBytes <= limits.lowWatermark {
            pausedByPressure = false
            updateInterest()
            onWritable?(self)
        } else if queuedBytes == 0 {
            updateInterest()
        }
        if queuedBytes == 0 {
            switch afterFlush {
            case .nothing: break
            case .close: close()
            case .shutdownWrite:
                afterFlush = .nothing
                halfClose()
            }
        }
    }

    private func halfClose() {
        writeClosed = true
        _ = shutdown(rawFD, Int32(SHUT_WR))
        // Both directions are done: nothing more can happen on this connection.
        if state == .readClosed { close() }
    }

    /// Holds writes in the queue until `uncork`, so the answers to a batch of requests
    /// leave in one writev instead of a syscall each.
    public func cork() {
        corked = true
    }

    public func uncork() {
        guard corked else { return }
        corked = false
        if queuedBytes > 0 && state != .closed {
            flush()
            if queuedBytes > 0 { updateInterest() }
        }
    }

    /// Reads what the fd holds now, paused or not, until it would block, reports end of
    /// file, or `limit` bytes came; hands each chunk to `body` (valid during the call).
    /// For a source about to be closed whose buffered bytes still belong to someone
    /// (CloseIO's stdin FIFO). Returns how many bytes it read.
    @discardableResult
    public func readAvailable(limit: Int, _ body: (UnsafeRawBufferPointer) -> Void) -> Int {
        guard state == .open else { return 0 }
        var total = 0
        while total < limit, let chunk = try? readOnce(max: limit - total), !chunk.isEmpty {
            body(chunk)
            total += chunk.count
        }
        return total
    }

    // MARK: Flow control and closing

    /// Stops reading from the peer until `resumeReading` (e.g. while a request is handled elsewhere).
    public func pauseReading() {
        guard !pausedByUser else { return }
        pausedByUser = true
        updateInterest()
    }

    public func resumeReading() {
        guard pausedByUser else { return }
        pausedByUser = false
        updateInterest()
    }

    /// Half-close: flush, then shut down our write side; the peer reads end of file.
    public func shutdownWrite() {
        guard isOpenForWrites else { return }
        if queuedBytes == 0 { halfClose() } else { afterFlush = .shutdownWrite }
    }

    /// Closes once everything queued is written.
    public func closeAfterFlush() {
        guard state != .closed else { return }
        if queuedBytes == 0 { close(); return }
        afterFlush = .close
    }

    /// Closes now; queued bytes are dropped. `onClose` runs once.
    public func close(error: SystemError? = nil) {
        guard state != .closed else { return }
        state = .closed
        if let reg = registration { reactor.deregister(reg) }
        registration = nil
        fd.take()?.close()
        queue.removeAll(pool: reactor.chunkPool)
        let handler = onClose
        onRead = nil
        onReadEOF = nil
        onClose = nil
        onWritable = nil
        handler?(self, error)
    }
}
