import Foundation
import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// Runs `command` with /bin/sh; returns its exit code and stdout+stderr. Blocking: the
/// peers (containerd, the daemon) are other processes.
func shell(_ command: String, env: [String]? = nil, timeoutS: Int = 60) throws -> (code: Int32, out: String) {
    let out = "/tmp/kuasar-shell-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    defer { unlink(out) }
    let fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
    defer { close(fd); close(null) }
    let p = try Spawner.spawn(ProcessSpec(executable: "/usr/bin/timeout", arguments: ["timeout", "\(timeoutS)", "/bin/sh", "-c", command],
                                          environment: env, fdMap: [(null, 0), (fd, 1), (fd, 2)]))
    let status = try Spawner.wait(p)
    return (status.code, (try? Files.readString(out)) ?? "")
}

/// Debian's containerd 1.6 on private paths with `containerd-shim-kuasar-v2` on its PATH
/// (a link to the kuasar binary under test) and a busybox image imported offline. The
/// first `ctr run` starts the kuasar daemon through the shim protocol.
final class ContainerdFixture {
    let name: String
    let dir: String
    let socket: String
    var kuasarRoot: String { dir + "/kuasar" }
    var containerdPID: pid_t = 0
    var containerdPidfd: Int32 = -1
    /// Container cgroups that were there before this fixture (another test's leak, reported
    /// by that test): only the ones this fixture adds count as its leaks.
    let cgroupsBefore: Set<String>
    static let image = "docker.io/library/busybox:latest"
    static let runtime = "io.containerd.kuasar.v2"

    /// `config`: the daemon's config file; `shims`: more names for the shim binary
    /// (`containerd-shim-kuasar-<x>-v2` serves sandboxer `kuasar-<x>`).
    init(_ name: String, config: String = TestConfig.stopOnExit, shims: [String] = []) throws {
        self.name = name
        dir = "/tmp/kuasar-ctd-\(name)-\(getpid())"
        cgroupsBefore = Self.containerCgroups()
        socket = dir + "/containerd.sock"
        Mounts.unmountAll(under: dir)
        Files.removeTree(dir)
        try makeDirectories(dir + "/bin", mode: 0o755)
        for shim in ["containerd-shim-kuasar-v2"] + shims { symlink(AllTests.DaemonTests.binary, dir + "/bin/" + shim) }
        try Files.write(dir + "/config.toml", """
            version = 2
            root = "\(dir)/root"
            state = "\(dir)/state"
            disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
            [grpc]
              address = "\(socket)"
            """, create: true)
        let log = open(dir + "/containerd.log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        defer { close(log) }
        var env = currentEnvironment().filter { !$0.hasPrefix("PATH=") && !$0.hasPrefix("KUASAR_ROOT=") }
        env += ["PATH=\(dir)/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "KUASAR_ROOT=\(kuasarRoot)", "KUASAR_CONFIG=\(config)"]
        let p = try Spawner.spawn(ProcessSpec(executable: "/usr/bin/containerd", arguments: ["containerd", "--config", dir + "/config.toml"],
                                              environment: env, fdMap: [(log, 1), (log, 2)]))
        containerdPID = p.pid
        containerdPidfd = p.pidfd.take()
        waitUntil(timeoutMS: 3000) { access(socket, F_OK) == 0 }
        let (code, out) = try shell("python3 \(repositoryRoot)/Tests/Peers/containerd/make_image.py \(dir)/busybox.tar \(Self.image) && \(ctr) images import \(dir)/busybox.tar")
        #expect(code == 0, "image import: \(out)")
    }

    /// `<controller>/<name>` of every cgroup under the daemon's `kuasar` parent.
    static func containerCgroups() -> Set<String> {
        guard let dirs = try? CgroupHost.detect().existing("kuasar").dirs else { return [] }
        return Set(dirs.flatMap { (c, base) in
            Files.list(base).filter { Files.isDirectory(base + "/" + $0) }.map { c + "/" + $0 }
        })
    }

    var ctr: String { "ctr -a \(socket)" }

    func ctr(_ args: String, timeoutS: Int = 60) throws -> (code: Int32, out: String) {
        try shell("\(ctr) \(args)", timeoutS: timeoutS)
    }

    /// `ctr run` with our runtime.
    func run(_ args: String) throws -> (code: Int32, out: String) {
        try ctr("run --runtime \(Self.runtime) \(args)")
    }

    /// The daemon's pid, from its admin service.
    func daemonPID() -> pid_t? {
        guard let c = try? OneShotClient(path: kuasarRoot + "/admin.sock") else { return nil }
        defer { c.close() }
        return try? c.call(AdminService.service, "Health", Kuasar_Admin_V1_HealthRequest(), as: Kuasar_Admin_V1_HealthResponse.self).pid
    }

    /// Stops containerd and the daemon and checks nothing is left: no mounts under the
    /// fixture, no sandbox state, no container cgroups, no container processes.
    func stop() throws {
        let daemon = daemonPID()
        if containerdPidfd >= 0 {
            try sendSignal(pidfd: containerdPidfd, SIGTERM)
            _ = try Spawner.wait(SpawnedProcess(pid: containerdPID, pidfd: OwnedFD(adopting: containerdPidfd)))
            containerdPidfd = -1
        }
        if let daemon {
            kill(daemon, SIGTERM)
            waitUntil { processGone(daemon) }
            #expect(processGone(daemon), "daemon \(daemon) did not stop on SIGTERM")
        }
        // runtimes/: external runtimes' roots (each pod's is gone with the pod); wasm-cache/:
        // compiled modules, kept on purpose, but never a half-written entry.
        let leftovers = Files.list(kuasarRoot).filter { !["daemon.log", "runtimes", "wasm-cache"].contains($0) }
        for v in Files.list(kuasarRoot + "/wasm-cache") {
            let temp = Files.list(kuasarRoot + "/wasm-cache/" + v).filter { $0.hasSuffix(".tmp") }
            #expect(temp.isEmpty, "half-written cache entries: \(temp)")
        }
        for r in Files.list(kuasarRoot + "/runtimes") where !r.hasSuffix(".calls") {
            #expect(Files.list(kuasarRoot + "/runtimes/" + r).isEmpty, "runtime state left in \(r): \(Files.list(kuasarRoot + "/runtimes/" + r))")
        }
        #expect(leftovers.isEmpty, "left in \(kuasarRoot): \(leftovers)")
        let left = Self.containerCgroups().subtracting(cgroupsBefore)
        #expect(left.isEmpty, "cgroups left: \(left.sorted())")
        Mounts.unmountAll(under: dir + "/root")
        #expect(mountsUnder(dir).isEmpty, "mounts left: \(mountsUnder(dir))")
        keepLog("ctd-\(name)-daemon", (try? Files.readString(kuasarRoot + "/daemon.log")) ?? "")
        keepLog("ctd-\(name)-containerd", (try? Files.readString(dir + "/containerd.log")) ?? "")
        Files.removeTree(dir)
    }
}
