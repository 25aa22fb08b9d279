import Foundation
import Runtime

/// The reactor benchmark: echo over a unix socket against each server, each pinned
/// to CPU 0 (the client runs on CPU 1), then process spawning.
enum ReactorBenchmark {
    static let servers = ["io_uring", "epoll", "nio"]
    static let shapes: [(size: Int, inFlight: Int)] = [(64, 1), (64, 32), (16384, 1), (16384, 32)]

    struct Report: Codable {
        var host: String
        var date: String
        var echo: [EchoResult]
        var ratios: [Ratio]
        var spawn: SpawnResult
    }
    struct Ratio: Codable {
        var server: String
        var size: Int
        var inFlight: Int
        var throughputVsNIO: Double
        var p99VsNIO: Double
        /// NIO's server CPU per message divided by ours: >1 means we spend less.
        var cpuEfficiencyVsNIO: Double
    }
    struct SpawnResult: Codable {
        var count: Int
        var clone3MeanUS: Double
        var clone3P50US: Double
        var posixSpawnMeanUS: Double
        var posixSpawnP50US: Double
        var foundationMeanUS: Double
        var foundationP50US: Double
        /// posix_spawn's mean over ours.
        var speedup: Double
        var speedupVsFoundation: Double
    }

    static func run(seconds: Double, spawnCount: Int, executable: String) throws {
        pin(to: 1)
        var results: [EchoResult] = []
        for server in servers {
            let socket = "/tmp/kuasar-perf-\(getpid())-\(server).sock"
            let proc = Process()
            proc.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
            proc.arguments = ["-c", "0", executable, "echo-server", server, socket]
            let out = Pipe()
            proc.standardOutput = out
            try proc.run()
            _ = out.fileHandleForReading.readData(ofLength: 6)  // "ready\n"
            for shape in shapes {
                // A short warm-up, then the measured run.
                _ = try EchoClient.run(socket: socket, size: shape.size, inFlight: shape.inFlight, seconds: 0.2, server: server)
                let cpuBefore = cpuTicks(proc.processIdentifier)
                var r = try EchoClient.run(socket: socket, size: shape.size, inFlight: shape.inFlight, seconds: seconds, server: server)
                // The client can be the bottleneck; the server's CPU time per message is
                // what tells servers apart then.
                let ticks = cpuTicks(proc.processIdentifier) - cpuBefore
                r.serverCPUPercent = Double(ticks) / Double(sysconf(Int32(_SC_CLK_TCK))) / r.seconds * 100
                r.serverCPUusPerMessage = Double(ticks) / Double(sysconf(Int32(_SC_CLK_TCK))) * 1e6 / Double(r.messages)
                results.append(r)
                FileHandle.standardError.write("  \(server) \(shape.size)B x\(shape.inFlight): \(Int(r.perSecond)) msg/s\n".data(using: .utf8)!)
            }
            kill(proc.processIdentifier, server == "nio" ? SIGKILL : SIGTERM)
            proc.waitUntilExit()
            unlink(socket)
        }

        var ratios: [Ratio] = []
        print("\nEcho over a unix socket, one client process (CPU 1), server on one core (CPU 0), \(seconds) s per row")
        print(pad("server", 10) + pad("size", 7) + pad("inflight", 9) + pad("msg/s", 10) + pad("p50 us", 8) + pad("p99 us", 8)
              + pad("srv CPU%", 9) + pad("CPU us/msg", 11) + pad("tput/NIO", 9) + pad("p99/NIO", 8) + "NIO CPU/ours")
        for r in results {
            let nio = results.first { $0.server == "nio" && $0.size == r.size && $0.inFlight == r.inFlight }!
            let tput = r.perSecond / nio.perSecond
            let p99 = r.p99us / max(nio.p99us, 0.001)
            if r.server != "nio" {
                ratios.append(Ratio(server: r.server, size: r.size, inFlight: r.inFlight, throughputVsNIO: tput, p99VsNIO: p99,
                                    cpuEfficiencyVsNIO: nio.serverCPUusPerMessage / max(r.serverCPUusPerMessage, 0.0001)))
            }
            let eff = nio.serverCPUusPerMessage / max(r.serverCPUusPerMessage, 0.0001)
            print(pad(r.server, 10) + pad("\(r.size)", 7) + pad("\(r.inFlight)", 9) + pad(String(Int(r.perSecond)), 10)
                  + pad(fmt(r.p50us), 8) + pad(fmt(r.p99us), 8) + pad(fmt(r.serverCPUPercent), 9) + pad(fmt(r.serverCPUusPerMessage), 11)
                  + pad(fmt(tput) + "x", 9) + pad(fmt(p99) + "x", 8) + fmt(eff) + "x")
        }

        let spawn = try spawnBenchmark(count: spawnCount)
        print("\nSpawn + wait of /bin/true, \(spawn.count) times each")
        print(pad("spawner", 34) + pad("mean us", 10) + "p50 us")
        print(pad("kuasar Spawner (pidfd)", 34) + pad(fmt(spawn.clone3MeanUS), 10) + fmt(spawn.clone3P50US))
        print(pad("posix_spawn + waitpid (glibc)", 34) + pad(fmt(spawn.posixSpawnMeanUS), 10) + fmt(spawn.posixSpawnP50US))
        print(pad("Foundation.Process", 34) + pad(fmt(spawn.foundationMeanUS), 10) + fmt(spawn.foundationP50US))
        print("kuasar vs posix_spawn: \(fmt(spawn.speedup))x; vs Foundation.Process: \(fmt(spawn.speedupVsFoundation))x (mean time ratio, >1 = kuasar faster)")

        var host = utsname()
        uname(&host)
        let release = withUnsafeBytes(of: host.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let report = Report(host: "Linux \(release), \(ProcessInfo.processInfo.activeProcessorCount) cores",
                            date: ISO8601DateFormatter().string(from: Date()), echo: results, ratios: ratios, spawn: spawn)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let path = resultsDirectory() + "/reactor.json"
        try encoder.encode(report).write(to: URL(fileURLWithPath: path))
        print("\nwrote \(path)")
    }

    static func spawnBenchmark(count: Int) throws -> SpawnResult {
        var ours: [Double] = [], posix: [Double] = [], foundation: [Double] = []
        for _ in 0..<20 { _ = try Spawner.wait(try Spawner.spawn(ProcessSpec(executable: "/bin/true"))) }
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/true"), nil]
        defer { free(argv[0]) }
        // Ours and posix_spawn interleaved so drift on a noisy machine hits both alike;
        // Foundation afterwards, as its SIGCHLD monitor thread would wake on every
        // exit of the others and tax whoever runs next.
        for i in 0..<(count * 3) {
            let t0 = DispatchTime.now().uptimeNanoseconds
            switch i < count * 2 ? i % 2 : 2 {
            case 0:
                let status = try Spawner.wait(try Spawner.spawn(ProcessSpec(executable: "/bin/true")))
                precondition(status == .exited(0))
                ours.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1000)
            case 1:
                // glibc's posix_spawn (CLONE_VM | CLONE_VFORK) + waitpid: what Process uses underneath.
                var pid: pid_t = 0
                precondition(posix_spawn(&pid, "/bin/true", nil, nil, argv, environ) == 0)
                var st: Int32 = 0
                waitpid(pid, &st, 0)
                posix.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1000)
            default:
                let p = Process()
                p.executableURL = URL(fileURLWithPath: "/bin/true")
                try p.run()
                p.waitUntilExit()
                precondition(p.terminationStatus == 0)
                foundation.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1000)
            }
        }
        func mean(_ a: [Double]) -> Double { a.reduce(0, +) / Double(a.count) }
        func p50(_ a: [Double]) -> Double { a.sorted()[a.count / 2] }
        return SpawnResult(count: count, clone3MeanUS: mean(ours), clone3P50US: p50(ours),
                           posixSpawnMeanUS: mean(posix), posixSpawnP50US: p50(posix),
                           foundationMeanUS: mean(foundation), foundationP50US: p50(foundation),
                           speedup: mean(posix) / mean(ours), speedupVsFoundation: mean(foundation) / mean(ours))
    }

    /// utime + stime of every thread of `pid`, in clock ticks (/proc/PID/stat fields 14, 15).
    static func cpuTicks(_ pid: Int32) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return 0 }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // fields[0] is the state (field 3), so utime (14) is fields[11], stime (15) fields[12].
        return (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
    }

    static func resultsDirectory() -> String {
        // perf/results next to this package, wherever it is run from.
        var dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent()  // Sources/kuasar-perf
        dir = dir.deletingLastPathComponent().deletingLastPathComponent()
        let out = dir.appendingPathComponent("results").path
        try? FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        return out
    }

    static func pin(to cpu: Int) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
        p.arguments = ["-cp", "\(cpu)", "\(getpid())"]
        p.standardOutput = FileHandle.nullDevice
        try? p.run()
        p.waitUntilExit()
    }

    static func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
    static func fmt(_ x: Double) -> String { String(format: x >= 100 ? "%.0f" : "%.2f", x) }
}
