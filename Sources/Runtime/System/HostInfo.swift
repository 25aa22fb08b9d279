import CShims
import KuasarOCI

/// The monotonic clock (CLOCK_MONOTONIC), in nanoseconds: what deadlines and uptimes
/// are measured with, never the wall clock.
public enum MonotonicClock {
    @inline(__always)
    public static func nanoseconds() -> UInt64 { ks_monotonic_ns() }
}

/// Facts about the host the runtime runs on, for `kuasar info`.
public enum HostInfo {
    /// The libseccomp version the runtime is linked against.
    public static var seccompVersion: String {
        var buf = [CChar](repeating: 0, count: 32)
        ks_seccomp_version(&buf, buf.count)
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
