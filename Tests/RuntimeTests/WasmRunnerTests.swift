import Foundation
import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The wasm kind's runner (`kuasar wasm-run`) on real modules and both engines: WasmKit
/// (embedded) and Wasmtime's C library from PyPI's `wasmtime` wheel (fetched once into
/// .build/peers), loaded at run time; the modules are WAT in Tests/Peers/wasm compiled by
/// wabt's wat2wasm. Each case is a separate runner process, as a container's would be.
extension AllTests {
@Suite(.serialized) struct WasmRunnerTests {
    static let wasmtimeVersion = "50.0.1"

    /// `<peers>/wasmtime/site/wasmtime/linux-x86_64/_libwasmtime.so` with its dist-info
    /// beside it (the version the cache is keyed by), extracted from the wheel.
    static let wasmtimeLibrary: String = {
        let dir = "\(repositoryRoot)/.build/peers/wasmtime"
        let lib = dir + "/site/wasmtime/linux-x86_64/_libwasmtime.so"
        if access(lib, R_OK) == 0 { return lib }
        _ = try? makeDirectories(dir)
        let r = try? shell("""
            set -e
            cd \(dir)
            \(systemPython) -m pip download --quiet --no-deps wasmtime==\(wasmtimeVersion) --platform manylinux1_x86_64 --only-binary=:all: -d .
            \(systemPython) -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('wasmtime-*.whl')[0]); [z.extract(n,'site') for n in z.namelist() if n.startswith('wasmtime/linux-x86_64/') or '.dist-info/' in n]"
            """, timeoutS: 300)
        #expect(access(lib, R_OK) == 0, "the wasmtime wheel: \(r?.out ?? "pip did not run")")
        return lib
    }()

    /// Each WAT peer compiled once into .build/peers/wasm, and each C peer (Tests/Peers/wasm/c)
    /// for wasm32-wasi with Debian's clang and wasi-libc, as `c-<name>.wasm`.
    static let modules: String = {
        let dir = "\(repositoryRoot)/.build/peers/wasm"
        _ = try? makeDirectories(dir)
        for wat in Files.list("\(repositoryRoot)/Tests/Peers/wasm") where wat.hasSuffix(".wat") {
            let r = try? shell("wat2wasm \(repositoryRoot)/Tests/Peers/wasm/\(wat) -o \(dir)/\(wat.dropLast(4)).wasm")
            #expect(r?.code == 0, "wat2wasm \(wat): \(r?.out ?? "")")
        }
        for c in Files.list("\(repositoryRoot)/Tests/Peers/wasm/c") where c.hasSuffix(".c") {
            let r = try? shell("clang-14 --target=wasm32-wasi -O2 -Wl,--strip-all -o \(dir)/c-\(c.dropLast(2)).wasm \(repositoryRoot)/Tests/Peers/wasm/c/\(c) 2>&1")
            #expect(r?.code == 0, "clang-14 --target=wasm32-wasi \(c) (make test-deps installs clang-14, lld-14, wasi-libc): \(r?.out ?? "")")
        }
        return dir
    }()

    struct Result {
        var code: Int32
        var stdout: [UInt8]
        var stderr: String
        var text: String { String(decoding: stdout, as: UTF8.self) }
    }

    /// `kuasar wasm-run` with `args`, stdin from `stdin` (a file) or /dev/null.
    static func runner(_ args: [String], engine: String = "wasmtime", stdin: String = "/dev/null", library: String? = nil) throws -> Result {
        let scratch = "/tmp/kuasar-wasm-run-\(getpid())"
        try makeDirectories(scratch)
        defer { Files.removeTree(scratch) }
        let out = open(scratch + "/out", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let err = open(scratch + "/err", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let input = open(stdin, O_RDONLY | O_CLOEXEC)
        defer { close(out); close(err); close(input) }
        let argv = ["kuasar-wasm-run", "--engine", engine, "--wasmtime-library", library ?? wasmtimeLibrary] + args
        let p = try Spawner.spawn(ProcessSpec(executable: runnerBinary, arguments: argv, fdMap: [(input, 0), (out, 1), (err, 2)]))
        let status = try Spawner.wait(p)
        return Result(code: status.code, stdout: (try? Files.read(scratch + "/out", limit: 1 << 24)) ?? [], stderr: (try? Files.readString(scratch + "/err")) ?? "")
    }

    static func module(_ name: String) -> String { modules + "/" + name + ".wasm" }

    /// The small runner a wasm container runs (built beside kuasar).
    static var runnerBinary: String { URL(fileURLWithPath: AllTests.DaemonTests.binary).deletingLastPathComponent().path + "/kuasar-wasm-run" }

    @Test func kuasarWasmRunIsTheSameRunnerAndBadCommandLinesAreRefused() throws {
        let r = try shell("\(AllTests.DaemonTests.binary) wasm-run --engine wasmkit --env A=1 \(Self.module("argsenv")) -- me x | od -An -c")
        #expect(r.code == 0 && r.out.contains("m   e  \\0   x  \\0   A   =   1"), "\(r.out)")
        for (args, why) in [([String](), "no module given"), (["--dir", "rel=/tmp", "m.wasm"], "GUEST absolute"), (["--env", "=x", "m.wasm"], "K=V"),
                            (["--memory-limit", "lots", "m.wasm"], "a number of bytes"), (["--engine"], "needs a value"), (["--frobnicate", "m.wasm"], "unknown option --frobnicate")] {
            #expect(throws: RPCError.self) { try WasmRunner.parse(args) }
            do { _ = try WasmRunner.parse(args) } catch let e as RPCError { #expect(e.code == .invalidArgument && e.message.contains(why), "\(args): \(e.message)") }
        }
        let o = try WasmRunner.parse(["--engine", "wasmtime", "--dir", "/=/tmp/r", "--dir", "/data=/tmp/d", "--memory-limit", "4096", "m.wasm", "--", "m", "--not-an-option"])
        #expect(o.engine == "wasmtime" && o.run.memoryLimit == 4096 && o.run.args == ["m", "--not-an-option"] && o.run.preopens.map(\.guest) == ["/", "/data"])
        // The container's limit less the runner's own memory and room for the engine; a page at least.
        #expect(WasmRunner.linearMemoryCap(containerLimit: 64 << 20, resident: 20 << 20) == 28 << 20)
        #expect(WasmRunner.linearMemoryCap(containerLimit: 1 << 20, resident: 20 << 20) == 65_536)
        let bad = try shell("\(Self.runnerBinary) --frobnicate x.wasm")
        #expect(bad.code == 2 && bad.out.contains("unknown option --frobnicate") && bad.out.contains("usage:"), "\(bad.out)")
    }

    @Test(arguments: ["wasmtime", "wasmkit"]) func argsEnvironmentStdioAndExitCodes(engine: String) throws {
        var r = try Self.runner([Self.module("hello")], engine: engine)
        #expect(r.code == 7 && r.text == "hello from wasm\n", "\(r)")
        r = try Self.runner(["--env", "K=V", "--env", "EMPTY=", Self.module("argsenv"), "--", "prog", "a b", "c"], engine: engine)
        #expect(r.code == 0, "\(r.stderr)")
        // (WasmKit 0.4.2's environ_sizes_get counts a byte per variable more than environ_get
        // writes: the module dumps by that size, so trailing NULs are not compared.)
        // argv in order; the environment as a set (WasmKit takes it as a dictionary).
        let fields = r.stdout.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        #expect(Array(fields.prefix(3)) == ["prog", "a b", "c"], "argv, NUL-separated: \(r.stdout)")
        #expect(Set(fields.dropFirst(3).filter { !$0.isEmpty }) == ["EMPTY=", "K=V"], "environ: \(r.stdout)")
        // stdin to EOF, every byte through.
        let input = "/tmp/kuasar-wasm-in-\(getpid())"
        defer { unlink(input) }
        let input_ = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 2654435761 >> 13) }
        try Files.writeAtomically(input, input_)
        r = try Self.runner([Self.module("cat")], engine: engine, stdin: input)
        #expect(r.code == 0 && r.stdout == input_, "cat: \(r.stdout.count) of \(input_.count) bytes; \(r.stderr)")
    }

    @Test(arguments: ["wasmtime", "wasmkit"]) func thePreopenedRootfsIsTheModulesWholeFilesystem(engine: String) throws {
        let root = try scratchDirectory("wasm-root")
        defer { Files.removeTree(root) }
        try Files.write(root + "/in.txt", "from the rootfs\n", create: true)
        let r = try Self.runner(["--dir", "/=" + root, Self.module("files")], engine: engine)
        #expect(r.code == 0, "exit \(r.code) (99: it created ../outside): \(r.stderr)")
        #expect(r.text == "from the rootfs\n")
        #expect((try? Files.readString(root + "/out.txt")) == "written by wasm\n")
        #expect(!Files.exists(root + "/../outside") && !Files.exists("/tmp/outside"), "nothing outside the preopen")
    }

    @Test(arguments: ["wasmtime", "wasmkit"]) func trapsLimitsAndKill(engine: String) throws {
        var r = try Self.runner([Self.module("trap")], engine: engine)
        #expect(r.code == 134 && r.stderr.contains("wasm trap") && r.stderr.contains("unreachable"), "\(r)")
        // A memory cap: the module's memory.grow is refused (it exits 1), not OOM-killed.
        r = try Self.runner(["--memory-limit", "1048576", Self.module("grow")], engine: engine)
        #expect(r.code == 1, "\(r)")
        r = try Self.runner([Self.module("grow")], engine: engine)
        #expect(r.code == 0, "\(r)")
        // A module that never ends stops at SIGKILL like any process.
        let p = try Spawner.spawn(ProcessSpec(executable: Self.runnerBinary,
                                              arguments: ["kuasar-wasm-run", "--engine", engine, "--wasmtime-library", Self.wasmtimeLibrary, Self.module("spin")]))
        usleep(300_000)
        #expect(!processGone(p.pid), "spin ended by itself")
        try sendSignal(pidfd: p.pidfd.rawValue, SIGKILL)
        #expect(try Spawner.wait(p) == .signaled(SIGKILL, coreDumped: false))
    }

    @Test(arguments: ["wasmtime", "wasmkit"]) func badModulesAreClearErrors(engine: String) throws {
        let scratch = try scratchDirectory("wasm-bad")
        defer { Files.removeTree(scratch) }
        var r = try Self.runner([Self.module("missing-import")], engine: engine)
        #expect(r.code == 125 && r.stderr.contains("env") && r.stderr.contains("kuasar_nope"), "the import is named: \(r.stderr)")
        try Files.write(scratch + "/text.wasm", "(module)\n", create: true)
        r = try Self.runner([scratch + "/text.wasm"], engine: engine)
        #expect(r.code == 125 && r.stderr.contains("not a WebAssembly module") && r.stderr.contains("WAT"), "\(r.stderr)")
        let good = try Files.read(Self.module("hello"))
        try Files.writeAtomically(scratch + "/truncated.wasm", Array(good.prefix(good.count / 2)))
        r = try Self.runner([scratch + "/truncated.wasm"], engine: engine)
        #expect(r.code == 125 && r.stderr.contains("compile") && r.stderr.contains("truncated.wasm"), "\(r.stderr)")
        // 100 MB of garbage is refused by its first bytes, at once.
        #expect(try shell("head -c 104857600 /dev/urandom > \(scratch)/garbage.wasm").code == 0)
        let t0 = MonotonicClock.nanoseconds()
        r = try Self.runner([scratch + "/garbage.wasm"], engine: engine)
        #expect(r.code == 125 && r.stderr.contains("not a WebAssembly module"), "\(r.stderr)")
        #expect(MonotonicClock.nanoseconds() - t0 < 5_000_000_000, "the garbage was not read through")
        r = try Self.runner([scratch + "/absent.wasm"], engine: engine)
        #expect(r.code == 125 && r.stderr.contains("absent.wasm"), "\(r.stderr)")
        // A component (layer 1) is named as one.
        try Files.writeAtomically(scratch + "/component.wasm", [0, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00])
        r = try Self.runner([scratch + "/component.wasm"], engine: engine)
        #expect(r.code == 125 && r.stderr.contains("component"), "\(r.stderr)")
        r = try Self.runner([Self.module("hello")], engine: "v8")
        #expect(r.code == 125 && r.stderr.contains("engine v8"), "\(r.stderr)")
        guard engine == "wasmtime" else { return }
        // An engine library that is not there, or is not Wasmtime's.
        r = try Self.runner([Self.module("hello")], engine: engine, library: scratch + "/no-such.so")
        #expect(r.code == 125 && r.stderr.contains("no-such.so"), "\(r.stderr)")
        r = try Self.runner([Self.module("hello")], engine: engine, library: "/lib/x86_64-linux-gnu/libz.so.1")
        #expect(r.code == 125 && r.stderr.contains("has no wasm_engine_new"), "\(r.stderr)")
    }

    /// The daemon checks every module at Create, on its loop, from untrusted bytes: mutated
    /// real modules (WAT and C) either pass or fail with InvalidArgument, never a crash, a
    /// hang or another code; a module of empty sections is refused quickly.
    @Test func theCreateTimeModuleCheckSurvivesFuzzing() throws {
        let seeds = ["hello", "cat", "missing-import", "c-greet", "c-files"].compactMap { try? Files.read(Self.module($0)) }
        #expect(seeds.count == 5)
        let fd = try Files.memoryFile("wasm-fuzz")
        defer { close(fd) }
        func check(_ bytes: [UInt8]) -> Swift.Result<Void, Error> {
            _ = ftruncate(fd, 0)
            _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
            do { try WasmImports.check(fd, name: "fuzz.wasm"); return .success(()) } catch { return .failure(error) }
        }
        var rng = SplitMix(seed: 0x6b75_6173_6172)
        var refused = 0
        for round in 0..<3000 {
            var m = seeds[round % seeds.count]
            switch rng.next() % 4 {
            case 0: for _ in 0..<(1 + rng.next() % 8) { m[8 + Int(rng.next() % UInt64(m.count - 8))] = UInt8(truncatingIfNeeded: rng.next()) }
            case 1: m = Array(m.prefix(8 + Int(rng.next() % UInt64(m.count - 8))))
            case 2:  // an over-long or huge LEB128 where a section's size goes
                let at = 9 + Int(rng.next() % 4)
                m.replaceSubrange(at..<min(at + 1, m.count), with: [0xff, 0xff, 0xff, 0xff, UInt8(rng.next() % 2 == 0 ? 0x0f : 0x7f)])
            default: m.insert(contentsOf: (0..<(rng.next() % 32)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: 8 + Int(rng.next() % UInt64(m.count - 8)))
            }
            if case .failure(let e) = check(m) {
                refused += 1
                #expect((e as? RPCError)?.code == .invalidArgument, "round \(round): \(e)")
            }
        }
        #expect(refused > 1000, "the mutations were all accepted: \(refused)")
        // 1 MiB of empty custom sections: refused by their number, without reading them all.
        let t0 = MonotonicClock.nanoseconds()
        let bomb = Array(seeds[0].prefix(8)) + [UInt8](repeating: 0, count: 1 << 20)
        guard case .failure(let e) = check(bomb) else { Issue.record("a module of 500,000 empty sections passed"); return }
        #expect(RPCError.from(e).message.contains("sections"), "\(e)")
        #expect(MonotonicClock.nanoseconds() - t0 < 2_000_000_000)
    }

    @Test func compiledModulesAreCachedAndACorruptEntryIsRecompiled() throws {
        let cache = try scratchDirectory("wasm-cache")
        defer { Files.removeTree(cache) }
        var r = try Self.runner(["--cache", cache, Self.module("hello")])
        #expect(r.code == 7 && r.text == "hello from wasm\n")
        let dir = cache + "/wasmtime-" + Self.wasmtimeVersion
        let entries = Files.list(dir).sorted()
        #expect(entries.count == 3 && entries[0].hasSuffix(".bin") && entries[1].hasSuffix(".sum") && entries[2].hasSuffix(".wasm"), "\(entries)")
        guard entries.count == 3 else { return }
        let bin = dir + "/" + entries[0]
        let key = String(entries[0].dropLast(4))
        let hello = try Files.read(Self.module("hello"))
        #expect(key == ModuleCache.key(hello), "keyed by the module's digest")
        #expect(try Files.read(dir + "/" + key + ".wasm") == hello, "the module it was compiled from is kept beside it")
        let built = try Files.read(bin, limit: 1 << 26)
        // A hit leaves the entry as it is.
        r = try Self.runner(["--cache", cache, Self.module("hello")])
        let hit = try Files.read(bin, limit: 1 << 26)
        #expect(r.code == 7 && hit == built)
        // A corrupt entry (a byte flipped, its sum kept) is never deserialized: recompiled.
        var bad = built
        bad[bad.count / 2] ^= 0xff
        try Files.writeAtomically(bin, bad)
        r = try Self.runner(["--cache", cache, Self.module("hello")])
        #expect(r.code == 7 && r.text == "hello from wasm\n", "\(r.stderr)")
        let rewritten = try Files.read(bin, limit: 1 << 26)
        #expect(rewritten == built, "the entry was written again")
        #expect(Files.list(dir).allSatisfy { !$0.hasSuffix(".tmp") })
        // The digest is not cryptographic: an entry is only ever handed out for the module
        // it was compiled from. Another module under the same key (a forged collision) misses.
        let c = ModuleCache(dir: dir)
        #expect(c.get(key, module: hello) == built)
        var other = hello
        other[other.count - 1] ^= 1
        #expect(c.get(key, module: other) == nil, "an entry served for bytes it was not compiled from")
        #expect(c.get(key, module: hello) == built, "a miss on other bytes leaves the entry alone")
    }

    /// The daemon's helper: `--precompile` writes compiled code to a descriptor (running
    /// nothing of the module), which `--compiled` then runs; bytes the engine refuses are
    /// compiled over, never a failure.
    @Test func precompiledCodeRunsAndRefusedCodeIsCompiledOver() throws {
        let scratch = try scratchDirectory("wasm-pre")
        defer { Files.removeTree(scratch) }
        let out = open(scratch + "/code", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let err = open(scratch + "/err", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        defer { close(out); close(err) }
        let p = try Spawner.spawn(ProcessSpec(executable: Self.runnerBinary,
                                              arguments: ["kuasar-wasm-run", "--engine", "wasmtime", "--wasmtime-library", Self.wasmtimeLibrary,
                                                          "--precompile", "4", Self.module("hello")],
                                              fdMap: [(out, 4), (err, 2), (err, 1)]))
        let status = try Spawner.wait(p)
        let code = try Files.read(scratch + "/code", limit: 1 << 26)
        #expect(status == .exited(0) && code.count > 1000, "precompile: \(status) \((try? Files.readString(scratch + "/err")) ?? "")")
        #expect(!((try? Files.readString(scratch + "/err")) ?? "").contains("hello from wasm"), "the module ran")
        var r = try Self.runner(["--compiled", scratch + "/code", Self.module("hello")])
        #expect(r.code == 7 && r.text == "hello from wasm\n", "\(r)")
        try Files.writeAtomically(scratch + "/junk", Array("not compiled code".utf8))
        r = try Self.runner(["--compiled", scratch + "/junk", Self.module("hello")])
        #expect(r.code == 7 && r.text == "hello from wasm\n", "\(r)")
        r = try Self.runner(["--precompile", "4", Self.module("hello")], engine: "wasmkit")
        #expect(r.code == 2 && r.stderr.contains("only the wasmtime engine"), "\(r)")
    }
}
}
