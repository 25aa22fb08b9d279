import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// Drives the real `kuasar` binary, built next to the test bundle.
extension AllTests {
@Suite struct DaemonTests {
    static var binary: String {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        let exe = String(decoding: buf[..<max(n, 0)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var dir = exe[..<(exe.lastIndex(of: "/") ?? exe.endIndex)]
        // swift test runs the bundle from <build>/debug/kuasarPackageTests.xctest
        if dir.hasSuffix(".xctest") { dir = dir[..<(dir.lastIndex(of: "/") ?? dir.endIndex)] }
        return dir + "/kuasar"
    }

    struct Running: ~Copyable {
        var process: SpawnedProcess
        let log: OwnedFD
    }

    static func start(_ args: [String], socket: String) throws -> Running {
        #expect(access(binary, X_OK) == 0, "kuasar binary at \(binary); build it first (make test does)")
        let pipe = try makePipe()
        // Tests clean up after themselves: containers go with the daemon unless a test
        // asks for the production default (keep, for recovery).
        let onExit = args.contains("--on-exit") ? [] : ["--on-exit", "stop"]
        let config = args.contains("--config") ? [] : ["--config", TestConfig.defaults]
        var spec = ProcessSpec(executable: binary, arguments: ["kuasar", "daemon", "--socket", socket] + onExit + config + args)
        spec.fdMap = [(from: pipe.second.rawValue, to: 2)]
        let p = try Spawner.spawn(spec)
        pipe.second.close()
        return Running(process: p, log: pipe.first)
    }

    static func waitForSocket(_ path: String) -> Bool {
        for _ in 0..<500 {
            if (try? HealthProbe.query(socketPath: path)) != nil { return true }
            usleep(10_000)
        }
        return false
    }

    static func stop(_ r: consuming Running, signal: Int32 = SIGTERM) throws -> (ExitStatus, String) {
        try sendSignal(pidfd: r.process.pidfd.rawValue, signal)
        let status = try Spawner.wait(r.process)
        let log = (try? drain(r.log.rawValue)).flatMap { $0 }.map { String(decoding: $0, as: UTF8.self) } ?? ""
        r.log.close()
        return (status, log)
    }

    @Test(arguments: BackendKind.allCases)
    func healthSocketModeAndCleanShutdown(kind: BackendKind) throws {
        let dir = "/tmp/kuasar-test-\(getpid())-daemon/nested"
        let socket = dir + "/kuasar.sock"
        let daemon = try Self.start(["--reactor", kind.rawValue], socket: socket)
        #expect(Self.waitForSocket(socket), "daemon answers on \(socket)")

        var st = stat()
        #expect(stat(socket, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600, "API socket must be 0600")
        #expect(stat(dir, &st) == 0 && st.st_mode & 0o777 == 0o700)

        let answer = try HealthProbe.query(socketPath: socket)
        #expect(answer.hasPrefix("ok serving version=\(KuasarVersion.string) reactor=\(kind.rawValue)"), "\(answer)")

        // Bad input gets a clear answer and the daemon keeps serving.
        do {
            _ = try HealthProbe.check(socketPath: socket, service: "hello?")
            Issue.record("an unknown service was answered")
        } catch let e as RPCError {
            #expect(e.code == .notFound && e.message.contains("unknown service \"hello?\""), "\(e)")
        }
        // The line protocol is gone: what is not gRPC is closed.
        let line = try Socket.connectUnix(path: socket, blocking: true).take()
        _ = write(line, "health\n", 7)
        var b: UInt8 = 0
        #expect(recv(line, &b, 1, 0) <= 0, "a non-gRPC connection was answered")
        close(line)
        #expect(try HealthProbe.check(socketPath: socket) == .serving)

        // A second daemon on the same socket refuses to steal it.
        let second = try Self.start([], socket: socket)
        let secondStatus = try Spawner.wait(second.process)
        let secondLog = (try? drain(second.log.rawValue)).flatMap { $0 }.map { String(decoding: $0, as: UTF8.self) } ?? ""
        second.log.close()
        #expect(secondStatus == .exited(1))
        #expect(secondLog.contains("EADDRINUSE"), "log: \(secondLog)")

        let (status, log) = try Self.stop(daemon)
        #expect(status == .exited(0), "log: \(log)")
        #expect(access(socket, F_OK) != 0, "socket removed at shutdown")
        #expect(log.contains("reactor: \(kind.rawValue)"))
        // After 6 connections and a refused second daemon, nothing is left open.
        let fdLine = log.split(separator: "\n").first { $0.contains("descriptors open:") } ?? ""
        let numbers = fdLine.split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) }
        #expect(numbers.count >= 2 && numbers[numbers.count - 2] == numbers[numbers.count - 1], "\(fdLine)")
        rmdir(dir)
        rmdir("/tmp/kuasar-test-\(getpid())-daemon")
    }

    @Test func staleSocketIsReplaced() throws {
        let dir = "/tmp/kuasar-test-\(getpid())-stale"
        let socket = dir + "/kuasar.sock"
        // A socket file whose listener is gone, as after kill -9.
        let stale = try Socket.listenUnix(path: socket)
        stale.close()
        #expect(access(socket, F_OK) == 0)
        let daemon = try Self.start([], socket: socket)
        #expect(Self.waitForSocket(socket))
        let (status, _) = try Self.stop(daemon, signal: SIGINT)
        #expect(status == .exited(0))
        rmdir(dir)
    }

    @Test func refusesToReplaceANonSocket() throws {
        let dir = "/tmp/kuasar-test-\(getpid())-nonsock"
        let path = dir + "/kuasar.sock"
        try makeDirectories(dir)
        let f = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
        close(f)
        let daemon = try Self.start([], socket: path)
        let status = try Spawner.wait(daemon.process)
        let log = (try? drain(daemon.log.rawValue)).flatMap { $0 }.map { String(decoding: $0, as: UTF8.self) } ?? ""
        daemon.log.close()
        #expect(status == .exited(1))
        #expect(log.contains("bind(\"\(path)\"): EEXIST"), "log: \(log)")
        #expect(access(path, F_OK) == 0, "a regular file is never unlinked")
        unlink(path)
        rmdir(dir)
    }
}
}
