import NIOCore
import NIOPosix
import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The echo server under test, run in its own process (pinned to one core by the
/// driver). Prints "ready" on stdout once it listens.
enum EchoServers {
    static func run(kind: String, socket: String) throws {
        unlink(socket)
        switch kind {
        case "nio": try runNIO(socket: socket)
        default:
            guard let backend = BackendKind(rawValue: kind) else { fatalError("unknown server kind \(kind)") }
            try runReactor(backend, socket: socket)
        }
    }

    /// Our reactor with the daemon's own building blocks: Listener + Connection.
    static func runReactor(_ backend: BackendKind, socket: String) throws {
        try serveUntilSIGTERM(backend) { reactor in
            var conns: [Connection] = []
            let listener = try Listener(reactor: reactor, fd: try Socket.listenUnix(path: socket)) { fd in
                let c = Connection(reactor: reactor, fd: fd)
                c.onRead = { c, bytes in c.write(bytes) }
                try? c.start()
                conns.append(c)
            }
            return {
                for c in conns { c.close() }
                listener.close()
            }
        }
    }

    /// A server process on our reactor: `setup` starts serving and returns how to stop;
    /// "ready" goes to stdout, SIGTERM ends it cleanly.
    static func serveUntilSIGTERM(_ backend: BackendKind? = nil, _ setup: (Reactor) throws -> () -> Void) throws {
        try Signals.block([SIGTERM])
        let reactor = try Reactor(backend: backend)
        try reactor.onSignals([SIGTERM]) { _ in reactor.stop() }
        let stop = try setup(reactor)
        ready()
        try reactor.run()
        stop()
        reactor.close()
    }

    /// SwiftNIO's idiomatic echo: one event loop thread, write on read, flush on read-complete.
    static func runNIO(socket: String) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let channel = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(EchoHandler()) }
            }
            .bind(unixDomainSocketPath: socket).wait()
        ready()
        try channel.closeFuture.wait()
    }

    static func ready() {
        let s = "ready\n"
        _ = s.withCString { write(1, $0, 6) }
    }
}

final class EchoHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.write(data, promise: nil)
    }
    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }
}
