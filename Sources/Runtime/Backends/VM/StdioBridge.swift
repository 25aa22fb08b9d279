#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import SwiftProtobuf
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer

/// One process's stdio between containerd's FIFOs on the host and the agent's streams in
/// the guest. Output is pulled (ReadStdio, a long poll per stream) only as fast as the
/// FIFO takes it, so a reader that stops makes the container block, not our memory grow;
/// stdin is pushed (WriteStdin) one read at a time, reading paused while it travels.
/// `drained` once every output stream reached its end (the agent says so only after the
/// process exited and every byte was returned) and was written to its FIFO.
final class StdioBridge {
    final class Output {
        let stream: Kuasar_Agent_V1_Stream
        let fifo: Connection?
        let file: Int32
        var done = false
        init(stream: Kuasar_Agent_V1_Stream, fifo: Connection?, file: Int32) {
            self.stream = stream
            self.fifo = fifo
            self.file = file
        }
        deinit { if file >= 0 { _ = Glibc.close(file) } }
    }

    let reactor: Reactor
    let agent: AgentLink
    let containerID: String
    let execID: String
    let logger: Logger
    private var outputs: [Output] = []
    private var stdin: Connection?
    private var stdinBusy = false
    private var stdinClosing = false
    private var closed = false
    var onDrained: (() -> Void)?
    var drained: Bool { outputs.allSatisfy(\.done) }

    /// Pull size: large enough for throughput, small enough to keep frames well below
    /// ttrpc's 4 MiB.
    static let chunk: UInt32 = 256 * 1024

    init(reactor: Reactor, agent: AgentLink, containerID: String, execID: String, stdio: StdioPaths, logger: Logger) throws {
        self.reactor = reactor
        self.agent = agent
        self.containerID = containerID
        self.execID = execID
        self.logger = logger
        for (path, stream) in [(stdio.stdout, Kuasar_Agent_V1_Stream.stdout), (stdio.terminal ? "" : stdio.stderr, .stderr)] where !path.isEmpty {
            outputs.append(try Self.openOutput(path, stream, reactor: reactor))
        }
        if !stdio.stdin.isEmpty {
            let p = Self.fifoPath(stdio.stdin)
            // Read-write: a writer that has not opened it yet is not the end of input.
            let fd = try sys("open", p) { open(p, O_RDWR | O_CLOEXEC | O_NONBLOCK) }
            stdin = Connection(reactor: reactor, fd: OwnedFD(adopting: fd))
        }
    }

    static func fifoPath(_ path: String) -> String { path.hasPrefix("fifo://") ? String(path.dropFirst(7)) : path }

    static func openOutput(_ path: String, _ stream: Kuasar_Agent_V1_Stream, reactor: Reactor) throws -> Output {
        if path.hasPrefix("binary://") {
            throw RPCError(.unimplemented, "\(path): binary:// log drivers are not supported for VM pods yet (FIFOs and file:// are)")
        }
        if path.hasPrefix("file://") {
            let file = String(path.dropFirst(7))
            let fd = try sys("open", file) { open(file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640) }
            return Output(stream: stream, fifo: nil, file: fd)
        }
        let p = fifoPath(path)
        // Read-write, so opening never blocks and a reader that comes and goes is no EPIPE.
        let fd = try sys("open", p) { open(p, O_RDWR | O_CLOEXEC | O_NONBLOCK) }
        let c = Connection(reactor: reactor, fd: OwnedFD(adopting: fd))
        c.isWriteOnly = true
        return Output(stream: stream, fifo: c, file: -1)
    }

    func start() {
        for o in outputs {
            do { try o.fifo?.start() } catch { logger.error("\(what): \(o.stream) FIFO: \(error)") }
            pull(o)
        }
        if let stdin {
            stdin.onRead = { [weak self] c, bytes in self?.forwardStdin(c, Array(bytes)) }
            do { try stdin.start() } catch { logger.error("\(what): stdin FIFO: \(error)") }
        }
        if outputs.isEmpty { reactor.schedule(afterNS: 0) { [weak self] in self?.onDrained?() } }
    }

    private var what: String { execID.isEmpty ? "container \(containerID)" : "container \(containerID) exec \(execID)" }

    private func pull(_ o: Output) {
        guard !o.done, !closed else { return }
        var r = Kuasar_Agent_V1_ReadStdioRequest()
        r.containerID = containerID
        r.execID = execID
        r.stream = o.stream
        r.maxBytes = Self.chunk
        agent.call(AgentLink.agent, "ReadStdio", r, as: Kuasar_Agent_V1_ReadStdioResponse.self, timeoutNS: nil) { [weak self] result in
            guard let self, !o.done else { return }
            switch result {
            case .failure(let e):
                if e.code == .unavailable || self.closed {
                    // The channel is gone: the VM died (its exit ends the process) or the
                    // link reconnects; nothing more will come from this pull.
                    if self.agent.isClosed { self.finish(o) }
                    else { self.reactor.schedule(afterNS: 50_000_000) { [weak self] in self?.pull(o) } }
                    return
                }
                self.logger.warning("\(self.what): ReadStdio \(o.stream): \(e.message)")
                self.finish(o)
            case .success(let resp):
                if !resp.data.isEmpty { self.emit(o, resp.data) }
                if resp.eof {
                    self.finish(o)
                } else if let fifo = o.fifo, !fifo.isWritable {
                    // The FIFO's reader is behind: pull again once it caught up.
                    fifo.onWritable = { [weak self] _ in self?.pull(o) }
                } else {
                    self.pull(o)
                }
            }
        }
    }

    private func emit(_ o: Output, _ data: Data) {
        if let fifo = o.fifo {
            data.withUnsafeBytes { _ = fifo.write($0) }
            return
        }
        data.withUnsafeBytes { raw in
            var off = 0
            while off < raw.count {
                let n = write(o.file, raw.baseAddress! + off, raw.count - off)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                off += n
            }
        }
    }

    /// The stream ended: once its bytes are in the FIFO, it is done.
    private func finish(_ o: Output) {
        guard !o.done else { return }
        guard let fifo = o.fifo, fifo.state != .closed, fifo.queuedBytes > 0 else {
            markDone(o)
            return
        }
        fifo.onClose = { [weak self] _, _ in self?.markDone(o) }
        fifo.closeAfterFlush()
    }

    private func markDone(_ o: Output) {
        guard !o.done else { return }
        o.done = true
        o.fifo?.close()
        if drained { onDrained?() }
    }

    private func forwardStdin(_ c: Connection, _ bytes: [UInt8]) {
        c.pauseReading()
        stdinBusy = true
        var r = Kuasar_Agent_V1_WriteStdinRequest()
        r.containerID = containerID
        r.execID = execID
        r.data = Data(bytes)
        agent.call(AgentLink.agent, "WriteStdin", r, as: Kuasar_Agent_V1_WriteStdinResponse.self) { [weak self] result in
            guard let self else { return }
            self.stdinBusy = false
            if case .failure(let e) = result {
                self.logger.warning("\(self.what): stdin: \(e.message); input ends")
                self.stdinClosing = true
                self.sendCloseStdin()
                return
            }
            if self.stdinClosing { self.drainStdinThenClose() } else { c.resumeReading() }
        }
    }

    /// CloseIO: the input written so far goes first, then the guest's stdin ends.
    func closeStdin() {
        guard stdin != nil, !stdinClosing else { return }
        stdinClosing = true
        if !stdinBusy { drainStdinThenClose() }
    }

    /// What containerd wrote before CloseIO is still in the FIFO: forwarded, then the end.
    private func drainStdinThenClose() {
        guard let stdin else { return }
        var buf = [UInt8](repeating: 0, count: 65536)
        let n = buf.withUnsafeMutableBytes { read(stdin.rawFD, $0.baseAddress, $0.count) }
        if n > 0 { forwardStdin(stdin, Array(buf[..<n])) } else { sendCloseStdin() }
    }

    private func sendCloseStdin() {
        stdin?.close()
        stdin = nil
        var r = Kuasar_Agent_V1_CloseStdinRequest()
        r.containerID = containerID
        r.execID = execID
        agent.call(AgentLink.agent, "CloseStdin", r, as: Google_Protobuf_Empty.self) { [weak self] result in
            if case .failure(let e) = result, let self { self.logger.warning("\(self.what): close stdin: \(e.message)") }
        }
    }

    /// The guest is gone: what arrived is flushed, nothing more will.
    func abandon() {
        for o in outputs { finish(o) }
    }

    func close() {
        closed = true
        stdin?.close()
        stdin = nil
        for o in outputs where !o.done {
            o.done = true
            o.fifo?.close()
        }
    }
}
