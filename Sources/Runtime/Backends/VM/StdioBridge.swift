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
        /// containerd's FIFO (or file), as the container engine opens its own.
        let sink: ProcessIO.OutputSink
        var done = false
        /// Bytes of the stream received (each read acknowledges them); nil until the agent
        /// says, for a bridge made again after a restart.
        var received: UInt64?
        init(stream: Kuasar_Agent_V1_Stream, sink: ProcessIO.OutputSink, received: UInt64?) {
            self.stream = stream
            self.sink = sink
            self.received = received
        }
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

    /// `resume`: the process's output was pulled by an earlier daemon, which may have died
    /// holding a chunk it never acknowledged; the agent goes on from its last acknowledged byte.
    init(reactor: Reactor, agent: AgentLink, containerID: String, execID: String, stdio: StdioPaths, resume: Bool = false, logger: Logger) throws {
        self.reactor = reactor
        self.agent = agent
        self.containerID = containerID
        self.execID = execID
        self.logger = logger
        for (path, stream) in [(stdio.stdout, Kuasar_Agent_V1_Stream.stdout), (stdio.terminal ? "" : stdio.stderr, .stderr)] where !path.isEmpty {
            if path.hasPrefix("binary://") {
                throw RPCError(.unimplemented, "\(path): binary:// log drivers are not supported for VM pods yet (FIFOs and file:// are)")
            }
            if let sink = try ProcessIO.openOutput(path, reactor: reactor) { outputs.append(Output(stream: stream, sink: sink, received: resume ? nil : 0)) }
        }
        if !stdio.stdin.isEmpty { stdin = try ProcessIO.openInput(stdio.stdin, reactor: reactor) }
    }

    func start() {
        for o in outputs {
            do { try o.sink.start() } catch { logger.error("\(what): \(o.stream) FIFO: \(error)") }
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
        if let received = o.received { r.offset = received } else { r.resume = true }
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
                o.received = resp.offset + UInt64(resp.data.count)
                if !resp.data.isEmpty { resp.data.withUnsafeBytes { o.sink.write($0) } }
                if resp.eof {
                    self.finish(o)
                } else if !o.sink.isWritable {
                    // The FIFO's reader is behind: pull again once it caught up.
                    o.sink.onWritable = { [weak self] _ in self?.pull(o) }
                } else {
                    self.pull(o)
                }
            }
        }
    }

    /// The stream ended: once its bytes are in the FIFO, it is done.
    private func finish(_ o: Output) {
        guard !o.done else { return }
        guard o.sink.state != .closed, !o.sink.isFlushed else {
            markDone(o)
            return
        }
        o.sink.onClose = { [weak self] _, _ in self?.markDone(o) }
        o.sink.closeAfterFlush()
    }

    private func markDone(_ o: Output) {
        guard !o.done else { return }
        o.done = true
        o.sink.close()
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
            o.sink.close()
        }
    }
}
