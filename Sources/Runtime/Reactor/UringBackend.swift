import CShims

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
        var armed = false
        var registered = false
    }
    private var slots: [Slot] = []

    static let isAvailable: Bool = {
        var err: Int32 = 0
        guard ks_uring_probe_ok() != 0, let r = ks_uring_create(4, &err) else { return false }
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
            // An armed poll is never cancelled here: a cancelled poll and a new one with
            // the same token could both be in flight. Narrowing to nothing leaves it
            // armed, and its completion is dropped without a re-arm; anything else
            // changes its mask in place. If it already fired, the update fails with
            // ENOENT and the completion on its way re-arms with the new interest.
            if !interest.isEmpty {
                _ = try shim("io_uring POLL_UPDATE") {
                    ks_uring_poll_update(ring, slots[i].token, interest.pollMask, Self.controlBit)
                }
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
                // Only polls of retired tokens are ever cancelled.
                if res == -Errno.ECANCELED.rawValue { continue }
                let fd = Int32(truncatingIfNeeded: token & 0xFFFF_FFFF)
                let i = Int(fd)
                if i < slots.count && slots[i].registered && slots[i].token == token {
                    slots[i].armed = false
                    if slots[i].interest.isEmpty { continue }
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
