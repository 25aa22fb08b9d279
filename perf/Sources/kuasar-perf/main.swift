import Foundation
import Runtime

/// kuasar-perf: benchmarks side by side with their peers, in one run.
///   kuasar-perf reactor [--seconds S]   echo: io_uring, epoll, SwiftNIO; and spawn: clone3 vs posix_spawn
///   kuasar-perf echo-server KIND SOCKET (internal: the server process)
let args = CommandLine.arguments
let me = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path

func option(_ name: String, default value: Double) -> Double {
    if let i = args.firstIndex(of: name), i + 1 < args.count, let v = Double(args[i + 1]) { return v }
    return value
}

switch args.count > 1 ? args[1] : "reactor" {
case "echo-server":
    try EchoServers.run(kind: args[2], socket: args[3])
case "reactor":
    try ReactorBenchmark.run(seconds: option("--seconds", default: 2), spawnCount: Int(option("--spawns", default: 300)), executable: me)
default:
    print("usage: kuasar-perf [reactor [--seconds S] [--spawns N]]")
    exit(2)
}
