import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct SignalAndReuseTests {
    @Test(arguments: BackendKind.allCases)
    func signalsArriveThroughTheLoop(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            var got: [Int32] = []
            try reactor.onSignals([SIGUSR1, SIGUSR2]) { got.append($0) }
            defer { try? Signals.unblock([SIGUSR1, SIGUSR2]) }
            let me = Signals.currentThreadID()
            try Signals.sendToThread(me, SIGUSR1)
            try Signals.sendToThread(me, SIGUSR2)
            try spin(reactor, "two signals") { got.count == 2 }
            #expect(Set(got) == [SIGUSR1, SIGUSR2])
        }
    }

    /// An event collected for an fd that is closed and reused (same number, new
    /// registration) within the same batch must not reach the new owner.
    @Test(arguments: BackendKind.allCases)
    func staleEventForReusedFDIsDropped(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let a = try makePipe()
            let b = try makePipe()
            // Both readable before the loop waits: their events land in one batch.
            #expect(writeRaw(a.second.rawValue, [1]) == 1)
            #expect(writeRaw(b.second.rawValue, [1]) == 1)
            var regs: [Int32: Reactor.Registration] = [:]
            var readers: [Int32] = [a.first.rawValue, b.first.rawValue]
            var firstFired: Int32 = -1
            var newOwnerEvents = 0
            var reusedFD: Int32 = -1
            var newReg: Reactor.Registration?
            var fresh: FDPairBox?
            var oldOwnerCalls = 0
            for fd in readers {
                regs[fd] = try reactor.register(fd: fd, interest: .readable) { _ in
                    oldOwnerCalls += 1
                    guard firstFired < 0 else { return }
                    firstFired = fd
                    // Close the *other* pipe's read end and reuse its number at once.
                    let victim = readers.first { $0 != fd }!
                    reactor.deregister(regs[victim]!)
                    close(victim)
                    let p = try! makePipe()
                    reusedFD = p.first.rawValue
                    let box = FDPairBox(p)
                    fresh = box
                    // The new pipe is empty: any event its handler sees is the stale one.
                    newReg = try! reactor.register(fd: reusedFD, interest: .readable) { _ in newOwnerEvents += 1 }
                }
            }
            let droppedBefore = reactor.staleEventsDropped
            try reactor.runOnce()
            #expect(reusedFD == readers.first { $0 != firstFired }, "the fd number was reused")
            #expect(oldOwnerCalls == 1)
            #expect(newOwnerEvents == 0)
            #expect(reactor.staleEventsDropped == droppedBefore + 1)
            // Let a few more iterations pass: still nothing for the new owner.
            try settle(reactor, ms: 10)
            #expect(newOwnerEvents == 0)

            reactor.deregister(regs[firstFired]!)
            reactor.deregister(newReg!)
            // Close what is left: the survivor's ends, both write ends, the fresh pipe.
            close(firstFired)
            readers.removeAll()
            _ = a.first.take(); _ = b.first.take()  // already closed above by number
            a.second.close()
            b.second.close()
            fresh?.close()
        }
    }
}
}

/// Holds a pipe made inside an escaping closure until the test closes it.
final class FDPairBox {
    var read: OwnedFD?
    var write: OwnedFD?
    init(_ p: consuming FDPair) {
        read = consume p.first
        write = consume p.second
    }
    func close() {
        read.take()?.close()
        write.take()?.close()
    }
}
