#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem
import KuasarWire

/// What a module is run with: WASI preview 1 arguments, environment, preopened
/// directories, and limits. Stdio is the process's own fds 0, 1 and 2 (the container
/// engine wires them to containerd's FIFOs or a pty before the runner starts).
public struct WasmRun: Sendable, Equatable {
    public var module: String
    /// `args[0]` is the program's name as the module sees it.
    public var args: [String]
    public var environment: [String: String] = [:]
    /// (guest path, host directory): the rootfs as "/", the OCI mounts beside it.
    public var preopens: [(guest: String, host: String)] = []
    /// Linear memory cap in bytes (the runner derives it from linux.resources.memory.limit); nil: the engine's.
    public var memoryLimit: Int64?

    public init(module: String, args: [String]) {
        self.module = module
        self.args = args
    }

    public static func == (a: WasmRun, b: WasmRun) -> Bool {
        a.module == b.module && a.args == b.args && a.environment == b.environment && a.memoryLimit == b.memoryLimit
            && a.preopens.map { "\($0.guest)=\($0.host)" } == b.preopens.map { "\($0.guest)=\($0.host)" }
    }
}

/// How a module ended.
public enum WasmOutcome: Sendable, Equatable {
    /// `proc_exit(n)`, or 0 when `_start` returned.
    case exited(Int32)
    /// A trap (unreachable, out-of-bounds access, a limit hit): reported as exit 134.
    case trapped(String)

    public var exitCode: Int32 {
        switch self {
        case .exited(let n): return n
        case .trapped: return 134
        }
    }
}

/// One WebAssembly engine behind the wasm kind. An engine compiles and runs a module in
/// the calling process: the daemon never does, a runner child does (`kuasar wasm-run`).
public protocol WasmEngine: AnyObject {
    /// "wasmtime", "wasmkit".
    var name: String { get }
    /// Its version, as it reports it ("unknown" when it cannot tell).
    var version: String { get }
    /// Compiles (or takes from the cache) and runs `run`; throws a clear error for a module
    /// that is not valid, an import nothing provides, a directory that cannot be opened.
    func run(_ run: WasmRun) throws -> WasmOutcome
}

/// Checks before any engine sees a file: readable, not too large, the wasm magic and
/// version 1 (a component or a text file is named as such).
public enum WasmModuleFile {
    public static let maxBytes = 256 << 20

    public static func read(_ path: String) throws -> [UInt8] {
        var st = stat()
        guard stat(path, &st) == 0 else { throw RPCError(.notFound, "module \(path): \(Errno(rawValue: errno))") }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw RPCError(.invalidArgument, "module \(path) is not a regular file") }
        guard st.st_size <= maxBytes else {
            throw RPCError(.invalidArgument, "module \(path) is \(st.st_size >> 20) MiB: more than the \(maxBytes >> 20) MiB a module may be")
        }
        let bytes: [UInt8]
        do { bytes = try Files.read(path, limit: maxBytes) } catch { throw RPCError(.invalidArgument, "module \(path): \(error)") }
        try check(bytes, path: path)
        return bytes
    }

    public static func check(_ bytes: [UInt8], path: String) throws {
        guard bytes.count >= 8, bytes[0] == 0, bytes[1] == 0x61, bytes[2] == 0x73, bytes[3] == 0x6d else {
            let text = bytes.prefix(16).allSatisfy { $0 == 9 || $0 == 10 || $0 == 13 || (32..<127).contains($0) } && !bytes.isEmpty
            throw RPCError(.invalidArgument, "\(path) is not a WebAssembly module (no \\0asm magic\(text ? "; it looks like text — WAT must be compiled first" : ""))")
        }
        let version = UInt32(bytes[4]) | UInt32(bytes[5]) << 8 | UInt32(bytes[6]) << 16 | UInt32(bytes[7]) << 24
        guard version == 1 else {
            throw RPCError(.invalidArgument, "\(path) is a WebAssembly binary of version/layer 0x\(String(version, radix: 16)) (a component?): only core modules (version 1) run")
        }
    }
}
