#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem
import KuasarWire

/// Wasmtime through its C API, loaded at run time with dlopen from the shared library
/// PyPI's `wasmtime` package ships (`wasmtime/linux-x86_64/_libwasmtime.so`): no link-time
/// dependency, so a host without it builds and runs and says why the engine is absent.
/// Only the functions called here are declared, from the public headers' signatures.
/// Compiled modules are cached (`ModuleCache`), keyed by the module's digest and the
/// engine's version; or handed in ready (`precompiled`: what the daemon compiled outside
/// any container, in a sealed memfd), tried before compiling.
public final class Wasmtime: WasmEngine {
    public let name = "wasmtime"
    public let library: String
    public let version: String
    let cache: ModuleCache?
    /// Serialized compiled code of the module about to run, from whoever vouches for it.
    let precompiled: [UInt8]?
    private let api: API

    /// The library found where pip puts it, for `wasmtime_library = ""` in the config.
    public static func findLibrary() -> String? {
        var roots: [String] = []
        for base in ["/usr/local/lib", "/usr/lib", "/root/.local/lib"] {
            for py in Files.list(base) where py.hasPrefix("python3") { roots += [base + "/" + py + "/site-packages", base + "/" + py + "/dist-packages"] }
        }
        roots.append("/usr/lib/python3/dist-packages")
        for v in Files.list("/root/.pyenv/versions") {
            for py in Files.list("/root/.pyenv/versions/\(v)/lib") where py.hasPrefix("python3") { roots.append("/root/.pyenv/versions/\(v)/lib/\(py)/site-packages") }
        }
        return roots.map { $0 + "/wasmtime/linux-x86_64/_libwasmtime.so" }.first { access($0, R_OK) == 0 }
    }

    /// The version pip recorded beside the library (`wasmtime-<v>.dist-info`), else the
    /// library's digest (what the cache must tell apart).
    static func version(of library: String) -> String {
        // <site>/wasmtime/linux-x86_64/_libwasmtime.so
        let site = parentDirectory(parentDirectory(parentDirectory(library)))
        for entry in Files.list(site) where entry.hasPrefix("wasmtime-") && entry.hasSuffix(".dist-info") {
            return String(entry.dropFirst("wasmtime-".count).dropLast(".dist-info".count))
        }
        return (try? Files.digest(library).hex).map { "lib-" + $0.prefix(16) } ?? "unknown"
    }

    /// Loads `library` (found automatically when nil); throws why it cannot be used.
    /// `version` overrides what pip recorded (the wasm kind's runner gets the library as a
    /// /proc/self/fd path, with nothing beside it).
    public init(library: String?, cacheDir: String?, version: String? = nil, precompiled: [UInt8]? = nil) throws {
        guard let path = library ?? Self.findLibrary() else {
            throw RPCError(.failedPrecondition, "wasmtime: no library found (pip install wasmtime ships wasmtime/linux-x86_64/_libwasmtime.so; or set [wasm] wasmtime_library)")
        }
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            throw RPCError(.failedPrecondition, "wasmtime: dlopen \(path): \(dlerror().map { String(cString: $0) } ?? "unknown error")")
        }
        self.library = path
        let version = version ?? Self.version(of: path)
        self.version = version
        api = try API(handle, path)
        cache = cacheDir.map { ModuleCache(dir: $0 + "/wasmtime-" + version) }
        self.precompiled = precompiled
    }

    // MARK: run

    public func run(_ run: WasmRun) throws -> WasmOutcome {
        let bytes = try WasmModuleFile.read(run.module)
        guard let engine = api.engineNew() else { throw RPCError(.internal, "wasmtime: wasm_engine_new failed") }
        defer { api.engineDelete(engine) }
        let module = try compile(engine, bytes, path: run.module)
        defer { api.moduleDelete(module) }
        guard let store = api.storeNew(engine, nil, nil) else { throw RPCError(.internal, "wasmtime: wasmtime_store_new failed") }
        defer { api.storeDelete(store) }
        if let limit = run.memoryLimit { api.storeLimiter(store, limit, -1, -1, -1, -1) }
        let context = api.storeContext(store)
        try wasi(run, context)
        guard let linker = api.linkerNew(engine) else { throw RPCError(.internal, "wasmtime: wasmtime_linker_new failed") }
        defer { api.linkerDelete(linker) }
        try check(api.linkerDefineWasi(linker), "define WASI")
        try check(api.linkerModule(linker, context, "", 0, module), "link \(run.module)", code: .failedPrecondition)
        var start = Func(storeID: 0, opaque: nil)
        try check(api.linkerGetDefault(linker, context, "", 0, &start), "find the start function of \(run.module)", code: .failedPrecondition)
        var trap: OpaquePointer?
        let error = api.funcCall(context, &start, nil, 0, nil, 0, &trap)
        if let trap {
            defer { api.trapDelete(trap) }
            return .trapped(message(trap, api.trapMessage))
        }
        guard let error else { return .exited(0) }
        defer { api.errorDelete(error) }
        var status: Int32 = 0
        if api.errorExitStatus(error, &status) { return .exited(status) }
        return .trapped(message(error, api.errorMessage))
    }

    /// Handed in ready, or from the cache when a sound entry is there; else compiled (and
    /// cached when there is a cache).
    private func compile(_ engine: OpaquePointer, _ bytes: [UInt8], path: String) throws -> OpaquePointer {
        if let ready = precompiled, let module = deserialize(engine, ready) { return module }
        let key = cache.map { _ in ModuleCache.key(bytes) }
        if let cache, let key, let compiled = cache.get(key, module: bytes) {
            if let module = deserialize(engine, compiled) { return module }
            cache.remove(key)
        }
        let module = try compileFresh(engine, bytes, path: path)
        if let cache, let key, let out = serialize(module) { cache.put(key, out, module: bytes) }
        return module
    }

    /// The module's compiled code, serialized: what `precompiled` takes. Nothing runs.
    public func precompile(_ bytes: [UInt8], path: String) throws -> [UInt8] {
        guard let engine = api.engineNew() else { throw RPCError(.internal, "wasmtime: wasm_engine_new failed") }
        defer { api.engineDelete(engine) }
        let module = try compileFresh(engine, bytes, path: path)
        defer { api.moduleDelete(module) }
        guard let out = serialize(module) else { throw RPCError(.internal, "wasmtime: serialize \(path) failed") }
        return out
    }

    private func compileFresh(_ engine: OpaquePointer, _ bytes: [UInt8], path: String) throws -> OpaquePointer {
        var module: OpaquePointer?
        let e = bytes.withUnsafeBufferPointer { api.moduleNew(engine, $0.baseAddress, $0.count, &module) }
        try check(e, "compile \(path)", code: .invalidArgument)
        guard let module else { throw RPCError(.internal, "wasmtime: compile \(path): no module") }
        return module
    }

    /// nil when the engine refuses the bytes (another version's, or damaged).
    private func deserialize(_ engine: OpaquePointer, _ compiled: [UInt8]) -> OpaquePointer? {
        var module: OpaquePointer?
        let e = compiled.withUnsafeBufferPointer { api.moduleDeserialize(engine, $0.baseAddress, $0.count, &module) }
        if let e { api.errorDelete(e) }
        return e == nil ? module : nil
    }

    private func serialize(_ module: OpaquePointer) -> [UInt8]? {
        var out = ByteVec(size: 0, data: nil)
        if let e = api.moduleSerialize(module, &out) {
            api.errorDelete(e)
            return nil
        }
        guard let data = out.data else { return nil }
        defer { api.byteVecDelete(&out) }
        return Array(UnsafeBufferPointer(start: data, count: out.size))
    }

    private func wasi(_ run: WasmRun, _ context: OpaquePointer?) throws {
        guard let config = api.wasiConfigNew() else { throw RPCError(.internal, "wasmtime: wasi_config_new failed") }
        withCStrings(run.args) { api.wasiSetArgv(config, run.args.count, $0) }
        let env = run.environment.sorted { $0.key < $1.key }
        withCStrings(env.map(\.key)) { names in withCStrings(env.map(\.value)) { values in api.wasiSetEnv(config, env.count, names, values) } }
        api.wasiInheritStdin(config)
        api.wasiInheritStdout(config)
        api.wasiInheritStderr(config)
        for p in run.preopens {
            // Directory and file permissions read+write (3): a 3-argument library ignores them.
            guard api.wasiPreopenDir(config, p.host, p.guest, 3, 3) else {
                throw RPCError(.failedPrecondition, "wasmtime: preopen \(p.host) as \(p.guest): it cannot be opened")
            }
        }
        try check(api.contextSetWasi(context, config), "configure WASI")
    }

    private func check(_ error: OpaquePointer?, _ what: String, code: RPCCode = .internal) throws {
        guard let error else { return }
        defer { api.errorDelete(error) }
        throw RPCError(code, "wasmtime: \(what): \(message(error, api.errorMessage))")
    }

    private func message(_ p: OpaquePointer, _ get: (OpaquePointer?, UnsafeMutableRawPointer) -> Void) -> String {
        var vec = ByteVec(size: 0, data: nil)
        get(p, &vec)
        defer { api.byteVecDelete(&vec) }
        guard let data = vec.data else { return "(no message)" }
        let bytes = UnsafeBufferPointer(start: data, count: vec.size)
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    private func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> R) -> R {
        let copies = strings.map { strdup($0) }
        defer { for c in copies { free(c) } }
        let pointers: [UnsafePointer<CChar>?] = copies.map { $0.map { UnsafePointer($0) } }
        return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
    }

    // MARK: the C API

    /// wasm.h's `wasm_byte_vec_t` (also `wasm_name_t`, `wasm_message_t`): two words.
    struct ByteVec {
        var size: Int
        var data: UnsafeMutablePointer<UInt8>?
    }

    /// wasmtime/extern.h's `wasmtime_func_t`: a store id and a word (an index or a pointer,
    /// by version; 16 bytes in all of them).
    struct Func {
        var storeID: UInt64
        var opaque: UnsafeMutableRawPointer?
    }

    /// The functions, looked up once; a missing one names itself.
    struct API {
        typealias P = OpaquePointer
        let engineNew: @convention(c) () -> P?
        let engineDelete: @convention(c) (P?) -> Void
        let storeNew: @convention(c) (P?, UnsafeMutableRawPointer?, (@convention(c) (UnsafeMutableRawPointer?) -> Void)?) -> P?
        let storeContext: @convention(c) (P?) -> P?
        let storeDelete: @convention(c) (P?) -> Void
        let storeLimiter: @convention(c) (P?, Int64, Int64, Int64, Int64, Int64) -> Void
        let moduleNew: @convention(c) (P?, UnsafePointer<UInt8>?, Int, UnsafeMutablePointer<P?>?) -> P?
        let moduleDelete: @convention(c) (P?) -> Void
        let moduleSerialize: @convention(c) (P?, UnsafeMutableRawPointer) -> P?
        let moduleDeserialize: @convention(c) (P?, UnsafePointer<UInt8>?, Int, UnsafeMutablePointer<P?>?) -> P?
        let byteVecDelete: @convention(c) (UnsafeMutableRawPointer) -> Void
        let linkerNew: @convention(c) (P?) -> P?
        let linkerDelete: @convention(c) (P?) -> Void
        let linkerDefineWasi: @convention(c) (P?) -> P?
        let linkerModule: @convention(c) (P?, P?, UnsafePointer<CChar>?, Int, P?) -> P?
        let linkerGetDefault: @convention(c) (P?, P?, UnsafePointer<CChar>?, Int, UnsafeMutableRawPointer) -> P?
        let funcCall: @convention(c) (P?, UnsafeRawPointer, UnsafeRawPointer?, Int, UnsafeMutableRawPointer?, Int, UnsafeMutablePointer<P?>) -> P?
        let wasiConfigNew: @convention(c) () -> P?
        // Older libraries return void, newer bool: the result is not read.
        let wasiSetArgv: @convention(c) (P?, Int, UnsafePointer<UnsafePointer<CChar>?>) -> Void
        let wasiSetEnv: @convention(c) (P?, Int, UnsafePointer<UnsafePointer<CChar>?>, UnsafePointer<UnsafePointer<CChar>?>) -> Void
        let wasiInheritStdin: @convention(c) (P?) -> Void
        let wasiInheritStdout: @convention(c) (P?) -> Void
        let wasiInheritStderr: @convention(c) (P?) -> Void
        let wasiPreopenDir: @convention(c) (P?, UnsafePointer<CChar>, UnsafePointer<CChar>, Int, Int) -> Bool
        let contextSetWasi: @convention(c) (P?, P?) -> P?
        let errorExitStatus: @convention(c) (P?, UnsafeMutablePointer<Int32>) -> Bool
        let errorMessage: @convention(c) (P?, UnsafeMutableRawPointer) -> Void
        let errorDelete: @convention(c) (P?) -> Void
        let trapMessage: @convention(c) (P?, UnsafeMutableRawPointer) -> Void
        let trapDelete: @convention(c) (P?) -> Void

        init(_ handle: UnsafeMutableRawPointer, _ path: String) throws {
            func f<T>(_ name: String) throws -> T {
                guard let sym = dlsym(handle, name) else { throw RPCError(.failedPrecondition, "wasmtime: \(path) has no \(name) (not Wasmtime's C API, or too old)") }
                return unsafeBitCast(sym, to: T.self)
            }
            engineNew = try f("wasm_engine_new"); engineDelete = try f("wasm_engine_delete")
            storeNew = try f("wasmtime_store_new"); storeContext = try f("wasmtime_store_context")
            storeDelete = try f("wasmtime_store_delete"); storeLimiter = try f("wasmtime_store_limiter")
            moduleNew = try f("wasmtime_module_new"); moduleDelete = try f("wasmtime_module_delete")
            moduleSerialize = try f("wasmtime_module_serialize"); moduleDeserialize = try f("wasmtime_module_deserialize")
            byteVecDelete = try f("wasm_byte_vec_delete")
            linkerNew = try f("wasmtime_linker_new"); linkerDelete = try f("wasmtime_linker_delete")
            linkerDefineWasi = try f("wasmtime_linker_define_wasi"); linkerModule = try f("wasmtime_linker_module")
            linkerGetDefault = try f("wasmtime_linker_get_default"); funcCall = try f("wasmtime_func_call")
            wasiConfigNew = try f("wasi_config_new"); wasiSetArgv = try f("wasi_config_set_argv"); wasiSetEnv = try f("wasi_config_set_env")
            wasiInheritStdin = try f("wasi_config_inherit_stdin"); wasiInheritStdout = try f("wasi_config_inherit_stdout")
            wasiInheritStderr = try f("wasi_config_inherit_stderr"); wasiPreopenDir = try f("wasi_config_preopen_dir")
            contextSetWasi = try f("wasmtime_context_set_wasi")
            errorExitStatus = try f("wasmtime_error_exit_status"); errorMessage = try f("wasmtime_error_message")
            errorDelete = try f("wasmtime_error_delete")
            trapMessage = try f("wasm_trap_message"); trapDelete = try f("wasm_trap_delete")
        }
    }
}

/// The directory a path is in ("/" for a top-level one).
package func parentDirectory(_ path: String) -> String {
    guard let i = path.lastIndex(of: "/") else { return "." }
    return i == path.startIndex ? "/" : String(path[..<i])
}
