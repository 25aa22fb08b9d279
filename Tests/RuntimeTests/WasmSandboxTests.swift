import Foundation
import SwiftProtobuf
import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The wasm kind through containerd's Controller (the project's gRPC client) and the Task
/// API, with containerd 2.3's CRI container spec (the fixture) around real modules, on both
/// engines: a pod of the `kuasar-wasm` sandboxer whose containers' entrypoints are modules.
extension AllTests {
@Suite(.serialized) struct WasmSandboxTests {
    typealias Node = AllTests.PodTests.Node

    /// The Task API of one pod, a connection per call (Wait blocks only its own).
    struct Tasks: AgentPeer {
        let path: String
        func call<Resp: SwiftProtobuf.Message>(_ service: String, _ m: String, _ r: some SwiftProtobuf.Message, _: Resp.Type) throws -> Resp {
            let t = try OneShotClient(path: path)
            defer { t.close() }
            return try t.call(service, m, r, as: Resp.self, namespace: "k8s.io")
        }

        func state(_ id: String) throws -> Containerd_Task_V3_StateResponse {
            var s = Containerd_Task_V3_StateRequest()
            s.id = id
            return try task("State", s, Containerd_Task_V3_StateResponse.self)
        }
    }

    static func config(engine: String, annotation: Bool = true) -> String {
        """
        [sandboxers]
        kuasar = "namespace"
        kuasar-wasm = "wasm"

        [wasm]
        engine = "\(engine)"
        engine_annotation = \(annotation)
        wasmtime_library = "\(AllTests.WasmRunnerTests.wasmtimeLibrary)"
        """
    }

    /// A bundle of containerd's CRI spec whose rootfs (busybox) also holds the test modules
    /// at its top, `args` its process.
    static func bundle(_ node: Node, _ name: String, pid: pid_t, args: [String], annotations: [String: String] = [:],
                       edit: (inout [String: Any]) -> Void = { _ in }) throws -> String {
        let dir = try node.bundle(name, pid: pid, args: args) { json in
            var a = json["annotations"] as? [String: Any] ?? [:]
            for (k, v) in annotations { a[k] = v }
            json["annotations"] = a
            edit(&json)
        }
        for m in Files.list(AllTests.WasmRunnerTests.modules) where m.hasSuffix(".wasm") {
            try Files.writeAtomically(dir + "/rootfs/" + m, try Files.read(AllTests.WasmRunnerTests.modules + "/" + m), mode: 0o644)
        }
        return dir
    }

    /// Each of the pod's processes (the holder's children) is gone or a zombie being reaped.
    static func noChildren(_ holder: pid_t) -> Bool { AllTests.PodTests.children(of: holder).isEmpty }

    @Test(arguments: ["wasmkit", "wasmtime"]) func aWasmPodRunsModulesAsContainers(engine: String) throws {
        try Node.with("wasm-\(engine)", config: Self.config(engine: engine)) { node in
            let (pod, address) = try node.runPod("wpod", AllTests.PodTests.podConfig(hostname: "wasm-pod"), sandboxer: "kuasar-wasm")
            let tasks = Tasks(path: address)

            // hello: its line, then proc_exit(7) as the exit status.
            let hello = try Self.bundle(node, "hello", pid: pod, args: ["/hello.wasm"])
            let helloPid = try node.startContainer(address, "hello", bundle: hello)
            #expect(helloPid > 0)
            #expect(try tasks.wait("hello") == 7)
            #expect(node.output(hello) == "hello from wasm\n", "hello: \(node.output(hello))")
            // It ran in the pod's namespaces (not the daemon's) while it lived: its state says so.
            #expect(try tasks.state("hello").status == .stopped)
            try tasks.delete("hello")

            // args and environment, from the spec; a bare name found at the rootfs's top (runwasi's convention).
            let argsenv = try Self.bundle(node, "argsenv", pid: pod, args: ["argsenv.wasm", "one", "two words"])
            _ = try node.startContainer(address, "argsenv", bundle: argsenv)
            #expect(try tasks.wait("argsenv") == 0)
            let fields = Array(((try? Files.read(argsenv + "/out")) ?? []).split(separator: 0).map { String(decoding: $0, as: UTF8.self) })
            #expect(Array(fields.prefix(3)) == ["argsenv.wasm", "one", "two words"], "argv: \(fields)")
            #expect(fields.contains("HOSTNAME=wasm-pod") || fields.contains { $0.hasPrefix("PATH=") }, "the spec's environment: \(fields)")

            // The rootfs is the module's "/": it writes a file the host then finds there.
            try Files.write(hello + "/rootfs/in.txt", "from the image\n", create: true)
            let files = try Self.bundle(node, "files", pid: pod, args: ["/files.wasm"])
            try Files.write(files + "/rootfs/in.txt", "from the image\n", create: true)
            _ = try node.startContainer(address, "files", bundle: files)
            #expect(try tasks.wait("files") == 0, "files: \(node.output(files))")
            #expect(node.output(files) == "from the image\n")
            #expect((try? Files.readString(files + "/rootfs/out.txt")) == "written by wasm\n")
            try tasks.delete("files")

            // A module that never ends is stopped by Kill, and Wait tells SIGKILL.
            let spin = try Self.bundle(node, "spin", pid: pod, args: ["/spin.wasm"])
            let spinPid = try node.startContainer(address, "spin", bundle: spin)
            usleep(200_000)
            #expect(try tasks.state("spin").status == .running)
            // Pause and Resume through the cgroup freezer, Pids, as for any container.
            var pause = Containerd_Task_V3_PauseRequest()
            pause.id = "spin"
            _ = try tasks.task("Pause", pause, Google_Protobuf_Empty.self)
            #expect(try tasks.state("spin").status == .paused)
            var resume = Containerd_Task_V3_ResumeRequest()
            resume.id = "spin"
            _ = try tasks.task("Resume", resume, Google_Protobuf_Empty.self)
            #expect(try tasks.state("spin").status == .running)
            var pids = Containerd_Task_V3_PidsRequest()
            pids.id = "spin"
            #expect(try tasks.task("Pids", pids, Containerd_Task_V3_PidsResponse.self).processes.map(\.pid) == [UInt32(spinPid)])
            // The process is the runner executing the module, not a binary of the rootfs.
            #expect((try? Files.readString("/proc/\(spinPid)/cmdline"))?.contains("spin.wasm") == true)
            // Exec of another module in the running container: the same rootfs, its own exit.
            try tasks.exec("spin", "e1", ["/hello.wasm"], out: spin + "/exec-out")
            #expect(try tasks.wait("spin", exec: "e1") == 7)
            #expect((try? Files.readString(spin + "/exec-out")) == "hello from wasm\n")
            try tasks.delete("spin", exec: "e1")
            // A Linux binary of the rootfs still runs as one, in the same pod.
            try tasks.exec("spin", "e2", ["sh", "-c", "echo linux"], out: spin + "/exec2-out")
            #expect(try tasks.wait("spin", exec: "e2") == 0)
            #expect((try? Files.readString(spin + "/exec2-out")) == "linux\n")
            try tasks.kill("spin")
            #expect(try tasks.wait("spin") == 137)
            #expect(processGone(spinPid))
            try tasks.delete("spin")

            // A trap: exit 134, the trap named on the container's stderr.
            let trap = try Self.bundle(node, "trap", pid: pod, args: ["/trap.wasm"])
            _ = try node.startContainer(address, "trap", bundle: trap)
            #expect(try tasks.wait("trap") == 134)
            #expect(node.output(trap).contains("wasm trap") && node.output(trap).contains("unreachable"), "trap: \(node.output(trap))")
            // ...and in the daemon's log, which the container's stderr is not.
            var log = ""
            #expect(waitUntil {
                if let fd = node.daemon?.log.rawValue, let more = (try? drain(fd)) ?? nil { log += String(decoding: more, as: UTF8.self) }
                return log.contains("container trap: exit 134, the module trapped") && log.contains("unreachable")
            }, "the daemon's log: \(log.suffix(2000))")
            try tasks.delete("trap")

            // The memory limit of the spec caps linear memory: grow is refused (exit 1), no OOM kill.
            let grow = try node.bundle("grow", pid: pod, args: ["/grow.wasm"]) { json in
                var linux = json["linux"] as! [String: Any]
                var res = linux["resources"] as? [String: Any] ?? [:]
                res["memory"] = ["limit": 64 << 20]
                linux["resources"] = res
                json["linux"] = linux
            }
            try Files.writeAtomically(grow + "/rootfs/grow.wasm", try Files.read(AllTests.WasmRunnerTests.module("grow")))
            _ = try node.startContainer(address, "grow", bundle: grow)
            #expect(try tasks.wait("grow") == 0, "6.25 MiB under a 64 MiB limit is granted: \(node.output(grow))")
            try tasks.delete("grow")

            // Bad modules fail Create, each with its problem named; the pod keeps serving.
            let bad = try Self.bundle(node, "bad", pid: pod, args: ["/missing-import.wasm"])
            try Files.write(bad + "/rootfs/text.wasm", "(module)\n", create: true)
            let good = try Files.read(AllTests.WasmRunnerTests.module("hello"))
            try Files.writeAtomically(bad + "/rootfs/truncated.wasm", Array(good.prefix(good.count / 2)))
            #expect(try shell("head -c 104857600 /dev/urandom > \(bad)/rootfs/garbage.wasm").code == 0)
            for (args, code, words) in [
                (["/missing-import.wasm"], RPCCode.invalidArgument, ["env", "kuasar_nope"]),
                (["/text.wasm"], .invalidArgument, ["not a WebAssembly module", "text.wasm"]),
                (["/truncated.wasm"], .invalidArgument, ["truncated", "truncated.wasm"]),
                (["/garbage.wasm"], .invalidArgument, ["not a WebAssembly module", "garbage.wasm"]),
                (["/absent.wasm"], .notFound, ["absent.wasm", "not found"]),
            ] as [([String], RPCCode, [String])] {
                try Self.setArgs(bad, args)
                let t0 = MonotonicClock.nanoseconds()
                do {
                    _ = try node.startContainer(address, "bad", bundle: bad)
                    Issue.record("\(args[0]) was created")
                } catch let e as RPCError {
                    #expect(e.code == code && words.allSatisfy { e.message.contains($0) }, "\(args[0]): \(e)")
                }
                #expect(MonotonicClock.nanoseconds() - t0 < 3_000_000_000, "\(args[0]) was not refused at once")
            }
            // The same pod still runs a module afterwards.
            try tasks.delete("argsenv")
            _ = try node.startContainer(address, "hello2", bundle: hello)
            #expect(try tasks.wait("hello2") == 7)
            try tasks.delete("hello2")

            try node.shutdown("wpod")
            #expect(waitUntil { processGone(pod) }, "the pod holder is left")
        }
    }

    static func setArgs(_ bundle: String, _ args: [String]) throws {
        var json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: bundle + "/config.json"))) as! [String: Any]
        var p = json["process"] as! [String: Any]
        p["args"] = args
        json["process"] = p
        try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: bundle + "/config.json"))
    }

    /// Create + Start of `id` with stdin from a FIFO as containerd makes it: a writer puts
    /// `data` in and closes, then CloseIO (as `ctr run` does once its writer is done), since
    /// the daemon holds the FIFO open read-write (a writer may come and go). stdout and
    /// stderr go to the files `out` and `err` in the bundle.
    static func startFeedingStdin(_ address: String, _ tasks: Tasks, _ id: String, bundle: String, _ data: [UInt8]) throws {
        let fifo = bundle + "/in"
        #expect(mkfifo(fifo, 0o600) == 0)
        let t = try OneShotClient(path: address)
        defer { t.close() }
        var create = Containerd_Task_V3_CreateTaskRequest()
        create.id = id
        create.bundle = bundle
        create.stdin = fifo
        create.stdout = "file://" + bundle + "/out"
        create.stderr = "file://" + bundle + "/err"
        // The daemon opens the FIFO's read end at Create; our write end opens once it has.
        let writer = Thread {
            let fd = open(fifo, O_WRONLY | O_CLOEXEC)
            guard fd >= 0 else { return }
            data.withUnsafeBytes { b in
                var off = 0
                while off < b.count {
                    let n = write(fd, b.baseAddress! + off, b.count - off)
                    if n <= 0 { break }
                    off += n
                }
            }
            close(fd)
        }
        writer.start()
        _ = try t.call("containerd.task.v3.Task", "Create", create, as: Containerd_Task_V3_CreateTaskResponse.self, namespace: "k8s.io")
        var start = Containerd_Task_V3_StartRequest()
        start.id = id
        _ = try t.call("containerd.task.v3.Task", "Start", start, as: Containerd_Task_V3_StartResponse.self, namespace: "k8s.io")
        #expect(waitUntil(timeoutMS: 10_000) { writer.isFinished }, "the writer did not finish")
        var closeIO = Containerd_Task_V3_CloseIORequest()
        closeIO.id = id
        closeIO.stdin = true
        _ = try tasks.task("CloseIO", closeIO, Google_Protobuf_Empty.self)
    }

    /// Create of `id` fails with `code` and a message naming `word`; `accepted` says what
    /// went wrong if it starts.
    static func expectRefused(_ node: Node, _ address: String, _ id: String, bundle: String, _ code: RPCCode, naming word: String, _ accepted: String) {
        do {
            _ = try node.startContainer(address, id, bundle: bundle)
            Issue.record("\(accepted)")
        } catch let e as RPCError {
            #expect(e.code == code && e.message.contains(word), "\(e)")
        } catch {
            Issue.record("\(id): \(error)")
        }
    }

    /// The annotation chooses the other engine where the config allows it, and is refused
    /// with the reason where it does not; a module reads its stdin from containerd's FIFO.
    @Test func theEngineAnnotationAndStdin() throws {
        try Node.with("wasm-ann", config: Self.config(engine: "wasmkit")) { node in
            let (pod, address) = try node.runPod("apod", AllTests.PodTests.podConfig(hostname: "apod"), sandboxer: "kuasar-wasm")
            let tasks = Tasks(path: address)
            let cache = node.root + "/wasm-cache/wasmtime-" + AllTests.WasmRunnerTests.wasmtimeVersion
            let wt = try Self.bundle(node, "wt", pid: pod, args: ["/hello.wasm"], annotations: [WasmPrograms.engineAnnotation: "wasmtime"])
            _ = try node.startContainer(address, "wt", bundle: wt)
            #expect(try tasks.wait("wt") == 7)
            #expect(node.output(wt) == "hello from wasm\n")
            // Wasmtime ran it, and the daemon's helper compiled it into the cache (WasmKit keeps none).
            #expect(waitUntil(timeoutMS: 20_000) { Files.list(cache).contains { $0.hasSuffix(".sum") } }, "no compiled module in \(cache): \(Files.list(node.root))")
            #expect(Files.list(cache).allSatisfy { !$0.hasSuffix(".tmp") })
            try tasks.delete("wt")

            let v8 = try Self.bundle(node, "v8", pid: pod, args: ["/hello.wasm"], annotations: [WasmPrograms.engineAnnotation: "v8"])
            Self.expectRefused(node, address, "v8", bundle: v8, .invalidArgument, naming: "v8", "engine v8 accepted")

            // stdin: a FIFO as containerd makes it, written and closed; every byte comes back.
            let cat = try Self.bundle(node, "cat", pid: pod, args: ["/cat.wasm"])
            try Self.startFeedingStdin(address, tasks, "cat", bundle: cat,
                                       Array(repeating: Array("wasm stdin\n".utf8), count: 20_000).flatMap { $0 })
            #expect(try tasks.wait("cat") == 0, "cat: \((try? Files.readString(cat + "/err")) ?? "")")
            let out = (try? Files.read(cat + "/out", limit: 1 << 24)) ?? []
            #expect(out.count == 220_000 && out.prefix(11) == Array("wasm stdin\n".utf8)[...], "stdin came back as \(out.count) bytes")
            try tasks.delete("cat")
            try node.shutdown("apod")
        }

        // A daemon that allows one engine only says so.
        try Node.with("wasm-noann", config: Self.config(engine: "wasmkit", annotation: false)) { node in
            let (pod, address) = try node.runPod("npod", AllTests.PodTests.podConfig(hostname: "npod"), sandboxer: "kuasar-wasm")
            let wt = try Self.bundle(node, "wt", pid: pod, args: ["/hello.wasm"], annotations: [WasmPrograms.engineAnnotation: "wasmtime"])
            Self.expectRefused(node, address, "wt", bundle: wt, .failedPrecondition, naming: "engine_annotation", "the annotation was obeyed against the config")
            try node.shutdown("npod")
        }
    }

    /// An engine library that is absent fails the containers that need it with the reason;
    /// the daemon serves the rest (WasmKit) as before.
    @Test func anAbsentWasmtimeLibraryIsAClearError() throws {
        let config = Self.config(engine: "wasmkit").replacingOccurrences(of: AllTests.WasmRunnerTests.wasmtimeLibrary, with: "/nonexistent/_libwasmtime.so")
        try Node.with("wasm-nolib", config: config) { node in
            let (pod, address) = try node.runPod("lpod", AllTests.PodTests.podConfig(hostname: "lpod"), sandboxer: "kuasar-wasm")
            let tasks = Tasks(path: address)
            let wt = try Self.bundle(node, "wt", pid: pod, args: ["/hello.wasm"], annotations: [WasmPrograms.engineAnnotation: "wasmtime"])
            Self.expectRefused(node, address, "wt", bundle: wt, .failedPrecondition, naming: "/nonexistent/_libwasmtime.so", "a container ran on an absent engine")
            let wk = try Self.bundle(node, "wk", pid: pod, args: ["/hello.wasm"])
            _ = try node.startContainer(address, "wk", bundle: wk)
            #expect(try tasks.wait("wk") == 7)
            try tasks.delete("wk")
            try node.shutdown("lpod")
        }
    }

    /// Debian's containerd 1.6 through the shim path: runtime `io.containerd.kuasar-wasm.v2`
    /// is the shim binary `containerd-shim-kuasar-wasm-v2`, whose sandboxer `kuasar-wasm` is
    /// the wasm kind; the image is an OCI tarball of modules only, imported with ctr.
    @Test func containerdRunsAWasmImageThroughTheShimPath() throws {
        let scratch = try scratchDirectory("wasm-ctd")
        defer { Files.removeTree(scratch) }
        try Files.write(scratch + "/config.toml", TestConfig.withoutTemplates("[daemon]\non_exit = \"stop\"\n" + Self.config(engine: "wasmtime")), create: true)
        let ctd = try ContainerdFixture("wasm", config: scratch + "/config.toml", shims: ["containerd-shim-kuasar-wasm-v2"])
        defer { try? ctd.stop() }
        let image = "docker.io/kuasar/wasm-tests:latest"
        var r = try shell("python3 \(repositoryRoot)/Tests/Peers/containerd/make_image.py \(scratch)/wasm.tar \(image) --wasm \(AllTests.WasmRunnerTests.modules) && \(ctd.ctr) images import \(scratch)/wasm.tar")
        #expect(r.code == 0, "import: \(r.out)")
        let runtime = "io.containerd.kuasar-wasm.v2"
        // The image's entrypoint: its output and proc_exit's status.
        r = try ctd.ctr("run --rm --runtime \(runtime) \(image) w1")
        #expect(r.code == 7 && r.out.contains("hello from wasm"), "\(r.out)")
        // Another module of the image with arguments, on WasmKit by the annotation.
        r = try ctd.ctr("run --rm --runtime \(runtime) --annotation \(WasmPrograms.engineAnnotation)=wasmkit \(image) w2 /argsenv.wasm first second")
        #expect(r.code == 0 && r.out.contains("first\0second"), "\(r.out)")
        // A module that never ends, killed by ctr.
        r = try ctd.ctr("run -d --runtime \(runtime) \(image) w3 /spin.wasm")
        #expect(r.code == 0, "\(r.out)")
        #expect(waitUntil { ((try? ctd.ctr("task ls"))?.out ?? "").contains("RUNNING") }, "w3 is not running")
        r = try ctd.ctr("task kill -s SIGKILL w3")
        #expect(r.code == 0, "\(r.out)")
        #expect(waitUntil { ((try? ctd.ctr("task ls"))?.out ?? "").contains("STOPPED") }, "w3 did not stop")
        r = try ctd.ctr("task delete w3")
        #expect(r.code == 0, "\(r.out)")
        _ = try ctd.ctr("container delete w3")
        // A module with an import no host has: ctr's run fails, naming it.
        r = try ctd.ctr("run --rm --runtime \(runtime) \(image) w4 /missing-import.wasm")
        #expect(r.code != 0 && r.out.contains("kuasar_nope"), "\(r.out)")
        _ = try? ctd.ctr("container delete w4")
    }

    /// `kuasar run --wasm` for people: the module alone as the container, its arguments
    /// after --, the exit status its own; detached, `kill` (TERM) stops it although it is
    /// its namespace's PID 1 and a module cannot handle a signal.
    @Test func kuasarRunWasmRunsAModule() throws {
        let root = AllTests.CompatibilityTests.DaemonRoot("wasm-run")
        defer { root.stop() }
        var r = try root.run("run --id w1 --wasm \(AllTests.WasmRunnerTests.module("hello"))")
        #expect(r.code == 7 && r.out == "hello from wasm\n", "\(r)")
        r = try root.run("run --id w2 --wasm \(AllTests.WasmRunnerTests.module("argsenv")) -- x 'y z' | tr '\\0' '\\n'")
        #expect(r.code == 0 && r.out.hasPrefix("/argsenv.wasm\nx\ny z\n"), "\(r)")
        r = try root.run("run --id w3 --wasm \(AllTests.WasmRunnerTests.module("missing-import"))")
        #expect(r.code != 0 && r.out.contains("kuasar_nope"), "\(r)")
        r = try root.run("run --id w4 --wasm /nonexistent/m.wasm")
        #expect(r.code != 0 && r.out.contains("/nonexistent/m.wasm"), "\(r)")
        r = try root.run("run -d --id w5 --wasm \(AllTests.WasmRunnerTests.module("spin"))")
        #expect(r.code == 0 && r.out.contains("w5"), "\(r)")
        #expect(try root.run("ps").out.contains("running"))
        r = try root.run("kill w5")
        #expect(r.code == 0, "\(r)")
        #expect(waitUntil { ((try? root.run("ps"))?.out ?? "").contains("stopped") }, "TERM did not stop the module: \((try? root.run("ps"))?.out ?? "")")
        r = try root.run("rm w5")
        #expect(r.code == 0, "\(r)")
    }

    /// Compiled code is native code every container of a module runs, so no container can
    /// write it: the first container compiles for itself, the daemon's helper fills the
    /// cache, and the next container gets the code as a sealed memfd and nothing of the
    /// cache (an image's /etc/ld.so.preload, which the loader honours, finds nothing to poison).
    @Test func compiledCodeReachesContainersSealedAndTheCacheNever() throws {
        try Node.with("wasm-seal", config: Self.config(engine: "wasmtime")) { node in
            let (pod, address) = try node.runPod("spod", AllTests.PodTests.podConfig(hostname: "spod"), sandboxer: "kuasar-wasm")
            let tasks = Tasks(path: address)
            let cache = node.root + "/wasm-cache/wasmtime-" + AllTests.WasmRunnerTests.wasmtimeVersion
            let first = try Self.bundle(node, "first", pid: pod, args: ["/spin.wasm"])
            let firstPid = try node.startContainer(address, "first", bundle: first)
            #expect(waitUntil(timeoutMS: 20_000) { Files.list(cache).contains { $0.hasSuffix(".sum") } }, "the helper filled no cache: \(Files.list(cache))")
            #expect(Self.descriptors(of: firstPid).allSatisfy { !$0.contains("kuasar-wasm-code") }, "a miss hands out no code")
            try tasks.kill("first")
            #expect(try tasks.wait("first") == 137)
            try tasks.delete("first")

            let second = try Self.bundle(node, "second", pid: pod, args: ["/spin.wasm"])
            let pid = try node.startContainer(address, "second", bundle: second)
            let fds = Self.descriptors(of: pid)
            #expect(fds.allSatisfy { !$0.contains("wasm-cache") }, "the runner holds the cache: \(fds)")
            let code = fds.filter { $0.contains("memfd:kuasar-wasm-code") }
            #expect(code.count == 1, "\(fds)")
            for entry in code {
                let n = entry.prefix { $0 != " " }
                // Even root, reopening it for writing through /proc, cannot change a byte.
                let fd = open("/proc/\(pid)/fd/\(n)", O_RDWR | O_CLOEXEC)
                #expect(fd >= 0, "open the runner's code memfd: \(Errno.current)")
                guard fd >= 0 else { continue }
                defer { close(fd) }
                let sealWrite: Int32 = 0x0008  // F_SEAL_WRITE
                #expect(fcntl(fd, 1034 /* F_GET_SEALS */) & sealWrite != 0)
                var byte: UInt8 = 0
                #expect(pwrite(fd, &byte, 1, 0) < 0 && errno == EPERM, "a write to sealed code succeeded")
            }
            try tasks.kill("second")
            #expect(try tasks.wait("second") == 137)
            try tasks.delete("second")
            try node.shutdown("spod")
        }
    }

    /// A module container's Stats come from its cgroup (the runner's memory, one pid); it
    /// outlives a daemon killed with SIGKILL, and its exit — one while no daemon ran, and one
    /// after — is reported by the next daemon, as for any container.
    @Test func statsAndADaemonKilledWithModulesRunning() throws {
        try Node.with("wasm-rec", config: Self.config(engine: "wasmkit"), keep: true) { node in
            let (pod, address) = try node.runPod("rpod", AllTests.PodTests.podConfig(hostname: "rpod"), sandboxer: "kuasar-wasm")
            let tasks = Tasks(path: address)
            let a = try Self.bundle(node, "a", pid: pod, args: ["/spin.wasm"])
            let aPid = try node.startContainer(address, "a", bundle: a)
            let b = try Self.bundle(node, "b", pid: pod, args: ["/spin.wasm"], annotations: [WasmPrograms.engineAnnotation: "wasmtime"])
            let bPid = try node.startContainer(address, "b", bundle: b)
            var stats = Containerd_Task_V3_StatsRequest()
            stats.id = "a"
            let metrics = try tasks.task("Stats", stats, Containerd_Task_V3_StatsResponse.self).stats
            if metrics.typeURL.hasSuffix("v1.Metrics") {
                let m = try Io_Containerd_Cgroups_V1_Metrics(serializedBytes: metrics.value)
                #expect(m.pids.current == 1 && m.memory.usage.usage > 1 << 20, "\(m.pids) \(m.memory.usage)")
            } else {
                let m = try Io_Containerd_Cgroups_V2_Metrics(serializedBytes: metrics.value)
                #expect(m.pids.current == 1 && m.memory.usage > 1 << 20, "\(m.pids) \(m.memory)")
            }

            let keeper = try node.killAndRestart {
                #expect(!processGone(aPid) && !processGone(bPid), "a module died with the daemon")
                kill(bPid, SIGKILL)
                #expect(waitUntil { processGone(bPid) })
            }
            #expect(try tasks.wait("b") == 137, "the exit while no daemon ran")
            #expect(try tasks.state("a").status == .running)
            try tasks.kill("a")
            #expect(try tasks.wait("a") == 137)
            try tasks.delete("a")
            try tasks.delete("b")
            try node.shutdown("rpod")
            #expect(try Spawner.wait(keeper.process) == .exited(137))
            keeper.log.close()
        }
    }

    /// The runner `make install` ships (the Swift runtime linked in, `make runner-static`)
    /// is what the daemon executes when `[wasm] runner` names it: both engines, the compile
    /// helper, and sealed code the second time.
    @Test func theRunnerMakeInstallShipsRunsModulesOnBothEngines() throws {
        let runner = repositoryRoot + "/.build-runner/release/kuasar-wasm-run"
        guard access(runner, X_OK) == 0 else {
            Issue.record("\(runner) is missing: make test builds it (make runner-static)")
            return
        }
        let config = Self.config(engine: "wasmkit") + "\nrunner = \"\(runner)\"\n"
        try Node.with("wasm-linked", config: config) { node in
            let (pod, address) = try node.runPod("lpod", AllTests.PodTests.podConfig(hostname: "lpod"), sandboxer: "kuasar-wasm")
            let tasks = Tasks(path: address)
            let cache = node.root + "/wasm-cache/wasmtime-" + AllTests.WasmRunnerTests.wasmtimeVersion
            for (i, engine) in ["wasmkit", "wasmtime", "wasmtime"].enumerated() {
                let id = "h\(i)"
                let b = try Self.bundle(node, id, pid: pod, args: ["/c-greet.wasm", "3"], annotations: [WasmPrograms.engineAnnotation: engine])
                _ = try node.startContainer(address, id, bundle: b)
                #expect(try tasks.wait(id) == 3, "\(engine): \(node.output(b))")
                #expect(node.output(b).contains("arg 0: /c-greet.wasm\narg 1: 3\n"), "\(engine): \(node.output(b))")
                try tasks.delete(id)
                if i == 1 {
                    #expect(waitUntil(timeoutMS: 20_000) { Files.list(cache).contains { $0.hasSuffix(".sum") } }, "the helper filled no cache: \(Files.list(cache))")
                }
            }
            try node.shutdown("lpod")
        }
    }

    /// `<fd> <link>` of each of `pid`'s descriptors.
    static func descriptors(of pid: pid_t) -> [String] {
        Files.list("/proc/\(pid)/fd").map { fd in
            var buf = [CChar](repeating: 0, count: 4096)
            let n = readlink("/proc/\(pid)/fd/\(fd)", &buf, buf.count - 1)
            return fd + " " + (n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?")
        }
    }

    /// C programs built for wasm32-wasi with clang and wasi-libc (Tests/Peers/wasm/c), as
    /// containers: libc's view of args, environment, files, an OCI bind mount, stdin, and
    /// malloc under the spec's memory limit.
    @Test(arguments: ["wasmkit", "wasmtime"]) func cProgramsBuiltForWasiRunAsContainers(engine: String) throws {
        try Node.with("wasm-c-\(engine)", config: Self.config(engine: engine)) { node in
            let (pod, address) = try node.runPod("cpod", AllTests.PodTests.podConfig(hostname: "cpod"), sandboxer: "kuasar-wasm")
            let tasks = Tasks(path: address)

            let greet = try Self.bundle(node, "greet", pid: pod, args: ["/c-greet.wasm", "9", "two words"]) { json in
                var p = json["process"] as! [String: Any]
                p["env"] = ((p["env"] as? [String]) ?? []) + ["GREETING=from the spec"]
                json["process"] = p
            }
            _ = try node.startContainer(address, "greet", bundle: greet)
            #expect(try tasks.wait("greet") == 9)
            let out = node.output(greet)
            #expect(out.contains("arg 0: /c-greet.wasm\narg 1: 9\narg 2: two words\nGREETING=from the spec\n") && out.contains("to stderr\n"), "greet: \(out)")
            try tasks.delete("greet")

            // The rootfs's files through fopen, a file written into it, and a read-only bind
            // mount of the spec listed with opendir.
            let data = node.bundles + "/data-src"
            try makeDirectories(data, mode: 0o755)
            for f in ["one.txt", "two.txt"] { try Files.write(data + "/" + f, f, create: true) }
            let files = try Self.bundle(node, "files", pid: pod, args: ["/c-files.wasm", "/data"]) { json in
                var mounts = json["mounts"] as! [[String: Any]]
                mounts.append(["destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro"]])
                json["mounts"] = mounts
            }
            try Files.write(files + "/rootfs/etc/message", "a message in the image\n", create: true)
            _ = try node.startContainer(address, "files", bundle: files)
            #expect(try tasks.wait("files") == 0, "files: \(node.output(files))")
            #expect(node.output(files) == "a message in the image\nentry one.txt\nentry two.txt\n" ||
                    node.output(files) == "a message in the image\nentry two.txt\nentry one.txt\n", "files: \(node.output(files))")
            #expect((try? Files.readString(files + "/rootfs/written.txt")) == "written by C through WASI\n")
            try tasks.delete("files")

            // stdin to its end: a MiB, counted and summed as the module saw it.
            let count = try Self.bundle(node, "count", pid: pod, args: ["/c-count.wasm"])
            let input = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: ($0 &* 2654435761) >> 7) }
            let want = input.reduce(UInt64(0)) { $0 &* 31 &+ UInt64($1) }
            try Self.startFeedingStdin(address, tasks, "count", bundle: count, input)
            #expect(try tasks.wait("count") == 0)
            #expect(node.output(count) == "\(1 << 20) bytes, sum \(want)\n", "count: \(node.output(count))")
            try tasks.delete("count")

            // malloc until it fails, under a 64 MiB limit: the cap refuses memory.grow, so the
            // program sees NULL and exits 0 (not 137: the cgroup never had to kill it).
            let eat = try Self.bundle(node, "eat", pid: pod, args: ["/c-eat.wasm"]) { json in
                var linux = json["linux"] as! [String: Any]
                var res = linux["resources"] as? [String: Any] ?? [:]
                res["memory"] = ["limit": 64 << 20]
                linux["resources"] = res
                json["linux"] = linux
            }
            _ = try node.startContainer(address, "eat", bundle: eat)
            #expect(try tasks.wait("eat") == 0, "eat: \(node.output(eat))")
            let got = node.output(eat).split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? -1
            #expect(got > 8 && got < 64, "malloc under a 64 MiB cap: \(node.output(eat))")
            try tasks.delete("eat")
            try node.shutdown("cpod")
        }
    }
}
}
