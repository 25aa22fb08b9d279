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
        guard let sum = try? Files.readString(dir + "/" + key + ".sum"),
              let source = try? Files.read(dir + "/" + key + ".wasm", limit: module.count + 1),
              let bytes = try? Files.read(dir + "/" + key + ".bin", limit: 1 << 30) else { return nil }
        guard source == module else { return nil }
        guard Files.digest(bytes: bytes) == sum.trimmingWhitespace else {
            remove(key)
            return nil
        }
        return bytes
    }

    /// Stores what `module` compiled to. The sum goes last: an entry without one is never
    /// read. Not synced (the daemon writes entries on its loop, and a crash can only leave an
    /// entry whose sum does not match, which is removed and recompiled).
    public func put(_ key: String, _ bytes: [UInt8], module: [UInt8]) {
        do {
            try makeDirectories(dir, mode: 0o700)
            try Files.writeAtomically(dir + "/" + key + ".wasm", module, mode: 0o600, durable: false)
            try Files.writeAtomically(dir + "/" + key + ".bin", bytes, mode: 0o600, durable: false)
            try Files.writeAtomically(dir + "/" + key + ".sum", Array(Files.digest(bytes: bytes).utf8), mode: 0o600, durable: false)
        } catch {
            remove(key)
        }
    }

    public func remove(_ key: String) {
        for ext in [".sum", ".bin", ".wasm", ".bin.tmp", ".sum.tmp", ".wasm.tmp"] { _ = unlink(dir + "/" + key + ext) }
    }
}

