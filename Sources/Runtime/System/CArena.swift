#if canImport(Glibc)
import Glibc
#endif
import KuasarOCI

/// C memory for one launch: strings and arrays that live until `free()`.
final class CArena {
    private var blocks: [UnsafeMutableRawPointer] = []

    func string(_ s: String) -> UnsafePointer<CChar> {
        let p = strdup(s)!
        blocks.append(UnsafeMutableRawPointer(p))
        return UnsafePointer(p)
    }

    func stringArray(_ list: [String]) -> UnsafePointer<UnsafeMutablePointer<CChar>?> {
        let p = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: list.count + 1)
        for (i, s) in list.enumerated() { p[i] = UnsafeMutablePointer(mutating: string(s)) }
        p[list.count] = nil
        blocks.append(UnsafeMutableRawPointer(p))
        return UnsafePointer(p)
    }

    func constStringArray(_ list: [String]) -> UnsafePointer<UnsafePointer<CChar>?> {
        let p = UnsafeMutablePointer<UnsafePointer<CChar>?>.allocate(capacity: max(1, list.count))
        for (i, s) in list.enumerated() { p[i] = string(s) }
        blocks.append(UnsafeMutableRawPointer(p))
        return UnsafePointer(p)
    }

    func array<T>(_ values: [T]) -> UnsafePointer<T> {
        let p = UnsafeMutablePointer<T>.allocate(capacity: max(1, values.count))
        for (i, v) in values.enumerated() { (p + i).initialize(to: v) }
        blocks.append(UnsafeMutableRawPointer(p))
        return UnsafePointer(p)
    }

    func free() {
        for b in blocks { Glibc.free(b) }
        blocks.removeAll()
    }
}
