import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
@testable import KuasarContainer
@testable import KuasarSandbox
#if canImport(Glibc)
import Glibc
#endif

/// The daemon as containerd 2.x's sandboxer: many sandboxes at once, hostile clients
/// meanwhile, a restart after `kill -9` that loses nothing, its configuration file and
/// systemd's notification protocol. The Python peer (Tests/Peers/python/fleet.py) speaks
/// gRPC with grpcio and ttrpc with a client written from the frame format.
extension AllTests {
@Suite struct SandboxerTests {
    /// A private daemon root with Python stubs generated from our .proto files.
    final class Fixture {
        let root: String
        let stubs: String
        let bundle: TestBundle
        var socket: String { root + "/kuasar.sock" }

        init(_ name: String) throws {
            root = "/tmp/kuasar-\(name)-\(getpid())"
            stubs = root + "-stubs"
            Files.removeTree(root)
            Files.removeTree(stubs)
            try makeDirectories(stubs, mode: 0o755)
            let gen = try shell("cd \(repositoryRoot)/Protos && protoc -I . -I /usr/include --python_out=\(stubs) $(find containerd/services/sandbox containerd/types containerd/task cri ttrpc google/rpc -name '*.proto' | sort)")
            #expect(gen.code == 0, "protoc: \(gen.out)")
            bundle = try TestBundle(name)
        }

        func fleet(_ args: String) throws -> (code: Int32, out: String) {
            try shell("\(systemPython) \(repositoryRoot)/Tests/Peers/python/fleet.py \(stubs) \(socket) \(args)", timeoutS: 120)
        }

        var daemonPID: pid_t? { Daemon.pid(root: root) }

        /// Nothing left: no sandbox state, mounts, cgroups or container processes.
        func expectClean(pids: [pid_t], sandboxes: [String], sourceLocation: SourceLocation = #_sourceLocation) {
            for pid in pids { #expect(processGone(pid), "container process \(pid) left", sourceLocation: sourceLocation) }
            // shutdown.log is the Controller's record of what it shut down: kept across restarts.
            let left = Files.list(root).filter { !["kuasar.sock", "admin.sock", "daemon.pid", "exits", "keepers", "shutdown.log"].contains($0) }
            #expect(left.isEmpty, "left in \(root): \(left)", sourceLocation: sourceLocation)
            #expect(mountsUnder(root).isEmpty, sourceLocation: sourceLocation)
            if let host = try? CgroupHost.detect() {
                for (c, base) in host.existing("kuasar").dirs {
                    let mine = Files.list(base).filter { sandboxes.contains($0) }
                    #expect(mine.isEmpty, "cgroups left in \(c): \(mine)", sourceLocation: sourceLocation)
                }
            }
        }

        /// A sandbox registered through admin.sock (as the shim protocol does): its Task API address.
        func register(_ id: String, namespace: String = "default") throws -> String {
            let admin = try OneShotClient(path: root + "/admin.sock")
            defer { admin.close() }
            var reg = Kuasar_Admin_V1_RegisterSandboxRequest()
            reg.sandboxID = id
            reg.namespace = namespace
            return try admin.call(AdminService.service, "RegisterSandbox", reg, as: Kuasar_Admin_V1_RegisterSandboxResponse.self).taskAddress
        }

        /// One Task API v2 call on its own connection.
        func task<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ address: String, _ method: String, _ r: Req, _: Resp.Type) throws -> Resp {
            let t = try OneShotClient(path: address)
            defer { t.close() }
            return try t.call("containerd.task.v2.Task", method, r, as: Resp.self, namespace: "default")
        }

        /// Controller Shutdown of `<prefix>0..<count>`, then nothing of them may be left.
        func shutDown(prefix: String, count: Int, pids: [pid_t], sourceLocation: SourceLocation = #_sourceLocation) throws {
            let down = try fleet("down \(prefix) \(count)")
            #expect(down.code == 0, "\(down.out)", sourceLocation: sourceLocation)
            _ = waitUntil { pids.allSatisfy(processGone) }
            expectClean(pids: pids, sandboxes: (0..<count).map { "\(prefix)\($0)" }, sourceLocation: sourceLocation)
        }

        func remove() {
            bundle.remove()
            Files.removeTree(root)
            Files.removeTree(stubs)
        }
    }

    static func pids(_ out: String) -> [Int: pid_t] {
        var out2: [Int: pid_t] = [:]
        for line in out.split(separator: "\n") where line.hasPrefix("ready ") {
            let parts = line.split(separator: " ")
            // "ready <prefix><i> <pid>"
            if parts.count == 3, let i = Int(parts[1].drop { !$0.isNumber }), let pid = pid_t(parts[2]) { out2[i] = pid }
        }
        return out2
    }

    @Test func fiftySandboxesInParallelWhileHostileClientsHammer() throws {
        let f = try Fixture("fleet")
        defer { f.remove() }
        let daemon = try AllTests.DaemonTests.start(["--root", f.root], socket: f.socket)
        #expect(AllTests.DaemonTests.waitForSocket(f.socket))
        let up = try f.fleet("up f 50 \(f.bundle.path) \(f.root)-bundles --hostile")
        defer { Files.removeTree(f.root + "-bundles") }
        #expect(up.code == 0, "\(up.out)")
        let pids = Self.pids(up.out)
        #expect(pids.count == 50, "\(up.out)")
        #expect(up.out.contains("hostile clients:"), "\(up.out)")
        // The daemon still answers everyone, and lists all 50.
        #expect((try? HealthProbe.query(socketPath: f.socket))?.contains("sandboxes=50") == true)
        try f.shutDown(prefix: "f", count: 50, pids: Array(pids.values))
        let (exit, log) = try AllTests.DaemonTests.stop(daemon)
        #expect(exit == .exited(0), "\(log)")
    }

    /// 10 sandboxes; the daemon is killed with SIGKILL; 3 containers exit while no daemon
    /// runs (exit 10, exit 11, SIGKILL); a new daemon reports those with their real status
    /// and keeps the 7 others running, exec-able, stoppable and waitable. Exec processes
    /// too: one running across the restart is killed and waited after it, one that ended
    /// meanwhile reports its status.
    @Test func restartAfterKill9LosesNothing() throws {
        let f = try Fixture("recover")
        defer { f.remove() }
        defer { Files.removeTree(f.root + "-bundles") }
        let first = try AllTests.DaemonTests.start(["--root", f.root, "--on-exit", "keep"], socket: f.socket)
        #expect(AllTests.DaemonTests.waitForSocket(f.socket))
        let up = try f.fleet("up r 10 \(f.bundle.path) \(f.root)-bundles")
        #expect(up.code == 0, "\(up.out)")
        let pids = Self.pids(up.out)
        #expect(pids.count == 10)
        guard pids.count == 10, let daemon = f.daemonPID else { _ = try AllTests.DaemonTests.stop(first); return }
        // The keeper started the daemon: they are two processes.
        #expect(daemon != first.process.pid)
        // Two exec processes: one outlives the restart, one ends while no daemon runs.
        let execPID = { (out: String) in out.split(separator: "\n").first { $0.hasPrefix("exec ") }.flatMap { pid_t($0.dropFirst(5)) } }
        let running = try f.fleet("exec r 3 long"), gone = try f.fleet("exec r 4 gone")
        #expect(running.code == 0 && gone.code == 0, "\(running.out) \(gone.out)")
        let goneExec = execPID(gone.out)

        kill(daemon, SIGKILL)
        #expect(waitUntil { processGone(daemon) })
        kill(pids[0]!, SIGUSR1)
        kill(pids[1]!, SIGUSR1)
        kill(pids[2]!, SIGKILL)
        if let goneExec { kill(goneExec, SIGUSR1) }
        #expect(waitUntil { processGone(pids[0]!) && processGone(pids[1]!) && processGone(pids[2]!) && goneExec.map(processGone) ?? false })
        // The keeper reaped them and kept their statuses.
        let recorded = { (pid: pid_t) in Files.list(f.root + "/exits").contains { $0.hasPrefix("\(pid)-") } }
        #expect(waitUntil { recorded(pids[0]!) && recorded(pids[1]!) && recorded(pids[2]!) }, "\(Files.list(f.root + "/exits"))")
        // Still running, though nobody serves their sandboxes.
        for i in 3..<10 { #expect(!processGone(pids[i]!)) }

        let second = try AllTests.DaemonTests.start(["--root", f.root, "--on-exit", "keep"], socket: f.socket)
        #expect(AllTests.DaemonTests.waitForSocket(f.socket))
        #expect((try? HealthProbe.query(socketPath: f.socket))?.contains("sandboxes=10") == true)
        let check = try f.fleet("check r 10 0:10,1:11,2:137 3:long:running,4:gone:21")
        #expect(check.code == 0, "\(check.out)")
        #expect(check.out.contains("exec r3 long recovered running, killed 21") && check.out.contains("exec r4 gone exited while down 21"), "\(check.out)")
        #expect(check.out.components(separatedBy: "exited r").count == 4, "\(check.out)")
        #expect(check.out.components(separatedBy: "exec 5 stop 137").count == 8, "\(check.out)")
        #expect(Files.list(f.root + "/exits").isEmpty, "exit records are taken once")

        try f.shutDown(prefix: "r", count: 10, pids: Array(pids.values))
        let (exit2, log2) = try AllTests.DaemonTests.stop(second)
        #expect(exit2 == .exited(0), "\(log2)")
        // The first keeper outlived its daemon until its last orphan was gone, and exits
        // with the daemon's status (128 + SIGKILL).
        let firstExit = try Spawner.wait(first.process)
        first.log.close()
        #expect(firstExit == .exited(137))
    }

    /// A container writing numbered lines into its stdout FIFO keeps writing while the
    /// daemon is killed and restarted: every line arrives, in order, none twice; the new
    /// daemon reports its exit. A sandbox state file that is garbage is skipped, named in
    /// the log, and does not stop the others from being recovered.
    @Test func outputFlowsAcrossADaemonRestart() throws {
        let f = try Fixture("output")
        defer { f.remove() }
        try f.bundle.setProcess(args: ["sh", "-c", "i=0; while [ $i -lt 100000 ]; do echo $i; i=$((i+1)); sleep 0.002; done"])
        let first = try AllTests.DaemonTests.start(["--root", f.root, "--on-exit", "keep"], socket: f.socket)
        #expect(AllTests.DaemonTests.waitForSocket(f.socket))
        let fifo = f.root + "-stdout"
        unlink(fifo)
        #expect(mkfifo(fifo, 0o600) == 0)
        defer { unlink(fifo) }
        let reader = open(fifo, O_RDWR | O_NONBLOCK | O_CLOEXEC)
        defer { close(reader) }

        let address = try f.register("out")
        var create = Containerd_Task_V2_CreateTaskRequest()
        create.id = "writer"
        create.bundle = f.bundle.path
        create.stdout = fifo
        _ = try f.task(address, "Create", create, Containerd_Task_V2_CreateTaskResponse.self)
        var start = Containerd_Task_V2_StartRequest()
        start.id = "writer"
        let pid = try f.task(address, "Start", start, Containerd_Task_V2_StartResponse.self).pid

        var text = ""
        func drain() {
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = read(reader, &buf, buf.count)
                if n <= 0 { break }
                text += String(decoding: buf[..<n], as: UTF8.self)
            }
        }
        func lines() -> [Int] { text.split(separator: "\n").compactMap { Int($0) } }
        _ = waitUntil { drain(); return lines().count > 50 }
        // Kill the daemon and keep it down for a while: the container keeps writing.
        let daemon = f.daemonPID ?? 0
        kill(daemon, SIGKILL)
        #expect(waitUntil { processGone(daemon) })
        let atKill = lines().count
        usleep(300_000)
        drain()
        #expect(lines().count > atKill + 20, "the container wrote nothing while the daemon was down")
        // A garbage state file next to the real one.
        try makeDirectories(f.root + "/garbage", mode: 0o700)
        try Files.write(f.root + "/garbage/state.json", "{not json", create: true)

        let second = try AllTests.DaemonTests.start(["--root", f.root, "--on-exit", "stop"], socket: f.socket)
        #expect(AllTests.DaemonTests.waitForSocket(f.socket))
        _ = waitUntil { drain(); return lines().count > atKill + 100 }
        var kill9 = Containerd_Task_V2_KillRequest()
        kill9.id = "writer"
        kill9.signal = 9
        _ = try f.task(address, "Kill", kill9, Google_Protobuf_Empty.self)
        var wait = Containerd_Task_V2_WaitRequest()
        wait.id = "writer"
        #expect(try f.task(address, "Wait", wait, Containerd_Task_V2_WaitResponse.self).exitStatus == 137)
        var del = Containerd_Task_V2_DeleteRequest()
        del.id = "writer"
        _ = try f.task(address, "Delete", del, Containerd_Task_V2_DeleteResponse.self)
        drain()
        let seen = lines()
        #expect(seen == Array(0..<seen.count), "lines out of order, lost or doubled around the restart: \(seen.count) lines")
        #expect(processGone(pid_t(pid)))

        Files.removeTree(f.root + "/garbage")
        let (exit2, log2) = try AllTests.DaemonTests.stop(second)
        #expect(exit2 == .exited(0))
        #expect(log2.contains("sandbox garbage: cannot recover"), "\(log2)")
        #expect(try Spawner.wait(first.process) == .exited(137))
        first.log.close()
        f.expectClean(pids: [pid_t(pid)], sandboxes: ["out"])
    }

    /// A terminal and a stdin pipe outlive the daemon too: the keeper holds the pty
    /// master and the pipe's write end, the next daemon takes them back. A tty container
    /// and a plain one, each echoing what it reads, answer input sent before and after a
    /// `kill -9` and restart; neither got a hang-up or an end of input.
    @Test func terminalAndStdinSurviveADaemonRestart() throws {
        let f = try Fixture("stdin")
        defer { f.remove() }
        try f.bundle.setProcess(args: ["sh", "-c", "while read l; do echo got $l; done; echo eof"])
        let first = try AllTests.DaemonTests.start(["--root", f.root, "--on-exit", "keep"], socket: f.socket)
        #expect(AllTests.DaemonTests.waitForSocket(f.socket))
        var fifos: [String: (path: String, fd: Int32)] = [:]
        for name in ["tty-in", "tty-out", "pipe-in", "pipe-out"] {
            let path = f.root + "-" + name
            unlink(path)
            #expect(mkfifo(path, 0o600) == 0)
            fifos[name] = (path, open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC))
        }
        defer { for (_, v) in fifos { close(v.fd); unlink(v.path) } }

        let address = try f.register("io")
        func task<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ m: String, _ r: Req, _: Resp.Type) throws -> Resp {
            try f.task(address, m, r, Resp.self)
        }
        var pids: [pid_t] = []
        for (id, terminal) in [("tty", true), ("pipe", false)] {
            var c = Containerd_Task_V2_CreateTaskRequest()
            c.id = id
            c.bundle = f.bundle.path
            c.terminal = terminal
            c.stdin = fifos[id + "-in"]!.path
            c.stdout = fifos[id + "-out"]!.path
            _ = try task("Create", c, Containerd_Task_V2_CreateTaskResponse.self)
            var s = Containerd_Task_V2_StartRequest()
            s.id = id
            pids.append(pid_t(try task("Start", s, Containerd_Task_V2_StartResponse.self).pid))
        }
        var seen: [String: String] = ["tty": "", "pipe": ""]
        func say(_ id: String, _ line: String) { _ = write(fifos[id + "-in"]!.fd, line + "\n", line.utf8.count + 1) }
        func heard(_ id: String, _ text: String) -> Bool {
            waitUntil {
                var buf = [UInt8](repeating: 0, count: 4096)
                let n = read(fifos[id + "-out"]!.fd, &buf, buf.count)
                if n > 0 { seen[id]! += String(decoding: buf[..<n], as: UTF8.self) }
                return seen[id]!.contains(text)
            }
        }
        for id in ["tty", "pipe"] {
            say(id, "before")
            #expect(heard(id, "got before"), "\(id): \(seen[id]!)")
        }

        let daemon = f.daemonPID ?? 0
        kill(daemon, SIGKILL)
        #expect(waitUntil { processGone(daemon) })
        usleep(200_000)
        // No hang-up, no end of input while no daemon runs.
        for pid in pids { #expect(!processGone(pid)) }
        #expect(Files.list(f.root + "/keepers").count == 1)

        let second = try AllTests.DaemonTests.start(["--root", f.root, "--on-exit", "stop"], socket: f.socket)
        #expect(AllTests.DaemonTests.waitForSocket(f.socket))
        for id in ["tty", "pipe"] {
            say(id, "after")
            #expect(heard(id, "got after"), "\(id) after the restart: \(seen[id]!)")
        }
        // CloseIO ends the plain container's input now that the new daemon holds the pipe
        // (the old keeper gave its copy up): it prints eof and exits 0.
        var closeIO = Containerd_Task_V2_CloseIORequest()
        closeIO.id = "pipe"
        closeIO.stdin = true
        _ = try task("CloseIO", closeIO, Google_Protobuf_Empty.self)
        var w = Containerd_Task_V2_WaitRequest()
        w.id = "pipe"
        #expect(try task("Wait", w, Containerd_Task_V2_WaitResponse.self).exitStatus == 0)
        #expect(heard("pipe", "eof"))
        var k = Containerd_Task_V2_KillRequest()
        k.id = "tty"
        k.signal = 9
        _ = try task("Kill", k, Google_Protobuf_Empty.self)
        w.id = "tty"
        #expect(try task("Wait", w, Containerd_Task_V2_WaitResponse.self).exitStatus == 137)
        for id in ["tty", "pipe"] {
            var d = Containerd_Task_V2_DeleteRequest()
            d.id = id
            _ = try task("Delete", d, Containerd_Task_V2_DeleteResponse.self)
        }
        let (exit2, log2) = try AllTests.DaemonTests.stop(second)
        #expect(exit2 == .exited(0), "\(log2)")
        #expect(try Spawner.wait(first.process) == .exited(137))
        first.log.close()
        f.expectClean(pids: pids, sandboxes: ["io"])
    }

    /// The hand-written state file encoder against JSONDecoder: awkward strings (quotes,
    /// backslashes, control characters, non-ASCII), empty and full optionals, random ids.
    @Test func stateFileRoundTrips() throws {
        var rng = SystemRandomNumberGenerator()
        func text() -> String {
            let pool: [String] = ["a", "\"", "\\", "\n", "\u{1}", "\u{1f}", "é", "漢", "🙂", "/", " ", "{", "]", ","]
            return (0..<Int.random(in: 0...12, using: &rng)).map { _ in pool.randomElement(using: &rng)! }.joined()
        }
        for i in 0..<200 {
            let initRecord = ProcessRecord(id: "", stdin: text(), stdout: text(), stderr: text(), terminal: i % 2 == 0,
                                           pid: Int32.random(in: 1...Int32.max, using: &rng),
                                           startTime: UInt64.random(in: 0...UInt64.max, using: &rng),
                                           exitCode: i % 3 == 0 ? 2 : nil, exitStatus: i % 3 == 0 ? 9 : nil,
                                           exitedAt: i % 3 == 0 ? WallTime(seconds: Int64(i), nanos: 5) : nil)
            let c = ContainerRecord(id: "c\(i)", bundle: text(), rootfs: text(), ownedMounts: [text(), text()], state: "running",
                                    process: initRecord,
                                    execs: i % 2 == 0 ? nil : [ProcessRecord(id: text(), stdin: text(), stdout: text(), stderr: "", terminal: true,
                                                                             pid: 7, startTime: 9, exitCode: i % 3 == 0 ? 1 : nil,
                                                                             exitStatus: i % 3 == 0 ? 3 : nil)])
            let r = SandboxRecord(id: "s\(i)", namespace: text(), eventsAddress: text(), state: "ready",
                                  createdAt: WallTime(seconds: 1_800_000_000, nanos: Int32(i)), exitedAt: i % 2 == 0 ? nil : WallTime(seconds: 1, nanos: 2),
                                  labels: [text(): text(), "k": text()],
                                  extensions: i % 4 == 0 ? nil : ["x": Sandbox.Extension(typeURL: text(), value: [0, 255, UInt8(i % 256)])],
                                  pinned: ["network": text()], cgroupRoot: text(), containers: i % 5 == 0 ? [] : [c, c])
            let back = try JSONDecoder().decode(SandboxRecord.self, from: Data(r.json()))
            #expect(back == r, "round trip \(i): \(String(decoding: r.json(), as: UTF8.self))")
        }
    }

    @Test func configurationFileIsCheckedAtStart() throws {
        #expect(try KuasarConfig.parse(KuasarConfig.defaultText) == KuasarConfig(), "the printed defaults are the defaults")
        let c = try KuasarConfig.parse("[daemon]\non_exit = \"stop\"\nreactor = \"epoll\"\n[sandboxers]\nmine = \"namespace\"\n")
        #expect(c.onExit == .stop && c.reactor == .epoll && c.sandboxers == ["mine": "namespace"])
        let oci = try KuasarConfig.parse("[sandboxers]\nkuasar-crun = \"oci:crun\"\n[runtimes.crun]\npath = \"/usr/bin/crun\"\nextra_args = [\"--debug\"]\n")
        #expect(oci.sandboxers == ["kuasar-crun": "oci:crun"] && oci.runtimes["crun"] == .init(path: "/usr/bin/crun", extraArgs: ["--debug"]))
        // A kind this build lacks is a valid config: its Controller.Create says why it cannot serve.
        #expect(try KuasarConfig.parse("[sandboxers]\nkuasar-vm = \"vm\"\n").sandboxers == ["kuasar-vm": "vm"])
        let bad: [(String, String)] = [
            ("[daemon]\nsockets = \"/x\"\n", "unknown key [daemon] sockets"),
            ("[daemon]\non_exit = \"later\"\n", "[daemon] on_exit: \"later\" is not one of keep, stop"),
            ("[daemon]\nsocket = 3\n", "[daemon] socket must be a string"),
            ("[daemon]\nsocket = \"relative.sock\"\n", "[daemon] socket must be an absolute path"),
            ("[sandboxers]\nvm = \"qemu\"\n", "[sandboxers] vm: \"qemu\" is not one of namespace, vm, wasm, oci:<runtime>"),
            ("[sandboxers]\nk = \"oci:crun\"\n", "[sandboxers] k = \"oci:crun\": no [runtimes.crun] table"),
            ("[runtimes.crun]\npath = \"crun\"\n", "[runtimes.crun] path must be an absolute path"),
            ("[runtimes.crun]\nroot = \"/r\"\n", "[runtimes.crun] needs path"),
            ("[runtimes.crun]\npath = \"/c\"\nargs = []\n", "unknown key [runtimes.crun] args"),
            ("[runtimes.crun]\npath = \"/c\"\nextra_args = [1]\n", "extra_args must be an array of strings"),
            ("[namespace]\ncgroup_parent = \"../escape\"\n", "cgroup_parent must be a relative path"),
            ("[mystery]\n", "unknown section [mystery]"),
            ("daemon = = 1", "line 1"),
        ]
        for (text, message) in bad {
            do {
                _ = try KuasarConfig.parse(text, origin: "t.toml")
                Issue.record("accepted: \(text)")
            } catch {
                #expect(error.description.contains(message), "\(text) → \(error.description)")
            }
        }
        // The daemon refuses to start on a bad file, naming the key; the CLI prints the defaults.
        let dir = "/tmp/kuasar-config-\(getpid())"
        try makeDirectories(dir, mode: 0o700)
        defer { Files.removeTree(dir) }
        try Files.write(dir + "/bad.toml", "[daemon]\nlog_levels = \"debug\"\n", create: true)
        let r = try shell("\(AllTests.DaemonTests.binary) daemon --config \(dir)/bad.toml --socket \(dir)/k.sock")
        #expect(r.code == 1 && r.out.contains("unknown key [daemon] log_levels"), "\(r.out)")
        #expect(!Files.exists(dir + "/k.sock"))
        let d = try shell("\(AllTests.DaemonTests.binary) config default")
        #expect(d.code == 0 && d.out.contains("on_exit = \"keep\"") && d.out.contains("[sandboxers]"), "\(d.out)")
        // A sandboxer name from the file is what the Controller accepts.
        try Files.write(dir + "/mine.toml", "[sandboxers]\nedge = \"namespace\"\n", create: true)
        let info = try shell("\(AllTests.DaemonTests.binary) info --config \(dir)/mine.toml")
        #expect(info.out.contains("sandboxers: edge") && info.out.contains("wasm: available; sandboxers: none configured") && info.out.contains("    accelerator: "), "\(info.out)")
    }

    /// Type=notify: READY with MAINPID (the daemon, not the keeper systemd started), then
    /// WATCHDOG pings from the loop at half of WATCHDOG_USEC.
    @Test func systemdNotifyReadyAndWatchdog() throws {
        let dir = "/tmp/kuasar-notify-\(getpid())"
        Files.removeTree(dir)
        try makeDirectories(dir, mode: 0o700)
        defer { Files.removeTree(dir) }
        let notify = dir + "/notify.sock"
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in for (i, b) in notify.utf8.enumerated() { dst[i] = b } }
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        #expect(rc == 0)
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))

        let socketPath = dir + "/kuasar.sock"
        let pipe = try makePipe()
        var spec = ProcessSpec(executable: AllTests.DaemonTests.binary,
                               arguments: ["kuasar", "daemon", "--socket", socketPath, "--on-exit", "stop", "--config", TestConfig.defaults])
        spec.environment = currentEnvironment() + ["NOTIFY_SOCKET=\(notify)", "WATCHDOG_USEC=100000"]
        spec.fdMap = [(from: pipe.second.rawValue, to: 2)]
        let p = try Spawner.spawn(spec)
        pipe.second.close()
        var messages: [String] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while messages.filter({ $0 == "WATCHDOG=1" }).count < 3 {
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            messages.append(String(decoding: buf[..<n], as: UTF8.self))
        }
        let daemon = Daemon.pid(root: dir)
        let ready = messages.first ?? ""
        #expect(ready.contains("READY=1"), "\(messages)")
        #expect(daemon != nil && daemon != p.pid && ready.contains("MAINPID=\(daemon ?? -1)"), "\(ready)")
        #expect(messages.filter { $0 == "WATCHDOG=1" }.count >= 3, "\(messages)")
        try sendSignal(pidfd: p.pidfd.rawValue, SIGTERM)
        #expect(try Spawner.wait(p) == .exited(0))
        pipe.first.close()
    }
}
}
