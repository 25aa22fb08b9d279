import Foundation
import Runtime

/// kuasar-perf: benchmarks side by side with their peers, in one run.
///   kuasar-perf reactor [--seconds S]   echo: io_uring, epoll, SwiftNIO; and spawn: clone3 vs posix_spawn
///   kuasar-perf ttrpc [--seconds S]     ttrpc unary: our server vs the Go ttrpc server, same Go client
///   kuasar-perf grpc [--seconds S]      gRPC unary: our server vs grpc-go, same grpc-go client
///   kuasar-perf container [--runs N]    container lifecycle and per-pod memory: kuasar vs shim-runc-v2+runc, runc, crun
///   kuasar-perf external [--runs N]     container lifecycle with runc/crun under the daemon vs the runtime's own commands vs our engine
///   kuasar-perf pod [--runs N]          pod start over the sandbox Controller + Task API, ctr run -d vs containerd+runc, PSS at 1/100/500 pods
///   kuasar-perf agent [--boots N] [--runs N] [--against INITRD]  guest boot to agent-ready vs a /init that prints a line (and vs another image's agent, paired by round); container lifecycle in the guest vs on the host
///   kuasar-perf agent-tcg [--functions FILE]  what one guest boot translates to the agent's first answer (QEMU's -d in_asm), by phase, module and function: a count that does not drift with the machine's load
///   kuasar-perf vm [--boots N] [--pods N]  VM pod ready + first container vs raw QEMU to a /init, same command line; PSS at 1 and N pods
///   kuasar-perf wasm [--runs N] [--computes N] [--lifecycles N] [--idle N]  kuasar wasm-run start (WasmKit, Wasmtime cold/warm) vs a native exec; a sieve vs native C;
///                    the wasm kind through the daemon (lifecycle vs a namespace container, memory of N idle containers)
///   kuasar-perf vm-templates [--runs N] [--pods N]  VM pod ready + first container: clone of a template vs cold boot; PSS of N each
///   kuasar-perf all                     all of them
///   kuasar-perf echo-server KIND SOCKET, ttrpc-server / grpc-server SOCKET (internal: the server processes)
let args = CommandLine.arguments
let me = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path

func option(_ name: String, default value: Double) -> Double {
    if let i = args.firstIndex(of: name), i + 1 < args.count, let v = Double(args[i + 1]) { return v }
    return value
}

func stringOption(_ name: String) -> String? {
    guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
    return args[i + 1]
}

switch args.count > 1 ? args[1] : "reactor" {
case "echo-server":
    try EchoServers.run(kind: args[2], socket: args[3])
case "echo-client":
    // echo-client SOCKET SIZE INFLIGHT SECONDS: one run against a server started by hand (profiling).
    let r = try EchoClient.run(socket: args[2], size: Int(args[3])!, inFlight: Int(args[4])!, seconds: Double(args[5])!, server: "manual")
    print("\(Int(r.perSecond)) msg/s p50 \(r.p50us) us p99 \(r.p99us) us")
case "spawn":
    let r = try ReactorBenchmark.spawnBenchmark(count: Int(option("--spawns", default: 300)))
    print(r)
case "ttrpc-server":
    try RPCBenchmark.serveTTRPC(socket: args[2])
case "grpc-server":
    try RPCBenchmark.serveGRPC(socket: args[2])
case "ttrpc", "grpc":
    try RPCBenchmark.run(RPCBenchmark.Wire(rawValue: args[1])!, seconds: option("--seconds", default: 2), executable: me)
case "all":
    try ReactorBenchmark.run(seconds: option("--seconds", default: 2), spawnCount: Int(option("--spawns", default: 300)), executable: me)
    try RPCBenchmark.run(.ttrpc, seconds: option("--seconds", default: 2), executable: me)
    try RPCBenchmark.run(.grpc, seconds: option("--seconds", default: 2), executable: me)
case "events-sink":
    try ContainerBenchmark.serveEventsSink(path: args[2])
case "kuasar-daemon":
    try ContainerBenchmark.serveDaemon(root: args[2])
case "container":
    try ContainerBenchmark.run(count: Int(option("--runs", default: 200)), pods: [1, 100], executable: me)
case "agent":
    try AgentBenchmark.run(boots: Int(option("--boots", default: 5)), lifecycles: Int(option("--runs", default: 30)), against: stringOption("--against"))
case "agent-tcg":
    try TCGProfile.run(functionsFile: stringOption("--functions"))
case "vm":
    try VMBenchmark.run(boots: Int(option("--boots", default: 8)), pods: Int(option("--pods", default: 10)))
case "wasm":
    try WasmBenchmark.run(starts: Int(option("--runs", default: 30)), computes: Int(option("--computes", default: 3)),
                          lifecycles: Int(option("--lifecycles", default: 30)), idle: Int(option("--idle", default: 100)))
case "vm-templates":
    try VMTemplateBenchmark.run(runs: Int(option("--runs", default: 8)), pods: Int(option("--pods", default: 10)))
case "external":
    try ExternalBenchmark.run(runs: Int(option("--runs", default: 100)))
case "pod":
    try PodBenchmark.run(runs: Int(option("--runs", default: 200)), parallel: Int(option("--parallel", default: 50)),
                         memoryPoints: [1, 100, 500])
case "reactor":
    try ReactorBenchmark.run(seconds: option("--seconds", default: 2), spawnCount: Int(option("--spawns", default: 300)), executable: me)
default:
    print("usage: kuasar-perf [reactor|ttrpc|grpc|all|spawn] [--seconds S] [--spawns N]")
    exit(2)
}
