// Small string helpers the layers share, without Foundation.
extension String {
    /// `%2F` → `/` as in a URI's path or query (nil for a malformed escape or bytes that
    /// are not UTF-8), without Foundation.
    package var percentDecoded: String? {
        var out: [UInt8] = []
        var it = utf8.makeIterator()
        func hex(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
            default: nil
            }
        }
        while let c = it.next() {
            guard c == UInt8(ascii: "%") else { out.append(c); continue }
            guard let h = it.next().flatMap(hex), let l = it.next().flatMap(hex) else { return nil }
            out.append(h << 4 | l)
        }
        return String(validating: out, as: UTF8.self)
    }
}
