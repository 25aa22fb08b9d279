import Foundation
import Runtime
import SwiftProtobuf

/// Unary RPCs from one Go client process (CPU 1) against our server and against the
/// Go peer a user would otherwise run (each on CPU 0), on 1 and on 16 connections:
/// ttrpc (containerd.task.v2.Task/State; the Go ttrpc library on both ends) and gRPC
/// (a 64-byte echo; grpc-go on both ends).
enum RPCBenchmark {
    enum Wire: String {
        case ttrpc, grpc
        var peer: String { self == .ttrpc ? "ttrpc-peer" : "grpc-peer" }
        var goLabel: String { self == .ttrpc ? "go-ttrpc" : "grpc-go" }
    }

    struct Row: Codable {
        var server: String
        var connections: Int
        var callersPerConnection: Int
        var calls: Int
        var perSecond: Double
        var p50us: Double
        var p99us: Double
        /// Server CPU time per call: what tells servers apart when the client saturates first.
        var serverCPUusPerCall: Double
    }
    struct Report: Codable {
        var date: String
        var peers: [String: String]
        var rows: [Row]
        var throughputVsGo: [String: Double]
        var p50VsGo: [String: Double]
    }

    /// Our gRPC server process: echoes /test.Echo/Echo like the grpc-go peer.
    static func serveGRPC(socket: String) throws {
        try EchoServers.serveUntilSIGTERM { reactor in
            let server = GRPCServer(reactor: reactor)
            server.register(service: "test.Echo", method: "Echo") { call in call.respond(call.requestMessage) }
            unlink(socket)
            try server.listen(path: socket)
            return { server.close() }
        }
    }

    /// Our ttrpc server process: the State handler answers from the request, like the Go peer's.
    static func serveTTRPC(socket: String) throws {
        try EchoServers.serveUntilSIGTERM { reactor in
            let server = TTRPCServer(reactor: reactor)
            server.registerUnary(service: "containerd.task.v2.Task", method: "State") { (call, req: Containerd_Task_V2_StateRequest) in
                var r = Containerd_Task_V2_StateResponse()
                r.id = req.id
                r.execID = req.execID
                r.bundle = "/run/bundle/" + (call.metadata("containerd-namespace-ttrpc").first ?? "")
                r.pid = 42
                r.exitStatus = 3
                r.exitedAt = Google_Protobuf_Timestamp(seconds: 1_700_000_000)
                call.respond(r)
            }
            unlink(socket)
            try server.listen(path: socket)
            return { server.close() }
        }
    }

    static func goPeer(_ name: String) throws -> String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent()  // perf/Sources/kuasar-perf/x.swift → repo
        let out = root.path + "/perf/.build/\(name)"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/lib/go-1.19/bin/go")
        p.arguments = ["build", "-o", out, "."]
        p.currentDirectoryURL = root.appendingPathComponent("Tests/Peers/\(name)")
        p.environment = ["GO111MODULE": "off", "GOPATH": root.path + "/.build/gopath:/usr/share/gocode",
                         "GOCACHE": root.path + "/.build/gocache", "HOME": "/tmp", "PATH": "/usr/bin:/bin"]
        try p.run()
        p.waitUntilExit()
        precondition(p.terminationStatus == 0, "go build of \(name) failed (make deps installs its Debian packages)")
        return out
    }

    static func run(_ wire: Wire, seconds: Double, executable: String) throws {
        let peer = try goPeer(wire.peer)
        let shapes = [(1, 1), (1, 16), (16, 4)]
        var rows: [Row] = []
        for server in ["kuasar", wire.goLabel] {
            let socket = "/tmp/kuasar-perf-\(getpid())-\(wire)-\(server).sock"
            let proc = Process()
            proc.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
            proc.arguments = server == "kuasar" ? ["-c", "0", executable, "\(wire)-server", socket] : ["-c", "0", peer, "server", socket]
            let out = Pipe()
            proc.standardOutput = out
            try proc.run()
            _ = out.fileHandleForReading.readData(ofLength: 6)  // "ready\n"
            for (conns, per) in shapes {
                _ = try client(peer, socket, conns, per, 0.3)
                let cpu0 = ReactorBenchmark.cpuTicks(proc.processIdentifier)
                let r = try client(peer, socket, conns, per, seconds)
                let ticks = ReactorBenchmark.cpuTicks(proc.processIdentifier) - cpu0
                let cpuPerCall = Double(ticks) / Double(sysconf(Int32(_SC_CLK_TCK))) * 1e6 / Double(max(r.0, 1))
                rows.append(Row(server: server, connections: conns, callersPerConnection: per, calls: r.0, perSecond: r.1, p50us: r.2, p99us: r.3,
                                serverCPUusPerCall: cpuPerCall))
                FileHandle.standardError.write("  \(wire) \(server) \(conns)x\(per): \(Int(r.1)) calls/s\n".data(using: .utf8)!)
            }
            kill(proc.processIdentifier, SIGTERM)
            proc.waitUntilExit()
            unlink(socket)
        }
        var tput: [String: Double] = [:], p50: [String: Double] = [:]
        print("\n\(wire) unary calls, \(wire.goLabel) client (CPU 1), server on CPU 0, \(seconds) s per row")
        print(ReactorBenchmark.pad("server", 10) + ReactorBenchmark.pad("conns", 7) + ReactorBenchmark.pad("callers", 9)
              + ReactorBenchmark.pad("calls/s", 10) + ReactorBenchmark.pad("p50 us", 9) + ReactorBenchmark.pad("p99 us", 9) + ReactorBenchmark.pad("CPU us/call", 12) + ReactorBenchmark.pad("tput/Go", 9) + ReactorBenchmark.pad("p50/Go", 8) + "Go CPU/ours")
        for r in rows {
            let go = rows.first { $0.server != "kuasar" && $0.connections == r.connections && $0.callersPerConnection == r.callersPerConnection }!
            let key = "\(r.connections)x\(r.callersPerConnection)"
            if r.server == "kuasar" { tput[key] = r.perSecond / go.perSecond; p50[key] = r.p50us / go.p50us }
            print(ReactorBenchmark.pad(r.server, 10) + ReactorBenchmark.pad("\(r.connections)", 7) + ReactorBenchmark.pad("\(r.connections * r.callersPerConnection)", 9)
                  + ReactorBenchmark.pad("\(Int(r.perSecond))", 10) + ReactorBenchmark.pad(ReactorBenchmark.fmt(r.p50us), 9)
                  + ReactorBenchmark.pad(ReactorBenchmark.fmt(r.p99us), 9) + ReactorBenchmark.pad(ReactorBenchmark.fmt(r.serverCPUusPerCall), 12)
                  + ReactorBenchmark.pad(ReactorBenchmark.fmt(r.perSecond / go.perSecond) + "x", 9)
                  + ReactorBenchmark.pad(ReactorBenchmark.fmt(r.p50us / go.p50us) + "x", 8)
                  + ReactorBenchmark.fmt(go.serverCPUusPerCall / max(r.serverCPUusPerCall, 0.001)) + "x")
        }
        let peers = ["kuasar": KuasarVersion.string, "go": ContainerBenchmark.version("/usr/lib/go-1.19/bin/go version"),
                     "grpc-go": ContainerBenchmark.version("dpkg-query -W -f='${Version}\\n' golang-google-grpc-dev"),
                     "ttrpc-go": ContainerBenchmark.version("dpkg-query -W -f='${Version}\\n' golang-github-containerd-ttrpc-dev")]
        let report = Report(date: ISO8601DateFormatter().string(from: Date()), peers: peers, rows: rows, throughputVsGo: tput, p50VsGo: p50)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let path = ReactorBenchmark.resultsDirectory() + "/\(wire).json"
        try encoder.encode(report).write(to: URL(fileURLWithPath: path))
        print("wrote \(path)")
    }

    static func client(_ peer: String, _ socket: String, _ conns: Int, _ per: Int, _ seconds: Double) throws -> (Int, Double, Double, Double) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
        p.arguments = ["-c", "1", peer, "bench", socket, "\(conns)", "\(per)", "\(seconds)"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let f = String(decoding: data, as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard f.count >= 4, let n = Int(f[0]), let r = Double(f[1]), let a = Double(f[2]), let b = Double(f[3]) else {
            throw NSError(domain: "ttrpc-bench", code: 1, userInfo: [NSLocalizedDescriptionKey: "bad client output: \(String(decoding: data, as: UTF8.self))"])
        }
        return (n, r, a, b)
    }
}
