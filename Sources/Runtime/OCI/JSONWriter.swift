/// JSON for documents built as dictionaries (`[String: Any]`: features, hook state,
/// status info), written without Foundation's JSONSerialization so the layers the guest
/// agent links stay on FoundationEssentials. Keys are sorted, so the same document
/// always gives the same bytes.
public enum JSONWriter {
    /// The document's bytes; values that are not JSON (a Date, a class) are written as null.
    public static func bytes(_ value: Any) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(256)
        write(value, into: &out)
        return out
    }

    public static func string(_ value: Any) -> String { String(decoding: bytes(value), as: UTF8.self) }

    private static func write(_ value: Any, into out: inout [UInt8]) {
        switch value {
        case let s as String: writeString(s, into: &out)
        case let b as Bool: out.append(contentsOf: Array((b ? "true" : "false").utf8))
        case let i as Int: out.append(contentsOf: Array(String(i).utf8))
        case let i as Int32: out.append(contentsOf: Array(String(i).utf8))
        case let i as Int64: out.append(contentsOf: Array(String(i).utf8))
        case let i as UInt32: out.append(contentsOf: Array(String(i).utf8))
        case let i as UInt64: out.append(contentsOf: Array(String(i).utf8))
        case let d as Double:
            if d.isFinite {
                // Integral values print without a fraction, as JSONSerialization does.
                if d == d.rounded(), abs(d) < 1e15 { out.append(contentsOf: Array(String(Int64(d)).utf8)) } else { out.append(contentsOf: Array("\(d)".utf8)) }
            } else {
                out.append(contentsOf: Array("null".utf8))
            }
        case let a as [Any]:
            out.append(UInt8(ascii: "["))
            for (i, v) in a.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                write(v, into: &out)
            }
            out.append(UInt8(ascii: "]"))
        case let d as [String: Any]:
            out.append(UInt8(ascii: "{"))
            for (i, k) in d.keys.sorted().enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                writeString(k, into: &out)
                out.append(UInt8(ascii: ":"))
                write(d[k]!, into: &out)
            }
            out.append(UInt8(ascii: "}"))
        case let o as Optional<Any>:
            if let v = o { write(v, into: &out) } else { out.append(contentsOf: Array("null".utf8)) }
        default:
            out.append(contentsOf: Array("null".utf8))
        }
    }

    private static let hex = Array("0123456789abcdef".utf8)

    private static func writeString(_ s: String, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\"")])
            case UInt8(ascii: "\\"): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\\")])
            case 0x0A: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "n")])
            case 0x0D: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "r")])
            case 0x09: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "t")])
            case 0..<0x20:
                out.append(contentsOf: Array("\\u00".utf8))
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 0xF)])
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}
