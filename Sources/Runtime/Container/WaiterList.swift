import KuasarOCI
import KuasarSystem
import KuasarReactor
/// Callbacks waiting for one event (a process exit, a sandbox stop), each with a token
/// so a waiter whose client went away can be dropped; fired once, in arrival order.
public struct WaiterList<Value> {
    private var waiters: [(token: Int, body: (Value) -> Void)] = []
    private var next = 0

    public init() {}

    public var count: Int { waiters.count }

    public mutating func add(_ body: @escaping (Value) -> Void) -> Int {
        next += 1
        waiters.append((next, body))
        return next
    }

    public mutating func remove(_ token: Int) {
        waiters.removeAll { $0.token == token }
    }

    /// Runs every waiter once with `value` and forgets them all.
    public mutating func fire(_ value: Value) {
        let now = waiters
        waiters.removeAll()
        for w in now { w.body(value) }
    }
}
