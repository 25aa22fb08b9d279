import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The repository root, found from this file's path.
let repositoryRoot: String = {
    var path = #filePath
    for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }  // Tests/RuntimeTests/x.swift
    return path
}()

/// Builds a Go peer from Tests/Peers/NAME once per test run (GOPATH mode, offline,
/// from Debian's packages) and returns its path.
func goPeer(_ name: String) throws -> String {
    let out = "\(repositoryRoot)/.build/peers/\(name)"
    if builtPeers.contains(name) && access(out, X_OK) == 0 { return out }
    let go = "/usr/lib/go-1.19/bin/go"
    #expect(access(go, X_OK) == 0, "Go 1.19 is missing: make test installs golang-1.19-go")
    try makeDirectories("\(repositoryRoot)/.build/peers")
    var spec = ProcessSpec(executable: go, arguments: ["go", "build", "-o", out, "."],
                           environment: ["GO111MODULE=off", "GOPATH=\(repositoryRoot)/.build/gopath:/usr/share/gocode",
                                         "GOCACHE=\(repositoryRoot)/.build/gocache", "HOME=/tmp", "PATH=/usr/bin:/bin"],
                           workingDirectory: "\(repositoryRoot)/Tests/Peers/\(name)")
    let log = try makePipe(nonBlocking: false)
    spec.fdMap = [(from: log.second.rawValue, to: 1), (from: log.second.rawValue, to: 2)]
    let child = try Spawner.spawn(spec)
    log.second.close()
    let output = String(decoding: try log.first.readExactly(1 << 20), as: UTF8.self)
    log.first.close()
    let status = try Spawner.wait(child)
    #expect(status == .exited(0), "go build \(name): \(output)")
    builtPeers.insert(name)
    return out
}
nonisolated(unsafe) var builtPeers: Set<String> = []

/// A peer process run under the reactor's supervisor, its stdout collected on the loop.
final class PeerProcess {
    var output: [UInt8] = []
    var exit: ExitStatus?
    var outputClosed = false
    var pid: pid_t = 0
    private var connection: Connection?

    init(reactor: Reactor, supervisor: ProcessSupervisor, _ arguments: [String]) throws {
        let pipe = try makePipe()
        var spec = ProcessSpec(executable: arguments[0], arguments: arguments)
        spec.fdMap = [(from: pipe.second.rawValue, to: 1), (from: 2, to: 2)]
        pid = try supervisor.spawn(spec) { [unowned self] status in self.exit = status }
        pipe.second.close()
        let conn = Connection(reactor: reactor, fd: pipe.first)
        conn.onRead = { [unowned self] _, bytes in self.output += bytes }
        conn.onReadEOF = { [unowned self] c in self.outputClosed = true; c.close() }
        try conn.start()
        connection = conn
    }

    var text: String { String(decoding: output, as: UTF8.self).trimmingCharacters(in: .newlines) }
    var done: Bool { exit != nil && outputClosed }

    func close() { connection?.close() }
}

/// argv for one of the Python peers in Tests/Peers/python, run by Debian's python3.
func pythonPeer(_ script: String, _ arguments: String...) -> [String] {
    [systemPython, "\(repositoryRoot)/Tests/Peers/python/\(script)"] + arguments
}

/// Runs a peer to completion under the reactor (its output collected on the loop).
func runPeer(_ reactor: Reactor, _ supervisor: ProcessSupervisor, _ arguments: [String],
             timeoutMS: UInt64 = 30_000, sourceLocation: SourceLocation = #_sourceLocation) throws -> PeerProcess {
    let peer = try PeerProcess(reactor: reactor, supervisor: supervisor, arguments)
    try spin(reactor, timeoutMS: timeoutMS, "peer \(arguments.dropFirst().joined(separator: " "))",
             sourceLocation: sourceLocation) { peer.done }
    return peer
}

extension String {
    func trimmingCharacters(in set: Set<Character>) -> String {
        var s = Substring(self)
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}

extension Set where Element == Character {
    static let newlines: Set<Character> = ["\n", "\r"]
}

/// PyPI's grpcio-health-checking (pure Python) for Debian's grpcio 1.51: fetched once
/// into .build/peers with pip (no install: it is imported from the wheel itself).
func healthCheckingWheel() throws -> String {
    let dir = "\(repositoryRoot)/.build/peers/python"
    let wheel = dir + "/grpcio_health_checking-1.51.1-py3-none-any.whl"
    if access(wheel, R_OK) == 0 { return wheel }
    try makeDirectories(dir)
    let r = try shell("\(systemPython) -m pip download --quiet --no-deps grpcio-health-checking==1.51.1 -d \(dir)", timeoutS: 120)
    #expect(r.code == 0 && access(wheel, R_OK) == 0, "pip download grpcio-health-checking: \(r.out)")
    return wheel
}
