import KuasarSystem
/// Identifies a scheduled timer, for `Reactor.cancel`.
public struct TimerID: Hashable, Sendable {
    let value: UInt64
}

/// Timers in deadline order (ties in scheduling order), as a binary min-heap.
/// Cancelling removes the timer's body at once; its heap entry is skipped lazily.
struct TimerQueue {
    private struct Entry {
        var deadline: UInt64
        var seq: UInt64
        var id: UInt64
        func precedes(_ o: Entry) -> Bool { deadline != o.deadline ? deadline < o.deadline : seq < o.seq }
    }
    private struct Live {
        var interval: UInt64?
        var body: () -> Void
    }
    private var heap: [Entry] = []
    private var live: [UInt64: Live] = [:]
    private var nextSeq: UInt64 = 0

    var count: Int { live.count }

    mutating func insert(deadline: UInt64, interval: UInt64?, body: @escaping () -> Void) -> TimerID {
        nextSeq += 1
        live[nextSeq] = Live(interval: interval, body: body)
        push(Entry(deadline: deadline, seq: nextSeq, id: nextSeq))
        return TimerID(value: nextSeq)
    }

    mutating func cancel(_ id: TimerID) {
        live[id.value] = nil
    }

    var nextDeadline: UInt64? {
        mutating get {
            while let top = heap.first, live[top.id] == nil { _ = pop() }
            return heap.first?.deadline
        }
    }

    /// The next timer due at `now`, rescheduling it first when it repeats.
    mutating func popDue(now: UInt64) -> (TimerID, () -> Void)? {
        while let top = heap.first, top.deadline <= now {
            _ = pop()
            guard let timer = live[top.id] else { continue }
            if let interval = timer.interval {
                nextSeq += 1
                push(Entry(deadline: max(top.deadline &+ interval, now &+ 1), seq: nextSeq, id: top.id))
            } else {
                live[top.id] = nil
            }
            return (TimerID(value: top.id), timer.body)
        }
        return nil
    }

    private mutating func push(_ e: Entry) {
        heap.append(e)
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            if !heap[i].precedes(heap[parent]) { break }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    private mutating func pop() -> Entry {
        let top = heap[0]
        let last = heap.removeLast()
        if !heap.isEmpty {
            heap[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < heap.count && heap[l].precedes(heap[m]) { m = l }
                if r < heap.count && heap[r].precedes(heap[m]) { m = r }
                if m == i { break }
                heap.swapAt(i, m)
                i = m
            }
        }
        return top
    }
}
