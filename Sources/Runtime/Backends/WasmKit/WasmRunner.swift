#if canImport(Glibc)
import Glibc
#endif
import KuasarWasm
import CShims
import KuasarSystem
import KuasarWire

/// The runner's command line, shared by `kuasar wasm-run` and the small `kuasar-wasm-run`
/// executable (the one a wasm container runs: no argument-parser, no Foundation, so it
/// starts in a few milliseconds):
///
///     [--engine wasmkit|wasmtime] [--wasmtime-library SO] [--wasmtime-version V] [--cache DIR]
///     [--dir GUEST=HOST]... [--env K=V]... [--memory-limit BYTES] [--report-fd N] MODULE [-- ARGV...]
///
/// `--memory-limit BYTES`: the container's memory limit (linux.resources.memory.limit);
/// linear memory is capped below it by what the runner itself holds (linearMemoryCap).
///
/// `--report-fd N`: a trap's or a failed start's message goes to descriptor N as well as
/// to stderr (the daemon reads it into its log; stderr is the container's).
///
/// Exit status: the module's (proc_exit), 134 after a trap (its message on stderr), 125
/// when it could not start (the reason on stderr), 2 for a bad command line.
public enum WasmRunner {
    public static let usage = "usage: [--engine wasmkit|wasmtime] [--wasmtime-library SO] [--wasmtime-version V] [--cache DIR] [--compiled FILE] [--dir GUEST=HOST]... [--env K=V]... [--memory-limit BYTES] [--report-fd N] MODULE [-- ARGV...]\n       --engine wasmtime --precompile OUT_FD [--wasmtime-library SO] MODULE"

    public struct Options: Equatable {
        public var engine = "wasmkit"
        public var wasmtimeLibrary: String?
        public var wasmtimeVersion: String?
        public var cache: String?
        /// Compiled code to run instead of compiling (Wasmtime; tried, compiled on refusal).
        public var compiled: String?
        /// Compile only, the serialized code to this descriptor (the daemon's helper).
        public var precompileFD: Int32?
        public var reportFD: Int32?
        public var run: WasmRun
    }

    /// `args` without the program's name.
    public static func parse(_ args: [String]) throws -> Options {
        var engine = "wasmkit", library: String?, version: String?, cache: String?, memory: Int64?, report: Int32?
        var compiled: String?, precompile: Int32?
        var dirs: [(String, String)] = [], env: [String: String] = [:]
        var rest: [String] = []
        var i = 0
        func value(_ flag: String) throws -> String {
            i += 1
            guard i < args.count else { throw RPCError(.invalidArgument, "\(flag) needs a value") }
            return args[i]
        }
        while i < args.count {
            let a = args[i]
            switch a {
            case "--engine": engine = try value(a)
            case "--wasmtime-library": library = try value(a)
            case "--wasmtime-version": version = try value(a)
            case "--cache": cache = try value(a)
            case "--compiled": compiled = try value(a)
            case "--precompile":
                let v = try value(a)
                guard let n = Int32(v), n > 2 else { throw RPCError(.invalidArgument, "--precompile \(v): a descriptor above 2") }
                precompile = n
            case "--report-fd":
                let v = try value(a)
                guard let n = Int32(v), n > 2 else { throw RPCError(.invalidArgument, "--report-fd \(v): a descriptor above 2") }
                report = n
            case "--memory-limit":
                let v = try value(a)
                guard let n = Int64(v), n > 0 else { throw RPCError(.invalidArgument, "--memory-limit \(v): a number of bytes") }
                memory = n
            case "--dir":
                let d = try value(a)
                guard let eq = d.firstIndex(of: "="), d[..<eq].hasPrefix("/"), d.index(after: eq) < d.endIndex else {
                    throw RPCError(.invalidArgument, "--dir \(d): GUEST=HOST, GUEST absolute")
                }
                dirs.append((String(d[..<eq]), String(d[d.index(after: eq)...])))
            case "--env":
                let e = try value(a)
                guard let eq = e.firstIndex(of: "="), eq != e.startIndex else { throw RPCError(.invalidArgument, "--env \(e): K=V") }
                env[String(e[..<eq])] = String(e[e.index(after: eq)...])
            case "--":
                rest += args[(i + 1)...]
                i = args.count
                continue
            default:
                if a.hasPrefix("--") && rest.isEmpty { throw RPCError(.invalidArgument, "unknown option \(a)") }
                rest.append(a)
            }
            i += 1
        }
        guard let module = rest.first else { throw RPCError(.invalidArgument, "no module given") }
        var run = WasmRun(module: module, args: rest.count > 1 ? Array(rest.dropFirst()) : [module])
        run.environment = env
        run.preopens = dirs
        run.memoryLimit = memory
        if precompile != nil && engine != "wasmtime" { throw RPCError(.invalidArgument, "--precompile: only the wasmtime engine keeps compiled code") }
        return Options(engine: engine, wasmtimeLibrary: library, wasmtimeVersion: version, cache: cache, compiled: compiled,
                       precompileFD: precompile, reportFD: report, run: run)
    }

    public static func engine(_ o: Options) throws -> WasmEngine {
        switch o.engine {
        case "wasmkit": return WasmKitEngine()
        case "wasmtime":
            // Refused bytes (another version's) are compiled over, so an unreadable file is too.
            return try Wasmtime(library: o.wasmtimeLibrary, cacheDir: o.cache, version: o.wasmtimeVersion,
                                precompiled: o.compiled.flatMap { try? Files.read($0, limit: 1 << 30) })
        default: throw RPCError(.invalidArgument, "engine \(o.engine): not one of wasmkit, wasmtime")
        }
    }

    /// The daemon's compile helper, run on the host, never in a container: loads Wasmtime
    /// and reads the module, then gives up root (nobody, no groups, no_new_privs, nice 10)
    /// before the compiler parses untrusted bytes, and writes the serialized code to `out`.
    /// Nothing of the module runs.
    static func precompile(_ o: Options, to out: Int32) throws {
        let w = try Wasmtime(library: o.wasmtimeLibrary, cacheDir: nil, version: o.wasmtimeVersion)
        let bytes = try WasmModuleFile.read(o.run.module)
        let rc = ks_become_unprivileged(65534, 10)
        guard rc == 0 else { throw SystemError("drop privileges", "uid 65534", errno: Errno(rawValue: -rc)) }
        try Files.writeAll(out, try w.precompile(bytes, path: o.run.module), name: "the compiled code")
    }

    /// Linear memory under the container's memory limit: the limit less what this process
    /// already holds (the engine and its libraries, loaded by now) and `headroom` for what
    /// the engine allocates beside the module (compiled code, stacks, WASI buffers), so
    /// that memory.grow (malloc's NULL) fails before the cgroup's OOM killer must act.
    /// Never less than one wasm page.
    public static func linearMemoryCap(containerLimit: Int64, resident: Int64, headroom: Int64 = 16 << 20) -> Int64 {
        max(65_536, containerLimit - resident - headroom)
    }

    /// This process's resident set (/proc/self/statm), 0 when unreadable.
    static func residentBytes() -> Int64 {
        guard let text = try? Files.readString("/proc/self/statm") else { return 0 }
        let fields = text.split(separator: " ")
        guard fields.count > 1, let pages = Int64(fields[1]) else { return 0 }
        return pages * Int64(sysconf(Int32(_SC_PAGESIZE)))
    }

    /// Parses, runs, reports; the process's exit status.
    public static func main(_ args: [String], name: String) -> Int32 {
        func say(_ s: String) { _ = s.withCString { write(2, $0, strlen($0)) } }
        let options: Options
        do { options = try parse(args) } catch {
            say("\(name): \(RPCError.from(error).message)\n\(usage)\n")
            return 2
        }
        func report(_ s: String) {
            say(s)
            if let fd = options.reportFD { _ = s.withCString { write(fd, $0, strlen($0)) } }
        }
        if let out = options.precompileFD {
            do {
                try precompile(options, to: out)
                return 0
            } catch {
                say("\(name): precompile \(options.run.module): \(RPCError.from(error).message)\n")
                return 1
            }
        }
        let outcome: WasmOutcome
        do {
            let engine = try engine(options)
            var run = options.run
            if let limit = run.memoryLimit { run.memoryLimit = linearMemoryCap(containerLimit: limit, resident: residentBytes()) }
            outcome = try engine.run(run)
        } catch {
            report("\(name): \(RPCError.from(error).message)\n")
            return 125
        }
        if case .trapped(let why) = outcome { report("\(name): \(options.run.module): wasm trap: \(why)\n") }
        return outcome.exitCode
    }
}
