import Foundation
import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// A scratch OCI bundle: a busybox rootfs (static binary, relative applet links) and the
/// config.json `runc spec` writes, adjusted per test.
final class TestBundle {
    let path: String
    var rootfs: String { path + "/rootfs" }

    init(_ name: String) throws {
        path = "/tmp/kuasar-test-bundles/\(name)-\(getpid())"
        Files.removeTree(path)
        try makeDirectories(path + "/rootfs/bin", mode: 0o755)
        for d in ["proc", "sys", "dev", "tmp", "etc", "root"] { try makeDirectories(rootfs + "/" + d, mode: 0o755) }
        try run("/bin/cp", "/bin/busybox", rootfs + "/bin/busybox")
        let applets = try capture("/bin/busybox", "--list").split(separator: "\n")
        for a in applets where a != "busybox" { symlink("busybox", rootfs + "/bin/" + a) }
        try Files.write(rootfs + "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n", create: true)
        try Files.write(rootfs + "/etc/group", "root:x:0:\nnogroup:x:65534:\n", create: true)
        try run("/usr/sbin/runc", "spec", "--bundle", path)
    }

    /// config.json as a dictionary, edited by `body`, written back.
    func editSpec(_ body: (inout [String: Any]) -> Void) throws {
        let data = try Data(contentsOf: URL(fileURLWithPath: path + "/config.json"))
        var json = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        body(&json)
        try JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted]).write(to: URL(fileURLWithPath: path + "/config.json"))
    }

    func setProcess(args: [String], terminal: Bool = false) throws {
        try editSpec { spec in
            var p = spec["process"] as! [String: Any]
            p["args"] = args
            p["terminal"] = terminal
            spec["process"] = p
        }
    }

    func spec() throws -> OCISpec {
        try OCISpec.decode(Files.read(path + "/config.json"))
    }

    func remove() {
        Mounts.unmountAll(under: path)
        Files.removeTree(path)
    }
}

/// An empty `/tmp/kuasar-<name>-<pid>` for one test; the caller removes it.
func scratchDirectory(_ name: String) throws -> String {
    let dir = "/tmp/kuasar-\(name)-\(getpid())"
    Files.removeTree(dir)
    try makeDirectories(dir, mode: 0o755)
    return dir
}

@discardableResult
func run(_ args: String...) throws -> Int32 {
    let p = try Spawner.spawn(ProcessSpec(executable: args[0], arguments: args))
    return try Spawner.wait(p).code
}

func capture(_ args: String...) throws -> String {
    let out = "/tmp/kuasar-capture-\(getpid())"
    defer { unlink(out) }
    let fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    defer { close(fd) }
    let p = try Spawner.spawn(ProcessSpec(executable: args[0], arguments: args, fdMap: [(fd, 1)]))
    _ = try Spawner.wait(p)
    return try Files.readString(out)
}

/// Mount points under `prefix` (leak checks).
func mountsUnder(_ prefix: String) -> [String] {
    Mounts.mountPoints().filter { $0.hasPrefix(prefix) }
}

/// Whether `pid` has exited (a zombie counts: a daemon started through the shim is
/// re-parented to PID 1, which reaps when it pleases).
func processGone(_ pid: pid_t) -> Bool {
    guard kill(pid, 0) == 0 else { return true }
    guard let stat = try? Files.readString("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return true }
    return stat[stat.index(close, offsetBy: 2)] == "Z"
}

/// Polls `condition` every `everyMS` until it holds or `timeoutMS` passes; returns it.
@discardableResult
func waitUntil(timeoutMS: Int = 5000, everyMS: Int = 10, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = MonotonicClock.nanoseconds() + UInt64(timeoutMS) * 1_000_000
    while true {
        if try condition() { return true }
        if MonotonicClock.nanoseconds() >= deadline { return false }
        usleep(useconds_t(everyMS * 1000))
    }
}

/// A daemon configuration for tests whose daemons are started by the CLI or the shim:
/// their containers go with the daemon (on_exit = "stop"), so the leak checks see a
/// clean host. The production default (keep, for recovery) has its own tests.
enum TestConfig {
    static let stopOnExit: String = {
        // In the build directory, one for every run: not a file left in /tmp per run.
        let path = "\(repositoryRoot)/.build/kuasar-test-config.toml"
        try? Files.write(path, withoutTemplates("[daemon]\non_exit = \"stop\"\n"), create: true, mode: 0o644)
        return path
    }()

    /// Only the embedded defaults, but no VM template (see `withoutTemplates`).
    static let defaults: String = {
        let path = "\(repositoryRoot)/.build/kuasar-test-defaults.toml"
        try? Files.write(path, withoutTemplates(""), create: true, mode: 0o644)
        return path
    }()

    /// A daemon under test builds no VM template at start unless the test asks (its config
    /// says `[vm]`): the default would boot a guest beside every test's daemon, into the
    /// machine's /dev/shm.
    static func withoutTemplates(_ config: String) -> String {
        config.contains("[vm]") ? config : config + "\n[vm]\ntemplate = false\n"
    }
}
