import KuasarSystem
import KuasarReactor
/// Bytes received from a peer and not yet taken by a frame decoder. Indices are
/// relative to the first unconsumed byte. The consumed prefix is dropped once it
/// dominates, so a long-lived connection keeps only what it has not parsed yet.
package struct InputBuffer: Sendable {
    private var bytes: [UInt8] = []
    private var start = 0

    package var count: Int { bytes.count - start }

    package init() {}

    package subscript(i: Int) -> UInt8 { bytes[start + i] }

    package func slice(_ range: Range<Int>) -> ArraySlice<UInt8> {
        bytes[(start + range.lowerBound)..<(start + range.upperBound)]
    }

    package mutating func append(_ raw: UnsafeRawBufferPointer) {
        if start > 0 && start == bytes.count { reset() }
        bytes.append(contentsOf: raw)
    }

    package mutating func consume(_ n: Int) {
        start += n
        compact()
    }

    private mutating func compact() {
        if start == bytes.count {
            reset()
        } else if start > 64 * 1024 && start > bytes.count / 2 {
            bytes.removeFirst(start)
            start = 0
        }
    }

    private mutating func reset() {
        bytes.removeAll(keepingCapacity: bytes.capacity <= 64 * 1024)
        start = 0
    }
}
