#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KuasarOCI
import KuasarSystem
import KuasarReactor

/// Where a container process's stdio goes, as containerd names it: FIFO paths (the
/// usual case), `file:///path` (append to a file), or nothing.
public struct StdioPaths: Sendable, Equatable {
    public var stdin = ""
    public var stdout = ""
    public var stderr = ""
    public var terminal = false
    /// For a `binary://` logger: its CONTAINER_ID and CONTAINER_NAMESPACE.
    public var containerID = ""
    public var namespace = ""
    public init(stdin: String = "", stdout: String = "", stderr: String = "", terminal: Bool = false) {
        self.stdin = stdin; self.stdout = stdout; self.stderr = stderr; self.terminal = terminal
    }
}

/// The daemon's side of a process's stdio. Output goes straight from the container into
/// its FIFO or file (or a `binary://` logger's pipes): it is in the FIFO the moment the
/// process writes it, and it keeps flowing while the daemon restarts. A terminal's
/// master is pumped by the reactor into the stdout FIFO, and stdin is the FIFO copied
/// into a pipe (or the master), so CloseIO can end it. Back-pressure: a FIFO nobody
/// reads stops us reading the master, so the container blocks on write instead of us
/// buffering without bound; `drain` reports once the master's bytes are in the FIFO.
public final class ProcessIO {
    let reactor: Reactor
    /// The fds the child gets as 0, 1, 2 (closed in the parent after the clone).
    private var childOwned: [OwnedFDBox] = []
    /// Terminal mode: the child makes its pty in the container and sends the master.
    public let terminal: Bool
    private var terminalOut: OutputSink?
    private var terminalInPath = ""
    private var isStarted = false
    private var master: Connection?
    private var pumps: [Pump] = []
    private var stdinSink: Connection?
    private var stdinSource: Connection?
    private var drainWaiters: [() -> Void] = []
    /// Read-write descriptors of output FIFOs the child writes into directly.
    private var holds: [OwnedFDBox] = []
    private var drainTimer: TimerID?

    final class OwnedFDBox {
        var fd: OwnedFD?
        let raw: Int32
        init(_ fd: consuming OwnedFD) { raw = fd.rawValue; self.fd = consume fd }
        deinit { fd.take()?.close() }
    }

    /// Where output goes: a FIFO on the reactor, or a regular file (which epoll cannot
    /// watch and which never blocks: written directly).
    package final class OutputSink {
        let stream: Connection?
        var file: OwnedFD?
        init(stream: Connection) { self.stream = stream }
        init(file: consuming OwnedFD) { stream = nil; self.file = consume file }
        deinit { file.take()?.close() }

        package func write(_ bytes: UnsafeRawBufferPointer) {
            if let stream { stream.write(bytes); return }
            guard let fd = file?.rawValue else { return }
            var off = 0
            while off < bytes.count {
                let n = Glibc.write(fd, bytes.baseAddress! + off, bytes.count - off)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return }
                off += n
            }
        }
        package var isWritable: Bool { stream?.isWritable ?? true }
        package var isFlushed: Bool { stream.map { $0.state == .closed || $0.queuedBytes == 0 } ?? true }
        package var state: Connection.State { stream?.state ?? (file == nil ? .closed : .open) }
        package var queuedBytes: Int { stream?.queuedBytes ?? 0 }
        package var onWritable: ((Connection) -> Void)? {
            get { stream?.onWritable }
            set { stream?.onWritable = newValue }
        }
        package var onClose: ((Connection, SystemError?) -> Void)? {
            get { stream?.onClose }
            set { stream?.onClose = newValue }
        }
        package func start() throws(SystemError) { try stream?.start() }
        package func closeAfterFlush() {
            if let stream { stream.closeAfterFlush() } else { file.take()?.close() }
        }
        package func close() {
            if let stream { stream.close() } else { file.take()?.close() }
        }
    }

    /// A pipe (or pty master) copied into a FIFO.
    final class Pump {
        let source: Connection
        let sink: OutputSink?
        var finished = false
        init(source: Connection, sink: OutputSink?) {
            self.source = source
            self.sink = sink
        }
    }

    public init(reactor: Reactor, paths: StdioPaths, supervisor: ProcessSupervisor? = nil) throws(SystemError) {
        self.reactor = reactor
        terminal = paths.terminal
        if paths.terminal {
            terminalOut = try ProcessIO.openOutput(paths.stdout, reactor: reactor)
            terminalInPath = paths.stdin
        } else {
            // stdin: a pipe whose read end is the child's fd 0, fed from the FIFO.
            if !paths.stdin.isEmpty {
                let sink = try childPipe(childReads: true)
                sink.isWriteOnly = true
                stdinSink = sink
                stdinSource = try ProcessIO.openInput(paths.stdin, reactor: reactor)
            } else {
                try giveChildNull(O_RDONLY)
            }
            if paths.stdout.hasPrefix("binary://"), let supervisor {
                try startLogger(paths, supervisor: supervisor)
                return
            }
            for path in [paths.stdout, paths.stderr] {
                if path.isEmpty {
                    try giveChildNull(O_WRONLY)
                    continue
                }
                try giveChildOutput(path)
            }
        }
    }

    /// Output written straight into its FIFO or file: no copy through the daemon, and
    /// nothing between the container and its FIFO that a daemon crash could break (the
    /// container keeps writing while the daemon is down; a pipe pumped by the daemon would
    /// hand it EPIPE). For a FIFO we also hold a read-write descriptor until the exit is
    /// reported, so opening never blocks and bytes written before a reader arrives stay
    /// in the FIFO instead of being dropped with its last descriptor.
    private func giveChildOutput(_ path: String) throws(SystemError) {
        if path.hasPrefix("file://") {
            let file = String(path.dropFirst(7))
            giveChild(OwnedFD(adopting: try sys("open", file) { open(file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640) }))
            return
        }
        if path.hasPrefix("binary://") {
            throw SystemError("open stdio", "\(path): binary:// logging needs both stdout and stderr on the logger and no terminal", errno: .EINVAL)
        }
        let fifo = ProcessIO.fifoPath(path)
        let hold = try sys("open", fifo) { open(fifo, O_RDWR | O_CLOEXEC | O_NONBLOCK) }
        holds.append(OwnedFDBox(OwnedFD(adopting: hold)))
        // With our reader in place a write-only open returns at once; the child's end
        // blocks on a full FIFO as programs expect (back-pressure, nothing buffered here).
        giveChild(OwnedFD(adopting: try sys("open", fifo) { open(fifo, O_WRONLY | O_CLOEXEC) }))
    }

    /// containerd names FIFOs by path, sometimes as `fifo://path`.
    package static func fifoPath(_ path: String) -> String { path.hasPrefix("fifo://") ? String(path.dropFirst(7)) : path }

    /// Re-opened output holds for a process recovered after a daemon restart.
    func holdOutputs(_ paths: StdioPaths) {
        guard !paths.terminal else { return }
        for path in [paths.stdout, paths.stderr] where !path.isEmpty && !path.hasPrefix("file://") && !path.hasPrefix("binary://") {
            let fd = open(ProcessIO.fifoPath(path), O_RDWR | O_CLOEXEC | O_NONBLOCK)
            if fd >= 0 { holds.append(OwnedFDBox(OwnedFD(adopting: fd))) }
        }
    }

    /// The stdio of a process recovered after a daemon restart: its output already goes
    /// straight to its FIFOs (held again here); a terminal's master and a stdin pipe died
    /// with the previous daemon and cannot be re-attached.
    init(recoveredFor paths: StdioPaths, execID: String, engine: ContainerEngine) {
        let reactor = engine.reactor
        self.reactor = reactor
        terminal = paths.terminal
        isStarted = true
        let key = ProcessIO.keeperKey(paths, execID: execID)
        // What the previous daemon's keeper held for this process: its terminal's master,
        // or its stdin pipe. Pumped again from here.
        if paths.terminal, let fd = engine.handedOver.removeValue(forKey: key + "/pty") {
            let conn = Connection(reactor: reactor, fd: OwnedFD(adopting: fd))
            master = conn
            pumps.append(Pump(source: conn, sink: try? ProcessIO.openOutput(paths.stdout, reactor: reactor)))
            if !paths.stdin.isEmpty, let source = try? ProcessIO.openInput(paths.stdin, reactor: reactor) {
                stdinSource = source
                stdinSink = conn
            }
        } else if !paths.terminal, !paths.stdin.isEmpty, let fd = engine.handedOver.removeValue(forKey: key + "/stdin") {
            let sink = Connection(reactor: reactor, fd: OwnedFD(adopting: fd))
            sink.isWriteOnly = true
            stdinSink = sink
            stdinSource = try? ProcessIO.openInput(paths.stdin, reactor: reactor)
            if stdinSource == nil { stdinSink = nil; sink.close() }
        }
        holdOutputs(paths)
        keep(in: engine.keeperStore, key: key)
        try? startPumps()
    }

    /// The keeper's key for a process's descriptors: stable across daemon restarts.
    static func keeperKey(_ paths: StdioPaths, execID: String) -> String {
        "\(paths.namespace)/\(paths.containerID)/\(execID)"
    }

    private var store: KeeperStore?
    private var storeKey = ""

    /// Hands the terminal's master and the stdin pipe to the keeper, so that they outlive
    /// a daemon crash (closing them would hang the tty up or end the input); dropped
    /// again once the process is done with them.
    func keep(in store: KeeperStore?, key: String) {
        guard let store else { return }
        self.store = store
        storeKey = key
        if let master { store.keep(key + "/pty", master.rawFD) }
        if !terminal, let sink = stdinSink { store.keep(key + "/stdin", sink.rawFD) }
    }

    private func releaseKept() {
        guard let store else { return }
        if terminal { store.drop(storeKey + "/pty") } else if stdinSink != nil || stdinSource != nil { store.drop(storeKey + "/stdin") }
        self.store = nil
    }

    /// containerd's logging binary protocol (`binary:///path?key=value`): the binary
    /// runs with CONTAINER_ID and CONTAINER_NAMESPACE, reads the container's stdout on
    /// fd 3 and stderr on fd 4, and closes fd 5 once ready. The container writes straight
    /// into those pipes: nothing to pump, and nothing lost if the logger is slow (the
    /// container blocks). We do not wait for the ready signal — that would block the loop
    /// — output simply waits in the pipes until the logger reads.
    private func startLogger(_ paths: StdioPaths, supervisor: ProcessSupervisor) throws(SystemError) {
        let uri = paths.stdout
        let rest = String(uri.dropFirst("binary://".count))
        let parts = rest.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let path = String(parts[0]).percentDecoded ?? String(parts[0])
        guard path.hasPrefix("/") else { throw SystemError("binary log driver", "\(uri): the path must be absolute", errno: .EINVAL) }
        var args = [path]
        if parts.count == 2 {
            for item in parts[1].split(separator: "&") {
                let kv = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                args.append(String(kv[0]).percentDecoded ?? String(kv[0]))
                if kv.count == 2, !kv[1].isEmpty { args.append(String(kv[1]).percentDecoded ?? String(kv[1])) }
            }
        }
        let out = try makePipe(nonBlocking: false), err = try makePipe(nonBlocking: false), ready = try makePipe(nonBlocking: false)
        let outR = out.first.take(), outW = out.second.take()
        let errR = err.first.take(), errW = err.second.take()
        let readyR = ready.first.take(), readyW = ready.second.take()
        defer { for fd in [outR, errR, readyR, readyW] { _ = Glibc.close(fd) } }
        giveChild(OwnedFD(adopting: outW))
        giveChild(OwnedFD(adopting: errW))
        let null = try sys("open", "/dev/null") { open("/dev/null", O_RDWR | O_CLOEXEC) }
        defer { _ = Glibc.close(null) }
        var spec = ProcessSpec(executable: path, arguments: args,
                               environment: ["CONTAINER_ID=\(paths.containerID)", "CONTAINER_NAMESPACE=\(paths.namespace)",
                                             "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                               fdMap: [(null, 0), (null, 1), (null, 2), (outR, 3), (errR, 4), (readyW, 5)])
        spec.newSession = true
        // Reaped on its own when the container's output ends; its status is only logged.
        try supervisor.spawn(spec) { _ in }
    }

    /// The next of the child's fds 0, 1, 2 (closed here once the child has its copy).
    private func giveChild(_ fd: consuming OwnedFD) {
        childOwned.append(OwnedFDBox(fd))
    }

    private func giveChildNull(_ mode: Int32) throws(SystemError) {
        giveChild(OwnedFD(adopting: try sys("open", "/dev/null") { open("/dev/null", mode | O_CLOEXEC) }))
    }

    /// A pipe with one end for the child (blocking, as programs expect) and ours,
    /// non-blocking, as a Connection on the reactor.
    private func childPipe(childReads: Bool) throws(SystemError) -> Connection {
        let p = try makePipe(nonBlocking: false)
        let (childEnd, ours) = childReads ? (p.first.take(), p.second.take()) : (p.second.take(), p.first.take())
        giveChild(OwnedFD(adopting: childEnd))
        _ = fcntl(ours, F_SETFL, fcntl(ours, F_GETFL) | O_NONBLOCK)
        return Connection(reactor: reactor, fd: OwnedFD(adopting: ours))
    }

    /// The child's stdio mapping for the launcher.
    public var stdioMap: [(from: Int32, to: Int32)] {
        childOwned.enumerated().map { i, box in (from: box.raw, to: Int32(i)) }
    }

    /// Output FIFO (opened read-write so opening never blocks and a reader that comes
    /// and goes never makes us fail with EPIPE) or an append-only file.
    package static func openOutput(_ path: String, reactor: Reactor) throws(SystemError) -> OutputSink? {
        if path.isEmpty { return nil }
        let fd: Int32
        if path.hasPrefix("file://") {
            let file = String(path.dropFirst(7))
            fd = try sys("open", file) { open(file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640) }
            return OutputSink(file: OwnedFD(adopting: fd))
        } else if path.hasPrefix("binary://") {
            throw SystemError("open stdio", "\(path): binary:// logging needs both stdout and stderr on the logger and no terminal", errno: .EINVAL)
        } else {
            let p = ProcessIO.fifoPath(path)
            fd = try sys("open", p) { open(p, O_RDWR | O_CLOEXEC | O_NONBLOCK) }
        }
        let c = Connection(reactor: reactor, fd: OwnedFD(adopting: fd))
        c.isWriteOnly = true
        return OutputSink(stream: c)
    }

    /// stdin FIFO, read-write for the same reason: a writer that has not opened it yet
    /// must not look like end of input. CloseIO ends stdin.
    package static func openInput(_ path: String, reactor: Reactor) throws(SystemError) -> Connection {
        let p = ProcessIO.fifoPath(path)
        let fd = try sys("open", p) { open(p, O_RDWR | O_CLOEXEC | O_NONBLOCK) }
        return Connection(reactor: reactor, fd: OwnedFD(adopting: fd))
    }

    /// Terminal mode: the console master arrived from the child; pump it like a pipe.
    package func attachConsole(_ fd: consuming OwnedFD, size: OCISpec.ConsoleSize?) {
        guard terminal, master == nil else { fd.close(); return }
        let conn = Connection(reactor: reactor, fd: fd)
        master = conn
        store?.keep(storeKey + "/pty", conn.rawFD)
        if let size { try? resize(width: size.width, height: size.height) }
        pumps.append(Pump(source: conn, sink: terminalOut))
        terminalOut = nil
        if !terminalInPath.isEmpty {
            do {
                stdinSource = try ProcessIO.openInput(terminalInPath, reactor: reactor)
                stdinSink = conn
            } catch {
                // Without stdin the terminal still shows output.
            }
        }
        if isStarted { try? startPumps() }
    }

    /// Starts pumping; call once the child has its copies of the fds.
    public func start() throws(SystemError) {
        isStarted = true
        try startPumps()
    }

    private func startPumps() throws(SystemError) {
        for b in childOwned { b.fd.take()?.close() }
        childOwned.removeAll()
        for pump in pumps where !started.contains(ObjectIdentifier(pump.source)) {
            let sink = pump.sink
            pump.source.onRead = { source, bytes in
                guard let sink else { return }
                sink.write(bytes)
                if !sink.isWritable { source.pauseReading() }
            }
            sink?.onWritable = { [weak source = pump.source] _ in source?.resumeReading() }
            // A sink that closed (its reader failed, or it flushed after the end) neither
            // holds the source back nor a pending drain.
            sink?.onClose = { [weak self, weak source = pump.source] _, _ in
                source?.resumeReading()
                self?.checkDrained()
            }
            pump.source.onReadEOF = { [weak self, weak pump] _ in if let pump { self?.finish(pump) } }
            pump.source.onClose = { [weak self, weak pump] _, _ in if let pump { self?.finish(pump) } }
            try startOnce(pump.source)
            if let stream = sink?.stream { try startOnce(stream) }
        }
        if let stdinSource, let stdinSink {
            stdinSource.onRead = { source, bytes in
                stdinSink.write(bytes)
                if !stdinSink.isWritable { source.pauseReading() }
            }
            stdinSink.onWritable = { [weak stdinSource] _ in stdinSource?.resumeReading() }
            try startOnce(stdinSink)
            try startOnce(stdinSource)
        }
    }

    private var started = Set<ObjectIdentifier>()

    private func startOnce(_ c: Connection) throws(SystemError) {
        if started.insert(ObjectIdentifier(c)).inserted { try c.start() }
    }

    private func finish(_ pump: Pump) {
        guard !pump.finished else { return }
        pump.finished = true
        pump.sink?.closeAfterFlush()
        if pump.source.state != .closed { pump.source.close() }
        checkDrained()
    }

    private func checkDrained() {
        guard !drainWaiters.isEmpty else { return }
        let flushed = pumps.allSatisfy { $0.finished && ($0.sink?.isFlushed ?? true) }
        guard flushed else { return }
        if let t = drainTimer { reactor.cancel(t); drainTimer = nil }
        holds.removeAll()
        releaseKept()
        let w = drainWaiters
        drainWaiters.removeAll()
        for f in w { f() }
    }

    /// After the process exited: runs `done` once every output pipe reached its end and
    /// its bytes are in the FIFO — or after `timeoutNS` if a background child of the
    /// process still holds a pipe open (what was written so far is flushed first).
    public func drain(timeoutNS: UInt64 = 2_000_000_000, _ done: @escaping () -> Void) {
        drainWaiters.append(done)
        if drainTimer == nil {
            drainTimer = reactor.schedule(afterNS: timeoutNS) { [weak self] in
                guard let self else { return }
                self.drainTimer = nil
                for p in self.pumps where !p.finished { self.finish(p) }
                self.holds.removeAll()
                self.releaseKept()
                let w = self.drainWaiters
                self.drainWaiters.removeAll()
                for f in w { f() }
            }
        }
        // Each pump finishes at its end of file and closes its sink once flushed; the
        // last of those closes calls checkDrained again.
        checkDrained()
    }

    /// CloseIO: the container's stdin reaches end of file once what is queued is written.
    public func closeStdin() {
        // The keeper's copy of the pipe would keep the input open.
        if let store, !terminal, stdinSink != nil { store.drop(storeKey + "/stdin") }
        // What the writer put in the FIFO before CloseIO is the container's, also what
        // still sits there while its reading is paused (the container's pipe full): queue
        // it behind the rest. We hold the FIFO read-write, so this ends when it is empty
        // (at most its pipe buffer); what is written after CloseIO is not read.
        if let source = stdinSource, let sink = stdinSink {
            source.readAvailable(limit: 16 << 20) { _ = sink.write($0) }
        }
        stdinSource?.close()
        stdinSource = nil
        if let s = stdinSink, s !== master { s.closeAfterFlush() }
        stdinSink = nil
    }

    /// Terminal window size.
    public func resize(width: UInt32, height: UInt32) throws(SystemError) {
        guard let master else { throw SystemError("resize", "not a terminal", errno: .EINVAL) }
        // A resize that races the exit (clients send one on SIGWINCH) has nothing to do.
        guard master.state != .closed else { return }
        var ws = winsize(ws_row: UInt16(truncatingIfNeeded: height), ws_col: UInt16(truncatingIfNeeded: width), ws_xpixel: 0, ws_ypixel: 0)
        _ = try sys("ioctl(TIOCSWINSZ)") { ioctl(master.rawFD, UInt(TIOCSWINSZ), &ws) }
    }

    /// Closes everything now (delete of a process whose output nobody drained).
    public func close() {
        for b in childOwned { b.fd.take()?.close() }
        childOwned.removeAll()
        for p in pumps {
            p.finished = true
            p.source.close()
            p.sink?.close()
        }
        stdinSource?.close()
        stdinSink?.close()
        master?.close()
        terminalOut?.close()
        holds.removeAll()
        releaseKept()
        if let t = drainTimer { reactor.cancel(t); drainTimer = nil }
        let w = drainWaiters
        drainWaiters.removeAll()
        for f in w { f() }
    }
}

extension Int32 {
    func adoptedFD() -> OwnedFD { OwnedFD(adopting: self) }
}
