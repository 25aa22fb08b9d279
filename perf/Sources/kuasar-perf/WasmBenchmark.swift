#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Runtime

/// The wasm runner (`kuasar-wasm-run`, a release build), in one run, interleaved:
/// - start: a hello module (write a line, proc_exit 7) on WasmKit, on Wasmtime compiling
///   it (cold) and from the compile cache (warm), against a static C hello exec'd directly;
/// - compute: a sieve of Eratosthenes below 10^7 (Tests/Peers/wasm/sieve.wat) on both
///   engines against the same C program built with gcc -O2; every run's count is checked.
/// Each figure is a process from spawn to exit. Then the wasm kind through the daemon
/// (WasmPodBenchmark: lifecycles and memory). Writes perf/results/wasm.json.
enum WasmBenchmark {
    static let work = "/tmp/kuasar-perf-wasm"

    struct Report: Codable {
        var date: String
        var kuasar: String
        /// The runner the daemon executed for the lifecycle and memory figures.
        var runner: String
        var wasmtime: String
        var start: [ContainerBenchmark.Row]
        /// p50 / the native hello's p50.
        var startRatios: [String: Double]
        var compute: [ContainerBenchmark.Row]
        /// p50 / native p50.
        var computeRatios: [String: Double]
        /// Through the daemon: a wasm pod's containers, and the same pod's Linux container.
        var lifecycle: [WasmPodBenchmark.Lifecycle]
        /// Lifecycle p50 / the namespace container's p50.
        var lifecycleRatios: [String: Double]
        var memory: [WasmPodBenchmark.Memory]
    }

    static func parentDirectory(_ p: String) -> String { URL(fileURLWithPath: p).deletingLastPathComponent().path }

    /// Runs `argv`, stdout to a file; (ms, exit code, stdout).
    static func timed(_ argv: [String]) throws -> (Double, Int32, [UInt8]) {
        let out = open(work + "/out", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(out); close(null) }
        let t0 = MonotonicClock.nanoseconds()
        let p = try Spawner.spawn(ProcessSpec(executable: argv[0], arguments: argv, fdMap: [(null, 0), (out, 1), (null, 2)]))
        let status = try Spawner.wait(p)
        let ms = Double(MonotonicClock.nanoseconds() - t0) / 1e6
        return (ms, status.code, (try? Files.read(work + "/out")) ?? [])
    }

    static func run(starts: Int, computes: Int, lifecycles: Int, idle: Int) throws {
        let log = ContainerBenchmark.log
        let repo = PodBenchmark.repositoryRoot
        let kuasar = ProcessInfo.processInfo.environment["KUASAR_BIN"] ?? repo + "/.build/release/kuasar"
        guard access(kuasar, X_OK) == 0 else { log("wasm: needs a release kuasar (swift build -c release --product kuasar) or KUASAR_BIN"); return }
        guard let library = Wasmtime.findLibrary() ?? [repo + "/.build/peers/wasmtime/site/wasmtime/linux-x86_64/_libwasmtime.so"].first(where: { access($0, R_OK) == 0 }) else {
            log("wasm: no Wasmtime library (pip install wasmtime, or run the tests once: they fetch it)")
            return
        }
        ContainerBenchmark.shIgnoringFailure("rm -rf \(work)")
        try FileManager.default.createDirectory(atPath: work + "/cache", withIntermediateDirectories: true)
        defer { ContainerBenchmark.shIgnoringFailure("rm -rf \(work)") }
        for m in ["hello", "sieve"] { _ = try ContainerBenchmark.sh("wat2wasm \(repo)/Tests/Peers/wasm/\(m).wat -o \(work)/\(m).wasm") }
        _ = try ContainerBenchmark.sh("gcc -O2 -static -o \(work)/hello \(repo)/perf/native/hello.c && gcc -O2 -o \(work)/sieve \(repo)/perf/native/sieve.c")
        // The small runner a wasm container runs, beside kuasar; `kuasar wasm-run` once for comparison.
        let runner = parentDirectory(kuasar) + "/kuasar-wasm-run"
        guard access(runner, X_OK) == 0 else { log("wasm: needs \(runner) (swift build -c release --product kuasar-wasm-run)"); return }
        let wasmkit = [runner, "--engine", "wasmkit"]
        let wasmtime = [runner, "--engine", "wasmtime", "--wasmtime-library", library]
        // The runner `make install` ships: the Swift runtime linked in (make runner-static).
        let linked = repo + "/.build-runner/release/kuasar-wasm-run"
        let hasLinked = access(linked, X_OK) == 0
        if !hasLinked { log("wasm: no \(linked) (make runner-static): measuring the shared-library runner only") }
        let startCases: [(String, () -> [String], Int32)] = [
            ("native static C hello (exec)", { [work + "/hello"] }, 7),
            ("kuasar-wasm-run, WasmKit", { wasmkit + [work + "/hello.wasm"] }, 7),
            // A cache of its own each run: compiled every time.
            ("kuasar-wasm-run, Wasmtime, cold (compiles)", {
                ContainerBenchmark.shIgnoringFailure("rm -rf \(work)/cold")
                return wasmtime + ["--cache", work + "/cold", work + "/hello.wasm"]
            }, 7),
            ("kuasar-wasm-run, Wasmtime, warm (compile cache hit)", { wasmtime + ["--cache", work + "/cache", work + "/hello.wasm"] }, 7),
            ("kuasar wasm-run (the full CLI binary), WasmKit", { [kuasar, "wasm-run", "--engine", "wasmkit", work + "/hello.wasm"] }, 7),
        ] + (hasLinked ? [
            ("kuasar-wasm-run with the Swift runtime linked in, WasmKit", { [linked, "--engine", "wasmkit", work + "/hello.wasm"] }, 7),
            ("kuasar-wasm-run with the Swift runtime linked in, Wasmtime, warm", {
                [linked, "--engine", "wasmtime", "--wasmtime-library", library, "--cache", work + "/cache", work + "/hello.wasm"]
            }, 7),
        ] : [])
        _ = try timed(wasmtime + ["--cache", work + "/cache", work + "/hello.wasm"])  // primes the cache
        var times: [String: [Double]] = [:]
        for i in 0..<(starts + 1) {
            for (name, argv, want) in startCases {
                let (ms, code, _) = try timed(argv())
                if code != want { log("wasm: \(name): exit \(code), not \(want)") }
                if i > 0 { times[name, default: []].append(ms) }
            }
        }
        let computeCases: [(String, [String])] = [
            ("native C sieve below 10^7 (gcc -O2)", [work + "/sieve"]),
            ("sieve below 10^7 on Wasmtime (warm)", wasmtime + ["--cache", work + "/cache", work + "/sieve.wasm"]),
            ("sieve below 10^7 on WasmKit", wasmkit + [work + "/sieve.wasm"]),
        ]
        _ = try timed(computeCases[1].1)
        for _ in 0..<computes {
            for (name, argv) in computeCases {
                let (ms, code, out) = try timed(argv)
                let count = out.count == 4 ? UInt32(out[0]) | UInt32(out[1]) << 8 | UInt32(out[2]) << 16 | UInt32(out[3]) << 24 : 0
                if code != 0 || count != 664_579 { log("wasm: \(name): exit \(code), count \(count) (want 664579)") }
                times[name, default: []].append(ms)
            }
        }
        let daemonRunner = hasLinked ? linked : runner
        let (lifecycle, memory) = try WasmPodBenchmark.run(kuasar: kuasar, library: library, runner: daemonRunner, work: work, runs: lifecycles, idle: idle)
        let lifecycleBase = lifecycle.first?.lifecycle.p50ms ?? 1
        let lifecycleRatios = Dictionary(lifecycle.dropFirst().compactMap { l in l.lifecycle.p50ms.map { (l.runtime, $0 / lifecycleBase) } }, uniquingKeysWith: { a, _ in a })
        let start = startCases.map { ContainerBenchmark.row($0.0, times[$0.0] ?? []) }
        let compute = computeCases.map { ContainerBenchmark.row($0.0, times[$0.0] ?? []) }
        func ratios(_ rows: [ContainerBenchmark.Row]) -> [String: Double] {
            guard let base = rows.first?.p50ms else { return [:] }
            return Dictionary(rows.dropFirst().compactMap { r in r.p50ms.map { (r.runtime, $0 / base) } }, uniquingKeysWith: { a, _ in a })
        }
        let report = Report(
            date: ISO8601DateFormatter().string(from: Date()), kuasar: kuasar, runner: daemonRunner,
            wasmtime: (try? Wasmtime(library: library, cacheDir: nil).version) ?? "?",
            start: start, startRatios: ratios(start), compute: compute, computeRatios: ratios(compute),
            lifecycle: lifecycle, lifecycleRatios: lifecycleRatios, memory: memory)
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(report).write(to: URL(fileURLWithPath: repo + "/perf/results/wasm.json"))
        for r in start + compute { log("wasm: \(r.runtime): p50 \(r.p50ms.map { ReactorBenchmark.fmt($0) } ?? "-") ms over \(r.runs) runs") }
        for l in lifecycle {
            log("wasm: through the daemon: \(l.runtime): lifecycle p50 \(l.lifecycle.p50ms.map { ReactorBenchmark.fmt($0) } ?? "-") ms, Create+Start p50 \(l.createStart.p50ms.map { ReactorBenchmark.fmt($0) } ?? "-") ms")
        }
        log("wasm: lifecycle ratios to the namespace container \(lifecycleRatios.mapValues { ReactorBenchmark.fmt($0) })")
        log("wasm: start ratios \(report.startRatios.mapValues { ReactorBenchmark.fmt($0) }); compute ratios \(report.computeRatios.mapValues { ReactorBenchmark.fmt($0) })")
    }
}
