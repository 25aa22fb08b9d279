import Foundation
import Runtime
import SwiftProtobuf

/// ttrpc unary calls (containerd.task.v2.Task/State) from one Go client process
/// (the Go ttrpc library, CPU 1) against our server and against the Go ttrpc server
/// (each on CPU 0), on 1 and on 16 connections.
enum TTRPCBenchmark {
    struct Row: Codable {
        var server: String
        var connections: Int
        var callersPerConnection: Int
        var calls: Int
        var perSecond: Double
        var p50us: Double
        var p99us: Double
    }
    struct Report: Codable {
        var date: String
        var rows: [Row]
        var throughputVsGo: [String: Double]
        var p50VsGo: [String: Double]
    }

    /// Our server process: the State handler answers from the request, like the Go peer's.
    static func serve(socket: String) throws {
        try Signals.block([SIGTERM])
        let reactor = try Reactor()
        try reactor.onSignals([SIGTERM]) { _ in reactor.stop() }
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
        EchoServers.ready()
        try reactor.run()
        server.close()
        reactor.close()
    }

    static func goPeer() throws -> String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent()  // perf/Sources/kuasar-perf/x.swift → repo
        let out = root.path + "/perf/.build/ttrpc-peer"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/lib/go-1.19/bin/go")
        p.arguments = ["build", "-o", out, "."]
        p.currentDirectoryURL = root.appendingPathComponent("Tests/Peers/ttrpc-peer")
        p.environment = ["GO111MODULE": "off", "GOPATH": root.path + "/.build/gopath:/usr/share/gocode",
                         "GOCACHE": root.path + "/.build/gocache", "HOME": "/tmp", "PATH": "/usr/bin:/bin"]
        try p.run()
        p.waitUntilExit()
        precondition(p.terminationStatus == 0, "go build of the ttrpc peer failed (apt: golang-1.19-go golang-github-containerd-ttrpc-dev golang-github-containerd-containerd-dev)")
        return out
    }

    static func run(seconds: Double, executable: String) throws {
        let peer = try goPeer()
        let shapes = [(1, 1), (1, 16), (16, 4)]
        var rows: [Row] = []
        for server in ["kuasar", "go"] {
            let socket = "/tmp/kuasar-perf-\(getpid())-ttrpc-\(server).sock"
            let proc = Process()
            proc.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
            proc.arguments = server == "go" ? ["-c", "0", peer, "server", socket] : ["-c", "0", executable, "ttrpc-server", socket]
            let out = Pipe()
            proc.standardOutput = out
            try proc.run()
            _ = out.fileHandleForReading.readData(ofLength: 6)  // "ready\n"
            for (conns, per) in shapes {
                _ = try client(peer, socket, conns, per, 0.3)
                let r = try client(peer, socket, conns, per, seconds)
                rows.append(Row(server: server, connections: conns, callersPerConnection: per, calls: r.0, perSecond: r.1, p50us: r.2, p99us: r.3))
                FileHandle.standardError.write("  ttrpc \(server) \(conns)x\(per): \(Int(r.1)) calls/s\n".data(using: .utf8)!)
            }
            kill(proc.processIdentifier, SIGTERM)
            proc.waitUntilExit()
            unlink(socket)
        }
        var tput: [String: Double] = [:], p50: [String: Double] = [:]
        print("\nttrpc unary State calls, Go ttrpc client (CPU 1), server on CPU 0, \(seconds) s per row")
        print(ReactorBenchmark.pad("server", 8) + ReactorBenchmark.pad("conns", 7) + ReactorBenchmark.pad("callers", 9)
              + ReactorBenchmark.pad("calls/s", 10) + ReactorBenchmark.pad("p50 us", 9) + ReactorBenchmark.pad("p99 us", 9) + ReactorBenchmark.pad("tput/Go", 9) + "p50/Go")
        for r in rows {
            let go = rows.first { $0.server == "go" && $0.connections == r.connections && $0.callersPerConnection == r.callersPerConnection }!
            let key = "\(r.connections)x\(r.callersPerConnection)"
            if r.server == "kuasar" { tput[key] = r.perSecond / go.perSecond; p50[key] = r.p50us / go.p50us }
            print(ReactorBenchmark.pad(r.server, 8) + ReactorBenchmark.pad("\(r.connections)", 7) + ReactorBenchmark.pad("\(r.connections * r.callersPerConnection)", 9)
                  + ReactorBenchmark.pad("\(Int(r.perSecond))", 10) + ReactorBenchmark.pad(ReactorBenchmark.fmt(r.p50us), 9)
                  + ReactorBenchmark.pad(ReactorBenchmark.fmt(r.p99us), 9)
                  + ReactorBenchmark.pad(ReactorBenchmark.fmt(r.perSecond / go.perSecond) + "x", 9) + ReactorBenchmark.fmt(r.p50us / go.p50us) + "x")
        }
        let report = Report(date: ISO8601DateFormatter().string(from: Date()), rows: rows, throughputVsGo: tput, p50VsGo: p50)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let path = ReactorBenchmark.resultsDirectory() + "/ttrpc.json"
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
