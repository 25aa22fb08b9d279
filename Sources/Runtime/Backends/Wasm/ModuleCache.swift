#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem

/// Compiled modules on disk, content-addressed: `<dir>/<module digest>.bin` (what the
/// engine serialized) beside `<digest>.sum`, the digest of those bytes, and
/// `<digest>.wasm`, the module it was compiled from. `dir` names the engine and its
/// version, so another version never reads an entry. The digest is not cryptographic, so
/// an entry is handed out only for the very module it was made from (the bytes compared,
/// not the digest trusted): a module made to collide with another's digest never gets the
/// other's code. An entry whose bytes do not match its sum (torn write, corruption) is
/// removed and recompiled; entries are written to a temporary name and renamed into place.
public final class ModuleCache {
    public let dir: String

    public init(dir: String) { self.dir = dir }

    /// The key of a module: its content digest.
    public static func key(_ module: [UInt8]) -> String { Files.digest(bytes: module) }

    /// The compiled bytes of `module` (whose key is `key`), when a sound entry for it is there.
    public func get(_ key: String, module: [UInt8]) -> [UInt8]? {
        let bin = dir + "/" + key + ".bin"
        guard let sum = try? Files.readString(dir + "/" + key + ".sum"),
              let source = try? Files.read(dir + "/" + key + ".wasm", limit: module.count + 1),
              let bytes = try? Files.read(bin, limit: 1 << 30) else { return nil }
        guard source == module else { return nil }
        guard let d = try? Files.digest(bin), d.hex == sum.trimmingWhitespace, Int(d.size) == bytes.count else {
            remove(key)
            return nil
        }
        return bytes
    }

    /// Stores what `module` compiled to. The sum goes last: an entry without one is never read.
    public func put(_ key: String, _ bytes: [UInt8], module: [UInt8]) {
        do {
            try makeDirectories(dir, mode: 0o700)
            let bin = dir + "/" + key + ".bin"
            try Files.writeAtomically(dir + "/" + key + ".wasm", module, mode: 0o600)
            try Files.writeAtomically(bin, bytes, mode: 0o600)
            try Files.writeAtomically(dir + "/" + key + ".sum", Array(try Files.digest(bin).hex.utf8), mode: 0o600)
        } catch {
            remove(key)
        }
    }

    public func remove(_ key: String) {
        for ext in [".sum", ".bin", ".wasm", ".bin.tmp", ".sum.tmp", ".wasm.tmp"] { _ = unlink(dir + "/" + key + ext) }
    }
}

