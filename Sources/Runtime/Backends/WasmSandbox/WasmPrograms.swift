#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarSandbox
import KuasarWasm

/// The wasm kind's containers: a pod like the namespace kind's (its holder, namespaces,
/// cgroup parent), whose containers with a WebAssembly entrypoint run the module instead
/// of a rootfs binary. Each such process is an ordinary container child — the pod's
/// namespaces, its own cgroup, the rootfs pivoted to, the spec's mounts, capabilities,
/// seccomp and user — that executes `kuasar-wasm-run` at the last step. The runner is not
/// in the rootfs: the daemon opened the host's dynamic loader, the runner and its library
/// directories once, and the child executes the loader from its descriptor with
/// `--library-path /proc/self/fd/N`, so nothing in a rootfs can stand in for them and a
/// rootfs needs nothing but its module. The daemon's loop never runs guest code.
///
/// The entrypoint is a module when `process.args[0]` (resolved in the rootfs as execvp
/// would, symlinks kept inside it) starts with the wasm magic, ends in `.wasm`, or the
/// image says `module.wasm.image/variant: compat`; anything else runs as a Linux process.
/// The module is checked at Create (header, sections within the file, WASI-only imports),
/// so a bad module fails Create with its problem named.
public final class WasmPrograms: ProcessPrograms {
    public struct Settings: Sendable {
        public var engine: String
        public var engineAnnotation: Bool
        public var wasmtimeLibrary: String?
        public var cacheDir: String
        public var runner: String

        public init(engine: String = "wasmkit", engineAnnotation: Bool = true, wasmtimeLibrary: String? = nil, cacheDir: String, runner: String) {
            self.engine = engine
            self.engineAnnotation = engineAnnotation
            self.wasmtimeLibrary = wasmtimeLibrary
            self.cacheDir = cacheDir
            self.runner = runner
        }
    }

    public static let engineAnnotation = "io.kuasar.wasm.engine"
    public static let variantAnnotation = "module.wasm.image/variant"

    public let settings: Settings
    let logger: Logger
    private var image: RunnerImage?
    private var imageError: String?
    private var wasmtime: WasmtimeFiles?
    private var wasmtimeError: String?
    /// Per running module process ("container/exec"): a memfd the runner writes its trap
    /// or start failure to, read at its exit into the daemon's log.
    private var reports: [String: Int32] = [:]

    /// Runs the compile helper (nil: no compiled code is kept, each runner compiles).
    let supervisor: ProcessSupervisor?

    public init(settings: Settings, supervisor: ProcessSupervisor? = nil, logger: Logger) {
        self.settings = settings
        self.supervisor = supervisor
        self.logger = logger
    }

    /// Why no module can run (the runner or the loader is missing); nil: they can.
    public var unavailableReason: String? {
        _ = loadImage()
        return imageError
    }

    private func loadImage() -> RunnerImage? {
        if let image { return image }
        do {
            image = try RunnerImage(runner: settings.runner)
            imageError = nil
        } catch {
            imageError = RPCError.from(error).message
        }
        return image
    }

    /// Wasmtime's library and the cache directory, opened at its first use.
    private func loadWasmtime() throws -> WasmtimeFiles {
        if let wasmtime { return wasmtime }
        do {
            let w = try WasmtimeFiles(library: settings.wasmtimeLibrary, cacheDir: settings.cacheDir)
            wasmtime = w
            return w
        } catch {
            throw RPCError(.failedPrecondition, "engine wasmtime is not available: \(RPCError.from(error).message)")
        }
    }

    public func program(for process: OCISpec.Process, of spec: OCISpec, rootfs: String, containerID: String, execID: String) throws -> HostProgram? {
        let isInit = execID.isEmpty
        guard let args = process.args, let first = args.first else { return nil }
        let annotations = spec.annotations ?? [:]
        let declared = annotations[Self.variantAnnotation].map { $0.hasPrefix("compat") } ?? false
        let what = isInit ? "container \(containerID)" : "exec in \(containerID)"
        let env = process.env ?? []
        guard let (path, fd) = Self.resolve(first, env: env, cwd: process.cwd, rootfs: rootfs) else {
            if declared || first.hasSuffix(".wasm") {
                throw RPCError(.notFound, "\(what): module \(first) not found in the rootfs")
            }
            return nil
        }
        defer { _ = close(fd) }
        guard WasmImports.hasMagic(fd) || declared || first.hasSuffix(".wasm") else { return nil }
        try WasmImports.check(fd, name: path)

        var engine = settings.engine
        if let chosen = annotations[Self.engineAnnotation], chosen != engine {
            guard chosen == "wasmkit" || chosen == "wasmtime" else {
                throw RPCError(.invalidArgument, "\(what): annotation \(Self.engineAnnotation)=\(chosen) is not one of wasmkit, wasmtime")
            }
            guard settings.engineAnnotation else {
                throw RPCError(.failedPrecondition, "\(what): annotation \(Self.engineAnnotation)=\(chosen), but [wasm] engine_annotation = false (this daemon runs \(engine) only)")
            }
            engine = chosen
        }
        if spec.mounts?.contains(where: { $0.destination == "/proc" && $0.type == "proc" }) != true {
            throw RPCError(.failedPrecondition, "\(what): a wasm container needs /proc mounted (its runner is loaded through /proc/self/fd)")
        }
        guard let image = loadImage() else {
            throw RPCError(.failedPrecondition, "\(what): wasm modules cannot run here: \(imageError ?? "no runner")")
        }

        var fds = image.fds
        var runnerArgs = ["--engine", engine]
        if engine == "wasmtime" {
            let w = try loadWasmtime()
            runnerArgs += ["--wasmtime-library", "/proc/self/fd/\(3 + fds.count)", "--wasmtime-version", w.version]
            fds.append(w.library)
            if let code = w.code(forModule: fd, path: path, runner: settings.runner, supervisor: supervisor, logger: logger) {
                runnerArgs += ["--compiled", "/proc/self/fd/\(3 + fds.count)"]
                fds.append(code)
            }
        }
        if let limit = spec.linux?.resources?.memory?.limit, limit > 0 { runnerArgs += ["--memory-limit", String(limit)] }
        let report = try Files.memoryFile("kuasar-wasm-report")
        let key = containerID + "/" + execID
        if let old = reports.updateValue(report, forKey: key) { _ = close(old) }
        runnerArgs += ["--report-fd", String(3 + fds.count)]
        fds.append(report)
        runnerArgs += ["--dir", "/=/"]
        for d in Self.extraPreopens(spec) { runnerArgs += ["--dir", "\(d)=\(d)"] }
        for e in env where e.contains("=") { runnerArgs += ["--env", e] }
        runnerArgs += ["--", path] + args
        return HostProgram(fd: 3, argv: image.loaderArgs + runnerArgs, env: ["PATH=/"],
                           fds: fds.enumerated().map { (from: $0.element, to: Int32(3 + $0.offset)) })
    }

    public func ended(containerID: String, execID: String, status: ExitStatus?) {
        guard let fd = reports.removeValue(forKey: containerID + "/" + execID) else { return }
        defer { _ = close(fd) }
        guard let status else { return }
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = pread(fd, &buf, buf.count, 0)
        let what = execID.isEmpty ? "container \(containerID)" : "exec \(execID) in \(containerID)"
        let text = n > 0 ? String(decoding: buf[0..<n], as: UTF8.self).trimmingWhitespace : ""
        switch status.code {
        case 134 where !text.isEmpty: logger.warning("\(what): exit 134, the module trapped: \(text)")
        case 125 where !text.isEmpty: logger.warning("\(what): exit 125, the module could not start: \(text)")
        default: if !text.isEmpty { logger.info("\(what): \(status): \(text)") }
        }
    }

    public func forget(containerID: String) {
        for key in reports.keys where key.hasPrefix(containerID + "/") {
            if let fd = reports.removeValue(forKey: key) { _ = close(fd) }
        }
    }

    deinit { for fd in reports.values { _ = close(fd) } }

    /// The entrypoint as execvp would find it in the rootfs: a path (relative to the
    /// process's cwd), or a bare name through PATH, or at the rootfs's top (runwasi's
    /// convention for `hello.wasm`). Opened inside the root; nil when it is not there.
    static func resolve(_ first: String, env: [String], cwd: String, rootfs: String) -> (String, Int32)? {
        var candidates: [String] = []
        if first.hasPrefix("/") {
            candidates = [first]
        } else if first.contains("/") {
            candidates = [(cwd.hasSuffix("/") ? cwd : cwd + "/") + first]
        } else {
            let pathVar = env.last { $0.hasPrefix("PATH=") }.map { String($0.dropFirst(5)) } ?? "/usr/local/bin:/usr/bin:/bin"
            candidates = pathVar.split(separator: ":").map { $0.hasSuffix("/") ? $0 + first : $0 + "/" + first } + ["/" + first]
        }
        for c in candidates {
            guard let fd = try? Files.openInRoot(rootfs, c) else { continue }
            var st = stat()
            if fstat(fd.rawValue, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG { return (c, fd.take()) }
            fd.close()
        }
        return nil
    }

    /// The spec's bind mounts of directories, each its own preopen as well (the module
    /// sees them under "/" too; a preopen of its own is what WASI programs look for).
    static func extraPreopens(_ spec: OCISpec) -> [String] {
        let system = ["/proc", "/dev", "/sys", "/run/secrets"]
        return (spec.mounts ?? []).compactMap { m in
            let bind = m.type == "bind" || (m.options ?? []).contains { $0 == "bind" || $0 == "rbind" }
            guard bind, m.destination != "/", !system.contains(where: { m.destination == $0 || m.destination.hasPrefix($0 + "/") }),
                  let source = m.source, source.hasPrefix("/"), Files.isDirectory(source) else { return nil }
            return m.destination
        }
    }

    /// What `kuasar info` and Status say of the engines.
    public func engines() -> [(name: String, status: String)] {
        var out: [(String, String)] = [("wasmkit", "embedded interpreter")]
        do {
            let w = try loadWasmtime()
            out.append(("wasmtime", "\(w.version) (\(w.path))"))
        } catch {
            out.append(("wasmtime", "not available: \(RPCError.from(error).message)"))
        }
        return out
    }
}

/// The runner, the host's dynamic loader and the runner's library directories, opened
/// once (close-on-exec in the daemon) and mapped into each wasm container's child.
final class RunnerImage {
    /// [loader, runner, library directories...], mapped to 3, 4, 5, ... in the child.
    let fds: [Int32]
    /// The loader's argv up to the runner's own arguments.
    let loaderArgs: [String]

    init(runner: String) throws {
        guard access(runner, X_OK) == 0 else {
            throw RPCError(.failedPrecondition, "the module runner \(runner) is not there or not executable (build it: swift build --product kuasar-wasm-run; or set [wasm] runner)")
        }
        let (loader, dirs) = try Self.dependencies(of: runner)
        var opened: [Int32] = []
        func open(_ path: String, _ flags: Int32) throws {
            let fd = Glibc.open(path, flags | O_CLOEXEC)
            guard fd >= 0 else {
                for f in opened { _ = close(f) }
                throw RPCError(.failedPrecondition, "open \(path): \(Errno.current)")
            }
            opened.append(fd)
        }
        try open(loader, O_RDONLY)
        try open(runner, O_RDONLY)
        for d in dirs { try open(d, Files.pathOnly | O_DIRECTORY) }
        fds = opened
        let libraryPath = (0..<dirs.count).map { "/proc/self/fd/\(5 + $0)" }.joined(separator: ":")
        loaderArgs = ["kuasar-wasm-run"] + (dirs.isEmpty ? [] : ["--library-path", libraryPath]) + ["--inhibit-cache", "--argv0", "kuasar-wasm-run", "/proc/self/fd/4"]
    }

    deinit { for f in fds { _ = close(f) } }

    /// The runner's program interpreter (its PT_INTERP) and the directories of the shared
    /// libraries it loads, as that loader lists them.
    static func dependencies(of runner: String) throws -> (loader: String, dirs: [String]) {
        let loader = try interpreter(of: runner)
        guard let listed = Spawner.output(loader, ["--list", runner]) else {
            throw RPCError(.failedPrecondition, "\(loader) --list \(runner) failed: the runner's libraries are not all there")
        }
        var dirs: [String] = []
        for line in listed.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.contains("not"), parts.contains("found") {
                throw RPCError(.failedPrecondition, "the module runner \(runner) needs \(parts.first ?? ""), which is not found")
            }
            guard let arrow = parts.firstIndex(of: "=>"), arrow + 1 < parts.count, parts[arrow + 1].hasPrefix("/") else { continue }
            let dir = parentDirectory(String(parts[arrow + 1]))
            if !dirs.contains(dir) { dirs.append(dir) }
        }
        return (loader, dirs)
    }

    /// PT_INTERP of an x86-64/aarch64 ELF64 executable.
    static func interpreter(of path: String) throws -> String {
        let bytes: [UInt8]
        do { bytes = try Files.read(path, limit: 64 << 20) } catch {
            throw RPCError(.failedPrecondition, "read the runner \(path): \(error)")
        }
        func u16(_ o: Int) -> Int { Int(bytes[o]) | Int(bytes[o + 1]) << 8 }
        func u64(_ o: Int) -> Int { (0..<8).reduce(0) { $0 | Int(bytes[o + $1]) << (8 * $1) } }
        guard bytes.count > 64, bytes[0..<4] == [0x7f, 0x45, 0x4c, 0x46], bytes[4] == 2 else {
            throw RPCError(.failedPrecondition, "the runner \(path) is not a 64-bit ELF executable")
        }
        let phoff = u64(32), phentsize = u16(54), phnum = u16(56)
        for i in 0..<phnum {
            let h = phoff + i * phentsize
            guard h + 56 <= bytes.count else { break }
            if bytes[h] == 3, bytes[h + 1] == 0, bytes[h + 2] == 0, bytes[h + 3] == 0 {  // PT_INTERP
                let off = u64(h + 8), size = u64(h + 32)
                guard off + size <= bytes.count, size > 1 else { break }
                return String(decoding: bytes[off..<off + size - 1], as: UTF8.self)
            }
        }
        throw RPCError(.failedPrecondition, "the runner \(path) is statically linked or has no interpreter; a dynamically linked kuasar-wasm-run is expected")
    }
}

/// Wasmtime's library and the compiled-module cache, for the wasm containers.
///
/// Compiled code is native code that every container of the same module runs, so no
/// container may write it: a runner inside a container reads what its image says (an
/// image's /etc/ld.so.preload reaches the loader), and a cache it could write would let one
/// pod plant code in another's. So the runner gets no handle on the cache; it gets the code
/// as a sealed memfd (read-only for everyone, whatever their privileges). On a miss the
/// runner compiles for itself, in memory, and the daemon has the module compiled once more
/// by `kuasar-wasm-run --precompile`, on the host, unprivileged (nobody, no_new_privs,
/// nice 10), its output collected from a memfd at its exit and written to the cache by the
/// daemon. Each hit compares the module's bytes with the ones the code was compiled from:
/// the cache's key is a fast digest, not a cryptographic one.
final class WasmtimeFiles {
    let path: String
    let version: String
    /// Read-only, close-on-exec, closed at deinit.
    let library: Int32
    let cache: ModuleCache
    /// Code handed to containers, per module key: the module's bytes (compared on every
    /// hit) and a sealed memfd of its code. At most `memoLimit` entries and `memoBudget`
    /// bytes of modules and code together (the daemon's own memory), the oldest dropped
    /// first — never the newest, whose memfd is being handed out. A module no longer here
    /// is found in the cache again.
    private var memo: [String: (module: [UInt8], code: Int32, bytes: Int)] = [:]
    private var memoOrder: [String] = []
    private var memoBytes = 0
    static let memoLimit = 32
    static let memoBudget = 64 << 20
    private var compiling: Set<String> = []

    init(library: String?, cacheDir: String) throws {
        // Loading it here says whether it works (and its version) before a container fails on it.
        let w = try Wasmtime(library: library, cacheDir: nil)
        path = w.library
        version = w.version
        let lib = Glibc.open(w.library, O_RDONLY | O_CLOEXEC)
        guard lib >= 0 else { throw RPCError(.failedPrecondition, "open \(w.library): \(Errno.current)") }
        do { try makeDirectories(cacheDir, mode: 0o700) } catch {
            _ = close(lib)
            throw RPCError(.failedPrecondition, "the wasm cache \(cacheDir): \(error)")
        }
        self.library = lib
        cache = ModuleCache(dir: cacheDir + "/wasmtime-" + version)
    }

    /// A sealed memfd of the compiled code of the module open at `fd`, when there is one;
    /// nil starts its compilation for the next container (once per module at a time).
    func code(forModule fd: Int32, path: String, runner: String, supervisor: ProcessSupervisor?, logger: Logger) -> Int32? {
        // Through /proc, a description of its own: the container's child shares `fd`'s offset.
        guard let module = try? WasmModuleFile.read("/proc/self/fd/\(fd)") else { return nil }
        let key = ModuleCache.key(module)
        if let m = memo[key] {
            return m.module == module ? m.code : nil
        }
        if let code = cache.get(key, module: module), let sealed = try? Files.sealedMemoryFile("kuasar-wasm-code", code) {
            remember(key, module, sealed, codeBytes: code.count)
            return sealed
        }
        if let supervisor, !compiling.contains(key) { compile(key, module, fd: fd, path: path, runner: runner, supervisor: supervisor, logger: logger) }
        return nil
    }

    private func compile(_ key: String, _ module: [UInt8], fd: Int32, path: String, runner: String, supervisor: ProcessSupervisor, logger: Logger) {
        let out: Int32
        do { out = try Files.memoryFile("kuasar-wasm-code", sealable: true) } catch {
            logger.warning("wasm: compile \(path) for the cache: \(error)")
            return
        }
        let spec = ProcessSpec(executable: runner,
                               arguments: ["kuasar-wasm-run", "--engine", "wasmtime", "--wasmtime-library", self.path, "--wasmtime-version", version,
                                           "--precompile", "4", "/proc/self/fd/3"],
                               environment: ["PATH=/usr/bin:/bin"], fdMap: [(from: fd, to: 3), (from: out, to: 4), (from: 2, to: 2)])
        do {
            try supervisor.spawn(spec) { [weak self] status in
                guard let self else { _ = close(out); return }
                self.compiling.remove(key)
                // (Reopened: the helper's writes moved the offset it shared.)
                guard status == .exited(0), let code = try? Files.read("/proc/self/fd/\(out)", limit: 1 << 30), !code.isEmpty,
                      (try? Files.seal(out)) != nil else {
                    logger.warning("wasm: compiling \(path) for the cache ended with \(status); containers of it compile for themselves")
                    _ = close(out)
                    return
                }
                self.cache.put(key, code, module: module)
                self.remember(key, module, out, codeBytes: code.count)
            }
            compiling.insert(key)
        } catch {
            _ = close(out)
            logger.warning("wasm: compile \(path) for the cache: \(error)")
        }
    }

    private func remember(_ key: String, _ module: [UInt8], _ code: Int32, codeBytes: Int) {
        let entry = (module: module, code: code, bytes: module.count + codeBytes)
        if let old = memo.updateValue(entry, forKey: key) {
            _ = close(old.code)
            memoBytes -= old.bytes
            memoOrder.removeAll { $0 == key }
        }
        memoOrder.append(key)
        memoBytes += entry.bytes
        while memoOrder.count > 1 && (memoOrder.count > Self.memoLimit || memoBytes > Self.memoBudget) {
            guard let dropped = memo.removeValue(forKey: memoOrder.removeFirst()) else { continue }
            _ = close(dropped.code)
            memoBytes -= dropped.bytes
        }
    }

    deinit {
        _ = close(library)
        for m in memo.values { _ = close(m.code) }
    }
}
