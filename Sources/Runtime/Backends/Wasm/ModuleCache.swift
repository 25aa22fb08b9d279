#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem

/// Compiled modules on disk, content-addressed: `<dir>/<module digest>.bin` (what the
/// engine serialized) beside `<digest>.sum`, the digest of those bytes. `dir` names the
/// engine and its version, so another version never reads an entry. An entry whose bytes
/// do not match its sum (torn write, corruption) is removed and recompiled, never handed
/// to the engine; entries are written to a temporary name and renamed into place.
public final class ModuleCache {
    public let dir: String

    public init(dir: String) { self.dir = dir }

    /// The key of a module: its content digest.
    public static func key(_ module: [UInt8]) -> String { Files.digest(bytes: module) }

    public func get(_ key: String) -> [UInt8]? {
        let bin = dir + "/" + key + ".bin"
        guard let sum = try? Files.readString(dir + "/" + key + ".sum"), let bytes = try? Files.read(bin, limit: 1 << 30) else { return nil }
        guard let d = try? Files.digest(bin), d.hex == sum.trimmingWhitespace, Int(d.size) == bytes.count else {
            remove(key)
            return nil
        }
        return bytes
    }

    public func put(_ key: String, _ bytes: [UInt8]) {
        do {
            try makeDirectories(dir, mode: 0o700)
            let bin = dir + "/" + key + ".bin"
            try Files.writeAtomically(bin, bytes, mode: 0o600)
            try Files.writeAtomically(dir + "/" + key + ".sum", Array(try Files.digest(bin).hex.utf8), mode: 0o600)
        } catch {
            remove(key)
        }
    }

    public func remove(_ key: String) {
        for ext in [".bin", ".sum", ".bin.tmp", ".sum.tmp"] { _ = unlink(dir + "/" + key + ext) }
    }
}

