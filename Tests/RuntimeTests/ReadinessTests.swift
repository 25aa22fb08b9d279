import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct ReadinessTests {
    @Test(arguments: BackendKind.allCases)
    func pipeReadableThenHangup(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let pipe = try makePipe()
            let r = pipe.first.rawValue
            var seen: [ReadyEvents] = []
            var got: [UInt8] = []
            var eof = false
            let reg = try reactor.register(fd: r, interest: .readable) { ev in
                seen.append(ev)
                if let bytes = try? drain(r) { got += bytes } else { eof = true }
            }
            #expect(writeRaw(pipe.second.rawValue, Array("hello".utf8)) == 5)
            try spin(reactor, "data on the pipe") { got.count == 5 }
            #expect(String(decoding: got, as: UTF8.self) == "hello")
            #expect(seen.allSatisfy { $0.contains(.readable) })
            pipe.second.close()
            try spin(reactor, "end of file") { eof }
            #expect(seen.last?.contains(.hangup) == true)
            reactor.deregister(reg)
            pipe.first.close()
        }
    }

    @Test(arguments: BackendKind.allCases)
    func levelTriggeredReportsAgainUntilDrained(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let pair = try Socket.pair()
            let a = pair.first.rawValue
            var wakes = 0
            var total = 0
            let reg = try reactor.register(fd: a, interest: .readable) { _ in
                wakes += 1
                // Read one byte per wake-up: level-triggered readiness must come back.
                var b: UInt8 = 0
                if read(a, &b, 1) == 1 { total += 1 }
            }
            #expect(writeRaw(pair.second.rawValue, Array(repeating: 7, count: 10)) == 10)
            try spin(reactor, "ten wake-ups") { total == 10 }
            #expect(wakes >= 10)
            reactor.deregister(reg)
            pair.first.close()
            pair.second.close()
        }
    }

    @Test(arguments: BackendKind.allCases)
    func writableInterestTogglesAndPTYWorks(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let pty = try makePTY()
            let master = pty.first.rawValue
            var writable = 0
            let reg = try reactor.register(fd: master, interest: .writable) { ev in
                if ev.contains(.writable) { writable += 1 }
            }
            try spin(reactor, "pty master writable") { writable > 0 }
            // Switch to read interest; a write on the slave makes the master readable.
            var readable = false
            try reactor.modify(reg, interest: .readable)
            #expect(reactor.interest(of: reg) == .readable)
            let before = writable
            #expect(writeRaw(pty.second.rawValue, Array("tty\n".utf8)) == 4)
            var got: [UInt8] = []
            reactor.deregister(reg)
            let reg2 = try reactor.register(fd: master, interest: .readable) { _ in
                readable = true
                got += (try? drain(master)) ?? []
            }
            try spin(reactor, "pty master readable") { readable && got.count >= 4 }
            #expect(writable == before)
            #expect(String(decoding: got, as: UTF8.self).hasPrefix("tty"))
            reactor.deregister(reg2)
            pty.first.close()
            pty.second.close()
        }
    }

    /// Adding an interest to a registration whose poll is already armed (io_uring) or
    /// set (epoll) must take effect at once, with no other event to trigger it.
    @Test(arguments: BackendKind.allCases)
    func wideningInterestWhileArmedTakesEffect(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let pair = try Socket.pair()
            var events: [ReadyEvents] = []
            let reg = try reactor.register(fd: pair.first.rawValue, interest: .readable) { events.append($0) }
            try reactor.runOnce(block: false)  // the read poll is now armed in the kernel
            #expect(events.isEmpty)
            try reactor.modify(reg, interest: [.readable, .writable])
            try spin(reactor, "writable after widening") { events.contains { $0.contains(.writable) } }
            // Narrow again: no more writable events, readable still works.
            try reactor.modify(reg, interest: .readable)
            events.removeAll()
            #expect(writeRaw(pair.second.rawValue, [1]) == 1)
            try spin(reactor, "readable after narrowing") { events.contains { $0.contains(.readable) } }
            #expect(!events.contains { $0.contains(.writable) })
            reactor.deregister(reg)
            pair.first.close()
            pair.second.close()
        }
    }

    @Test(arguments: BackendKind.allCases)
    func halfCloseKeepsTheOtherDirection(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let pair = try Socket.pair()
            let client = pair.second.rawValue
            let conn = Connection(reactor: reactor, fd: pair.first)
            var received: [UInt8] = []
            var sawEOF = false
            var closed = false
            conn.onRead = { _, bytes in received += bytes }
            conn.onReadEOF = { c in
                sawEOF = true
                // The peer is done sending but still reads: answer, then half-close.
                c.write("bye")
                c.shutdownWrite()
            }
            conn.onClose = { _, err in closed = true; #expect(err == nil) }
            try conn.start()
            #expect(writeRaw(client, Array("hello".utf8)) == 5)
            try Socket.shutdownWrite(client)
            try spin(reactor, "server sees EOF") { sawEOF }
            #expect(String(decoding: received, as: UTF8.self) == "hello")
            // Both directions are finished: the server side closes itself.
            try spin(reactor, "server closes") { closed }
            #expect(try drain(client).map { String(decoding: $0, as: UTF8.self) } == "bye")
            #expect(try drain(client) == nil)  // end of file after "bye"
            pair.second.close()
        }
    }

    @Test(arguments: BackendKind.allCases)
    func peerHangUpClosesTheConnection(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let pair = try Socket.pair()
            let conn = Connection(reactor: reactor, fd: pair.first)
            var closed = false
            var closeError: SystemError?
            conn.onClose = { _, err in closed = true; closeError = err }
            try conn.start()
            pair.second.close()
            try spin(reactor, "hang-up noticed") { closed }
            #expect(closeError == nil)
            #expect(conn.state == .closed)
        }
    }

    @Test(arguments: BackendKind.allCases)
    func peerResetIsReportedAsAnError(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let pair = try Socket.pair()
            let conn = Connection(reactor: reactor, fd: pair.first)
            var closeError: SystemError?
            var closed = false
            conn.onClose = { _, err in closed = true; closeError = err }
            try conn.start()
            // The peer closes with our bytes unread in its queue: the kernel resets.
            conn.write("never read")
            pair.second.close()
            try spin(reactor, "reset noticed") { closed }
            #expect(closeError?.errno == .ECONNRESET)
        }
    }
}
}
