import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct BackPressureTests {
    /// An echo connection whose peer writes but stops reading: the server stops reading
    /// too once its queue passes the high watermark, so its memory stays bounded; when
    /// the peer reads again every byte arrives, in order, none lost.
    @Test(arguments: BackendKind.allCases)
    func slowReaderBoundsTheWriteQueue(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let pair = try Socket.pair()
            let client = pair.second.rawValue
            var limits = Connection.Limits()
            limits.highWatermark = 64 * 1024
            limits.lowWatermark = 16 * 1024
            let conn = Connection(reactor: reactor, fd: pair.first, limits: limits)
            var maxQueued = 0
            var writableAgain = 0
            conn.onRead = { c, bytes in
                c.write(bytes)
                maxQueued = max(maxQueued, c.queuedBytes)
            }
            conn.onWritable = { _ in writableAgain += 1 }
            try conn.start()

            // The client pushes until the kernel refuses more: the server has stopped reading.
            var sent: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 16 * 1024)
            var stalls = 0
            var counter: UInt8 = 0
            while stalls < 20 {
                for i in chunk.indices { chunk[i] = counter; counter &+= 1 }
                let n = writeRaw(client, chunk)
                if n > 0 {
                    sent += chunk[..<n]
                    stalls = 0
                } else {
                    // Let the server run; if it keeps reading, we keep writing.
                    stalls += 1
                    try reactor.runOnce(block: false)
                }
                try reactor.runOnce(block: false)
            }
            #expect(!conn.isWritable)
            #expect(conn.queuedBytes <= limits.highWatermark + 64 * 1024)
            #expect(maxQueued <= limits.highWatermark + 64 * 1024)
            #expect(sent.count > 4 * limits.highWatermark, "the client pushed well past the watermark")

            // Now the client reads everything back while the server catches up.
            var echoed: [UInt8] = []
            try spin(reactor, "all bytes echoed") {
                if let got = try? drain(client) { echoed += got }
                return echoed.count >= sent.count
            }
            #expect(echoed == sent)
            #expect(writableAgain >= 1)
            #expect(conn.isWritable)
            conn.close()
            pair.second.close()
        }
    }

    /// A producer that ignores `isWritable` cannot grow the queue past the hard limit:
    /// the connection is closed with ENOBUFS instead.
    @Test(arguments: BackendKind.allCases)
    func hardLimitClosesInsteadOfGrowing(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let pair = try Socket.pair()
            var limits = Connection.Limits()
            limits.hardLimit = 1024 * 1024
            let conn = Connection(reactor: reactor, fd: pair.first, limits: limits)
            var closeError: SystemError?
            conn.onClose = { _, e in closeError = e }
            try conn.start()
            let block = [UInt8](repeating: 1, count: 64 * 1024)
            var accepted = 0
            for _ in 0..<64 where conn.write(block) { accepted += 1 }
            #expect(conn.state == .closed)
            #expect(closeError?.errno == Errno(rawValue: ENOBUFS))
            #expect(accepted < 64)
            pair.second.close()
        }
    }
}
}
