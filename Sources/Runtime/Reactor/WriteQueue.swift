#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem

/// Fixed-size chunks shared by every connection of one reactor. A queue that drains
/// gives its chunks back, so an idle connection holds no buffer, and a busy one reuses
/// warm memory instead of faulting in fresh pages for every burst.
final class ChunkPool {
    static let chunkSize = 64 * 1024
    /// Chunks kept for reuse; beyond this they are freed (4 MiB retained at most).
    let maxRetained = 64
    private var free: [UnsafeMutableRawPointer] = []

    func take() -> UnsafeMutableRawPointer {
        return free.popLast() ?? UnsafeMutableRawPointer.allocate(byteCount: Self.chunkSize, alignment: 64)
    }

    func give(_ chunk: UnsafeMutableRawPointer) {
        if free.count < maxRetained { free.append(chunk) } else { chunk.deallocate() }
    }

    func drain() {
        for c in free { c.deallocate() }
        free.removeAll()
    }
}

/// The bytes a connection still owes its peer: a list of pool chunks, read from the
/// head, appended at the tail, flushed with one writev of up to 64 chunks.
struct WriteQueue {
    private var chunks: [UnsafeMutableRawPointer] = []
    private var headOffset = 0   // first unsent byte in chunks[0]
    private var tailFill = 0     // bytes used in chunks.last
    private(set) var count = 0

    var isEmpty: Bool { count == 0 }

    mutating func append(_ bytes: UnsafeRawBufferPointer, pool: ChunkPool) {
        var src = bytes
        while !src.isEmpty {
            if chunks.isEmpty || tailFill == ChunkPool.chunkSize {
                chunks.append(pool.take())
                tailFill = 0
            }
            let n = min(src.count, ChunkPool.chunkSize - tailFill)
            (chunks[chunks.count - 1] + tailFill).copyMemory(from: src.baseAddress!, byteCount: n)
            tailFill += n
            count += n
            src = UnsafeRawBufferPointer(rebasing: src[n...])
        }
    }

    /// One writev of what is queued. Returns the bytes written, 0 when the fd would block.
    mutating func flush(fd: Int32, pool: ChunkPool) throws(SystemError) -> Int {
        guard count > 0 else { return 0 }
        let n = min(chunks.count, 64)
        let result: IOResult<Int> = try withUnsafeTemporaryAllocation(of: iovec.self, capacity: n) { (iov) throws(SystemError) in
            for i in 0..<n {
                let start = i == 0 ? headOffset : 0
                let end = i == chunks.count - 1 ? tailFill : ChunkPool.chunkSize
                iov[i] = iovec(iov_base: chunks[i] + start, iov_len: end - start)
            }
            return try sysNonBlocking("writev", "fd \(fd)") { writev(fd, iov.baseAddress, Int32(n)) }
        }
        guard case .done(let written) = result else { return 0 }
        if written > 0 { consume(written, pool: pool) }
        return written
    }

    private mutating func consume(_ n: Int, pool: ChunkPool) {
        count -= n
        var left = n
        while left > 0 {
            let end = chunks.count == 1 ? tailFill : ChunkPool.chunkSize
            let avail = end - headOffset
            if left >= avail {
                left -= avail
                pool.give(chunks.removeFirst())
                headOffset = 0
                if chunks.isEmpty { tailFill = 0 }
            } else {
                headOffset += left
                left = 0
            }
        }
        if count == 0 {
            // Fully drained: the last chunk may still be held; give it back too.
            for c in chunks { pool.give(c) }
            chunks.removeAll()
            headOffset = 0
            tailFill = 0
        }
    }

    mutating func removeAll(pool: ChunkPool) {
        for c in chunks { pool.give(c) }
        chunks.removeAll()
        headOffset = 0
        tailFill = 0
        count = 0
    }
}
