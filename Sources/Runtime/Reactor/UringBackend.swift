import CShims
import KuasarSystem

/// Readiness through io_uring one-shot POLL_ADD.
///
/// Each registered fd has at most one poll in flight. When it completes, the reactor
/// is told and the poll is armed again (if the fd is still registered with the same
/// token), which gives the same level-triggered behaviour as the epoll backend. The
/// re-arm is only queued: it reaches the kernel with the next wait's submit, so a busy
/// loop costs one `io_uring_enter` per iteration, whatever the number of fds.
///
/// Tokens with the top bit set mark our own control operations (remove, update);
/// their completions are consumed here and never reach the reactor.
final class UringBackend: ReactorBackend {
    let kind = BackendKind.uring
    private let ring: OpaquePointer
    private var cqes: UnsafeMutablePointer<ks_event>
    private let capacity = 256
    private static let controlBit: UInt64 = 1 << 63

    private struct Slot {
        var token: UInt64 = 0
        var interest: Interest = []
        /// The mask of the poll in flight, when `armed`.
        var armedMask: Interest = []
        var armed = false
        /// A POLL_REMOVE for the armed poll is on its way; its completion re-arms.
        var cancelling = false
        var registered = false
    }
    private var slots: [Slot] = []

    static let isAvailable: Bool = {
        var err: Int32 = 0
        guard let r = ks_uring_create(4, &err) else { return false }
        ks_uring_destroy(r)
        return true
    }()

    init(entries: UInt32 = 1024) throws(SystemError) {
        var err: Int32 = 0
        guard let r = ks_uring_create(entries, &err) else {
            throw SystemError("io_uring_setup", errno: Errno(rawValue: -err))
        }
        ring = r
        cqes = .allocate(capacity: capacity)
    }

    private func slot(_ fd: Int32) -> Int {
        let i = Int(fd)
        if i >= slots.count { slots.append(contentsOf: repeatElement(Slot(), count: i + 1 - slots.count + 64)) }
        return i
    }

    private func arm(_ fd: Int32, _ i: Int) throws(SystemError) {
        _ = try shim("io_uring POLL_ADD", "fd \(fd)") {
            ks_uring_poll_add(ring, fd, slots[i].interest.pollMask, slots[i].token)
        }
        slots[i].armed = true
        slots[i].armedMask = slots[i].interest
    }

    func add(fd: Int32, interest: Interest, token: UInt64) throws(SystemError) {
        let i = slot(fd)
        precondition(!slots[i].registered, "fd \(fd) registered twice with io_uring")
        slots[i] = Slot(token: token, interest: interest, armed: false, registered: true)
        if !interest.isEmpty { try arm(fd, i) }
    }

    func modify(fd: Int32, interest: Interest, token: UInt64) throws(SystemError) {
        let i = slot(fd)
        guard slots[i].registered else { throw SystemError("io_uring modify", "fd \(fd)", errno: .ENOENT) }
        slots[i].interest = interest
        if slots[i].armed {
            // Narrowing needs nothing: the armed poll's completion is filtered and not
            // re-armed past the new interest. Widening cancels the armed poll; exactly
            // one completion for it follows (cancelled, or fired first) and re-arms
            // with the new interest, so two polls with one token are never in flight.
            // (POLL_UPDATE would avoid the round trip, but kernels refuse it with
            // EINVAL for one-shot polls in some versions.)
            if !interest.isSubset(of: slots[i].armedMask) && !slots[i].cancelling {
                _ = try shim("io_uring POLL_REMOVE") { ks_uring_poll_remove(ring, slots[i].token, Self.controlBit) }
                slots[i].cancelling = true
            }
        } else if !interest.isEmpty {
            try arm(fd, i)
        }
    }

    func remove(fd: Int32, token: UInt64) throws(SystemError) {
        let i = slot(fd)
        guard slots[i].registered else { return }
        if slots[i].armed {
            _ = try shim("io_uring POLL_REMOVE") { ks_uring_poll_remove(ring, slots[i].token, Self.controlBit) }
        }
        slots[i] = Slot()
    }

    func wait(block: Bool, _ deliver: (UInt64, ReadyEvents) -> Void) throws(SystemError) {
        _ = try shim("io_uring_enter") { ks_uring_submit_and_wait(ring, block ? 1 : 0) }
        while true {
            let n = Int(ks_uring_reap(ring, cqes, Int32(capacity)))
            if n == 0 { break }
            for k in 0..<n {
                let token = cqes[k].token
                if token & Self.controlBit != 0 { continue }
                let res = cqes[k].result
                let fd = Int32(truncatingIfNeeded: token & 0xFFFF_FFFF)
                let i = Int(fd)
                if i < slots.count && slots[i].registered && slots[i].token == token {
                    slots[i].armed = false
                    slots[i].cancelling = false
                    if res == -Errno.ECANCELED.rawValue || slots[i].interest.isEmpty {
                        // Our own cancellation for a widened interest: just re-arm.
                        if !slots[i].interest.isEmpty { try arm(fd, i) }
                        continue
                    }
                } else if res == -Errno.ECANCELED.rawValue {
                    continue  // a retired registration's poll, removed by deregister
                }
                deliver(token, res >= 0 ? ReadyEvents(rawValue: UInt32(res)) : .error)
                // The handler may have removed, re-added or changed the fd.
                if i < slots.count, slots[i].registered, slots[i].token == token,
                   !slots[i].armed, !slots[i].interest.isEmpty
                {
                    try arm(fd, i)
                }
            }
            if n < capacity { break }
        }
    }

    func close() {
        ks_uring_destroy(ring)
        cqes.deallocate()
    }
}
