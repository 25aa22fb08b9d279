#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import KuasarSystem
import KuasarReactor
import KuasarWire

/// Stdio that stays in the agent for its host to pull (`stream:` in Create or Exec
/// instead of a FIFO path: a VM's host cannot open a FIFO in the guest). Each stream is
/// a FIFO in the agent's state directory, so the container engine writes into it as
/// into containerd's: the container's output goes straight into the FIFO and the agent
/// reads it only while the host asks for more (ReadStdio), so a host that stops reading
/// stops the container's writes instead of the agent buffering without bound.
///
/// End of file: the agent keeps a writer of each output FIFO open until the process has
/// exited (its exit reported by the engine, which is after the engine dropped its own
/// holds), so EOF means every writer is gone and every byte was read. A process the exited
/// one left behind (an exec's `daemon &`) may hold the FIFO for as long as it lives: as the
/// engine's drain of a pipe, the stream then ends `exitDrainNS` after the exit, with
/// everything written until then — the host's Wait and Delete do not hang on it.
final class OutputStream {
    static let bufferLimit = 1 << 20
    static let exitDrainNS: UInt64 = 2_000_000_000
    let path: String
    private let reactor: Reactor
    private let connection: Connection
    private var exitTimer: TimerID?
    /// Holds EOF back until the process exited.
    private var guardFD: Int32
    /// Read ahead of the host's pulls (consumed from the front without moving the rest):
    /// its first `inFlight` bytes were sent and wait for a read to acknowledge them.
    private var buffer = InputBuffer()
    private var inFlight = 0
    /// Stream offset of the buffer's first byte (everything before it acknowledged).
    private(set) var acknowledged: UInt64 = 0
    private(set) var eof = false
    private var waiter: (call: TTRPCServerCall, max: Int)?

    init(reactor: Reactor, path: String) throws(SystemError) {
        self.path = path
        self.reactor = reactor
        _ = unlink(path)
        _ = try sys("mkfifo", path) { mkfifo(path, 0o600) }
        let rd = try sys("open", path) { open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC) }
        let wr: Int32
        do { wr = try sys("open", path) { open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC) } } catch { _ = Glibc.close(rd); throw error }
        guardFD = wr
        connection = Connection(reactor: reactor, fd: OwnedFD(adopting: rd))
        connection.onRead = { [unowned self] _, bytes in
            self.buffer.append(bytes)
            if self.buffer.count >= Self.bufferLimit { self.connection.pauseReading() }
            self.answer()
        }
        connection.onReadEOF = { [unowned self] _ in
            self.eof = true
            self.answer()
        }
        connection.onClose = { [unowned self] _, _ in
            self.eof = true
            self.answer()
        }
        do { try connection.start() } catch { _ = Glibc.close(wr); throw error }
    }

    /// The process exited: the agent's writer goes, so EOF comes once the others have.
    func processExited() {
        closeGuard()
        guard !eof, exitTimer == nil else { return }
        exitTimer = reactor.schedule(afterNS: Self.exitDrainNS) { [weak self] in self?.endAfterExit() }
    }

    /// `exitDrainNS` after the exit and still no EOF: another process holds the FIFO. What
    /// it holds is read out and the stream ends — unless the host is behind (the buffer
    /// full), which is no reason to end: then again later.
    private func endAfterExit() {
        exitTimer = nil
        guard !eof, connection.state == .open else { return }
        while buffer.count < Self.bufferLimit,
              connection.readAvailable(limit: Self.bufferLimit - buffer.count, { buffer.append($0) }) > 0 {}
        if buffer.count >= Self.bufferLimit {
            connection.pauseReading()
            exitTimer = reactor.schedule(afterNS: Self.exitDrainNS) { [weak self] in self?.endAfterExit() }
            answer()
            return
        }
        // Its writes from now on fail (EPIPE) instead of filling a FIFO nobody reads.
        connection.close()
    }

    /// A read from the host that has received everything before `offset` (nil: it does
    /// not know; from the last acknowledged byte). What was sent after it is sent again.
    /// The newest read is the host's: one still waiting is superseded.
    func read(_ call: TTRPCServerCall, max: Int, offset: UInt64?) {
        let from = offset ?? acknowledged
        let sent = acknowledged + UInt64(inFlight)
        guard from >= acknowledged, from <= sent else {
            call.fail(RPCError(.outOfRange, "offset \(from) of \(path) is not one this stream can go on from (acknowledged \(acknowledged), sent \(sent))"))
            return
        }
        let n = Int(from - acknowledged)
        buffer.consume(n)
        acknowledged = from
        inFlight = 0
        if buffer.count < Self.bufferLimit && connection.state == .open { connection.resumeReading() }
        if let (old, _) = waiter {
            old.onCancel = nil
            old.fail(RPCError(.aborted, "superseded by a newer read of \(path)"))
        }
        waiter = (call, max)
        call.onCancel = { [weak self, weak call] _ in
            if let self, self.waiter?.call === call { self.waiter = nil }
        }
        answer()
    }

    private func answer() {
        guard let (call, max) = waiter else { return }
        var resp = Kuasar_Agent_V1_ReadStdioResponse()
        resp.offset = acknowledged + UInt64(inFlight)
        if buffer.count > inFlight {
            let n = min(max, buffer.count - inFlight)
            resp.data = Data(buffer.slice(inFlight..<(inFlight + n)))
            inFlight += n
        } else if eof {
            resp.eof = true
        } else {
            return
        }
        waiter = nil
        call.onCancel = nil
        call.respond(resp)
    }

    private func closeGuard() {
        if guardFD >= 0 { _ = Glibc.close(guardFD); guardFD = -1 }
    }

    func close() {
        closeGuard()
        if let t = exitTimer { reactor.cancel(t); exitTimer = nil }
        connection.close()
        if let (call, _) = waiter {
            waiter = nil
            call.fail(RPCError(.notFound, "the stream \(path) was deleted"))
        }
        _ = unlink(path)
    }
}

/// The host's input to a process: the agent writes it into the stdin FIFO the engine
/// reads. A write is answered once its bytes are queued below the high watermark, so the
/// host sends the next only when the process keeps up.
final class InputStream {
    let path: String
    private let reactor: Reactor
    private let connection: Connection
    private var waiting: [(bytes: [UInt8], call: TTRPCServerCall)] = []
    private var closing = false

    init(reactor: Reactor, path: String) throws(SystemError) {
        self.path = path
        self.reactor = reactor
        _ = unlink(path)
        _ = try sys("mkfifo", path) { mkfifo(path, 0o600) }
        // Read-write: open never blocks, and the engine's reader sees no EOF before CloseStdin.
        let fd = try sys("open", path) { open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC) }
        connection = Connection(reactor: reactor, fd: OwnedFD(adopting: fd))
        connection.isWriteOnly = true
        connection.onWritable = { [unowned self] _ in self.flushWaiting() }
        try connection.start()
    }

    func write(_ bytes: [UInt8], call: TTRPCServerCall) {
        guard !closing, connection.state != .closed else {
            call.fail(RPCError(.failedPrecondition, "stdin of \(path) is closed"))
            return
        }
        waiting.append((bytes, call))
        flushWaiting()
    }

    private func flushWaiting() {
        while let first = waiting.first, connection.isWritable {
            waiting.removeFirst()
            _ = connection.write(first.bytes)
            var resp = Kuasar_Agent_V1_WriteStdinResponse()
            resp.written = UInt32(first.bytes.count)
            first.call.respond(resp)
        }
    }

    /// Runs `done` once everything written is in the FIFO and the engine has read it out
    /// (FIONREAD 0), so closing the process's stdin then loses nothing; at most `timeoutNS`.
    func whenDrained(timeoutNS: UInt64 = 5_000_000_000, _ done: @escaping () -> Void) {
        closing = true
        let deadline = MonotonicClock.nanoseconds() + timeoutNS
        func check() {
            var unread: Int32 = 0
            let empty = waiting.isEmpty && connection.queuedBytes == 0
                && (ioctl(connection.rawFD, UInt(FIONREAD), &unread) != 0 || unread == 0)
            if empty || MonotonicClock.nanoseconds() >= deadline || connection.state == .closed {
                done()
                return
            }
            _ = reactor.schedule(afterNS: 1_000_000) { check() }
        }
        check()
    }

    func close() {
        for w in waiting { w.call.fail(RPCError(.notFound, "the stream \(path) was deleted")) }
        waiting.removeAll()
        connection.close()
        _ = unlink(path)
    }
}

/// The streams of every process, by "container/exec/stdout".
final class StdioStreams {
    let reactor: Reactor
    let dir: String
    private(set) var outputs: [String: OutputStream] = [:]
    private(set) var inputs: [String: InputStream] = [:]
    static let scheme = "stream:"

    init(reactor: Reactor, dir: String) {
        self.reactor = reactor
        self.dir = dir
    }

    static func key(_ container: String, _ exec: String, _ name: String) -> String { "\(container)/\(exec)/\(name)" }

    /// Replaces each `stream:` path with a FIFO the agent holds; the others stay.
    func resolve(container: String, exec: String, stdin: inout String, stdout: inout String, stderr: inout String, terminal: Bool) throws(SystemError) {
        var made: [String] = []
        do throws(SystemError) {
            for (name, path) in [("stdout", stdout), ("stderr", stderr)] where path.hasPrefix(Self.scheme) {
                // A terminal has one output: its stderr is the same stream.
                if terminal && name == "stderr" { continue }
                let fifo = "\(dir)/\(container).\(exec.isEmpty ? "init" : exec).\(name)"
                outputs[Self.key(container, exec, name)] = try OutputStream(reactor: reactor, path: fifo)
                made.append(Self.key(container, exec, name))
                if name == "stdout" { stdout = fifo } else { stderr = fifo }
            }
            if terminal && stderr.hasPrefix(Self.scheme) { stderr = "" }
            if stdin.hasPrefix(Self.scheme) {
                let fifo = "\(dir)/\(container).\(exec.isEmpty ? "init" : exec).stdin"
                inputs[Self.key(container, exec, "stdin")] = try InputStream(reactor: reactor, path: fifo)
                made.append(Self.key(container, exec, "stdin"))
                stdin = fifo
            }
        } catch {
            for k in made { drop(k) }
            throw error
        }
    }

    func output(_ container: String, _ exec: String, _ stream: Kuasar_Agent_V1_Stream) -> OutputStream? {
        outputs[Self.key(container, exec, stream == .stderr ? "stderr" : "stdout")]
    }

    func input(_ container: String, _ exec: String) -> InputStream? { inputs[Self.key(container, exec, "stdin")] }

    func processExited(_ container: String, _ exec: String) {
        for name in ["stdout", "stderr"] { outputs[Self.key(container, exec, name)]?.processExited() }
    }

    private func drop(_ key: String) {
        outputs.removeValue(forKey: key)?.close()
        inputs.removeValue(forKey: key)?.close()
    }

    /// A process was deleted (every exec too, for an init: exec "" names them all).
    func remove(container: String, exec: String?) {
        let prefix = exec.map { "\(container)/\($0)/" } ?? "\(container)/"
        for k in Array(outputs.keys) + Array(inputs.keys) where k.hasPrefix(prefix) { drop(k) }
    }

    func closeAll() {
        for k in Array(outputs.keys) + Array(inputs.keys) { drop(k) }
    }
}
