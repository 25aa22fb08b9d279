import CShims

/// Facts about the host the runtime runs on, for `kuasar info`.
public enum RuntimeInfo {
    public static var seccompVersion: String {
        var buf = [CChar](repeating: 0, count: 32)
        ks_seccomp_version(&buf, buf.count)
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
