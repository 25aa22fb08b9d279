import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// Swift Testing has an `ExitStatus` of its own (for exit tests); ours is meant here.
typealias ExitStatus = Runtime.ExitStatus

/// Every test runs inside this one serialized suite: the leak checks count this
/// process's descriptors and children, which parallel tests would disturb.
@Suite(.serialized) enum AllTests {}

/// Runs `body` with a fresh reactor of `kind` and checks that afterwards this process
/// has exactly the descriptors it had before: no fd leaks from the test or the reactor.
func withReactor(_ kind: BackendKind, _ body: (Reactor) throws -> Void) throws {
    guard kind.isAvailable else {
        print("skipping \(kind): the kernel refuses it on this host")
        return
    }
    let before = openFDCount()
    let reactor = try Reactor(backend: kind)
    do {
        try body(reactor)
    } catch {
        reactor.close()
        throw error
    }
    #expect(reactor.userRegistrationCount == 0, "registrations left behind: \(reactor.userRegistrationCount)")
    reactor.close()
    #expect(openFDCount() == before, "descriptors leaked: \(openFDCount() - before)")
}

/// Runs the loop until `condition` holds; fails the test on time-out.
func spin(_ reactor: Reactor, timeoutMS: UInt64 = 10_000, _ what: String = "condition",
          sourceLocation: SourceLocation = #_sourceLocation, until condition: () -> Bool) throws {
    let ok = try reactor.run(until: condition, timeoutNS: timeoutMS * 1_000_000)
    #expect(ok, "timed out waiting for \(what)", sourceLocation: sourceLocation)
}

/// Runs the loop for `ms` milliseconds: lets late events arrive (or prove none do).
func settle(_ reactor: Reactor, ms: UInt64) throws {
    var settled = false
    reactor.schedule(afterNS: ms * 1_000_000) { settled = true }
    try spin(reactor) { settled }
}

/// Non-blocking read of whatever is there (empty at EAGAIN, nil at end of file).
func drain(_ fd: Int32) throws -> [UInt8]? {
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n > 0 { out += buf[..<n]; continue }
        if n == 0 { return out.isEmpty ? nil : out }
        let e = Errno.current
        if e == .EAGAIN { return out }
        if e == .EINTR { continue }
        throw SystemError("read", errno: e)
    }
}

func writeRaw(_ fd: Int32, _ bytes: [UInt8]) -> Int {
    bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
}

/// Children of this process that have not been reaped (zombies included).
func childCount() -> Int {
    let me = getpid()
    guard let dir = opendir("/proc") else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while let e = readdir(dir) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        guard let pid = Int32(name) else { continue }
        guard let f = fopen("/proc/\(pid)/stat", "r") else { continue }
        var buf = [CChar](repeating: 0, count: 512)
        let line = fgets(&buf, 512, f).map { String(cString: $0) } ?? ""
        fclose(f)
        // pid (comm) state ppid ...; comm may contain spaces, so parse after the last ')'.
        if let close = line.lastIndex(of: ")") {
            let fields = line[line.index(after: close)...].split(separator: " ")
            if fields.count > 1, Int32(fields[1]) == me { n += 1 }
        }
    }
    return n
}

/// A daemon's (or containerd's) log, kept after its test in `.build/test-logs/<name>.log`
/// (the last run's): a failure seen once, in CI say, can be read after the fact.
func keepLog(_ name: String, _ text: String) {
    let dir = repositoryRoot + "/.build/test-logs"
    try? makeDirectories(dir, mode: 0o755)
    try? Files.write(dir + "/" + name + ".log", text, create: true)
}
