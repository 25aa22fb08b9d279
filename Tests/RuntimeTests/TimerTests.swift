import Testing
import Synchronization
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct TimerTests {
    @Test(arguments: BackendKind.allCases)
    func timersFireInDeadlineOrder(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            var fired: [String] = []
            // Before the first schedule: its 30 ms count from there, not from after the rest.
            let start = ContinuousClock.now
            reactor.schedule(afterNS: 30_000_000) { fired.append("30ms") }
            reactor.schedule(afterNS: 10_000_000) { fired.append("10ms-a") }
            reactor.schedule(afterNS: 20_000_000) { fired.append("20ms") }
            reactor.schedule(afterNS: 10_000_000) { fired.append("10ms-b") }
            reactor.schedule(afterNS: 0) { fired.append("now") }
            try spin(reactor, "five timers") { fired.count == 5 }
            #expect(fired == ["now", "10ms-a", "10ms-b", "20ms", "30ms"])
            #expect(ContinuousClock.now - start >= .milliseconds(30))
        }
    }

    @Test(arguments: BackendKind.allCases)
    func cancelledTimersNeverFire(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            var fired: [String] = []
            let doomed = reactor.schedule(afterNS: 5_000_000) { fired.append("doomed") }
            // Due in the same batch as the canceller, but after it: must not run.
            var sameBatch: TimerID?
            reactor.schedule(afterNS: 10_000_000) {
                fired.append("canceller")
                if let t = sameBatch { reactor.cancel(t) }
            }
            sameBatch = reactor.schedule(afterNS: 10_000_000) { fired.append("same-batch") }
            reactor.cancel(doomed)
            var done = false
            reactor.schedule(afterNS: 40_000_000) { done = true }
            try spin(reactor, "the last timer") { done }
            #expect(fired == ["canceller"])
        }
    }

    @Test(arguments: BackendKind.allCases)
    func repeatingTimerRepeatsUntilCancelled(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            var ticks = 0
            var id: TimerID?
            id = reactor.schedule(afterNS: 1_000_000, repeatingNS: 2_000_000) {
                ticks += 1
                if ticks == 5, let id { reactor.cancel(id) }
            }
            var done = false
            reactor.schedule(afterNS: 50_000_000) { done = true }
            try spin(reactor, "repeats") { done }
            #expect(ticks == 5)
        }
    }

    @Test(arguments: BackendKind.allCases)
    func helperThreadWakesTheLoop(kind: BackendKind) throws {
        try withReactor(kind) { reactor in
            let loopThread = Signals.currentThreadID()
            let box = InboxBox(reactor.inbox)
            var thread = pthread_t()
            #expect(pthread_create(&thread, nil, { arg in
                let b = Unmanaged<InboxBox>.fromOpaque(arg!).takeRetainedValue()
                usleep(5000)  // the loop is asleep in its wait by now
                b.inbox.post { [b] in b.ranOn.withLock { $0 = Signals.currentThreadID() } }
                return nil
            }, Unmanaged.passRetained(box).toOpaque()) == 0)
            try spin(reactor, "the posted job") { reactor.inboxJobsRun == 1 }
            pthread_join(thread, nil)
            // The job ran on the loop thread, not on the thread that posted it.
            #expect(box.ranOn.withLock { $0 } == loopThread)
        }
    }
}
}

final class InboxBox: Sendable {
    let inbox: ReactorInbox
    let ranOn = Mutex<pid_t>(0)
    init(_ inbox: ReactorInbox) { self.inbox = inbox }
}
