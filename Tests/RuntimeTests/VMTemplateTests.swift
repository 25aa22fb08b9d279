import Foundation
import Testing
import Logging
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// VM templates under real QEMU (TCG): the daemon builds the default size's template at
/// start, pods clone it — each its own guest (hostname, clock, boot_id, random state), the
/// template's RAM file never written — and a template whose inputs or files changed is
/// built again, never cloned.
extension AllTests {
@Suite(.serialized) struct VMTemplateTests {
    /// A template directory of the test's own (tmpfs, like the default), removed after.
    static func withTemplateDir(_ name: String, _ body: (String) throws -> Void) throws {
        let dir = "/dev/shm/kuasar-test-\(name)-\(getpid())"
        Files.removeTree(dir)
        defer { Files.removeTree(dir) }
        try body(dir)
    }

    /// The templates in `dir` with a manifest (built and installed).
    static func installed(_ dir: String) -> [String] {
        Files.list(dir).filter { !$0.hasPrefix(".") && Files.exists(dir + "/" + $0 + "/manifest.json") }
    }

    static func status(_ node: PodTests.Node, _ id: String) throws -> String {
        var st = Containerd_Services_Sandbox_V1_ControllerStatusRequest()
        st.sandboxID = id
        st.sandboxer = "kuasar-vm"
        st.verbose = true
        return try node.call("Status", st, Containerd_Services_Sandbox_V1_ControllerStatusResponse.self).info["info"] ?? ""
    }

    @Test func threePodsCloneTheTemplateAtOnceAndEachIsItsOwnGuest() throws {
        try Self.withTemplateDir("clones") { dir in
            try PodTests.Node.with("vmt", config: VMSandboxTests.config(templates: dir), keep: true) { node in
                // The daemon builds the default size's template at start (one TCG boot).
                #expect(waitUntil(timeoutMS: 120_000, everyMS: 100) { Self.installed(dir).count == 1 }, "no template in \(dir): \(Files.list(dir))")
                let key = try #require(Self.installed(dir).first)
                let ram = dir + "/" + key + "/ram"
                let before = try Files.digest(ram)

                let ids = ["tc-a", "tc-b", "tc-c"]
                for id in ids { try node.createPod(id, PodTests.podConfig(hostname: "host-\(id)"), sandboxer: "kuasar-vm") }
                // Three Starts at once, each on its own connection.
                final class Results: @unchecked Sendable {
                    let lock = NSLock()
                    var byID: [String: Result<(pid_t, String), Error>] = [:]
                }
                let results = Results()
                let socket = node.socket
                let t0 = MonotonicClock.nanoseconds()
                DispatchQueue.concurrentPerform(iterations: ids.count) { i in
                    let r = Result<(pid_t, String), Error> {
                        let client = try GRPCClient(path: socket)
                        var start = Containerd_Services_Sandbox_V1_ControllerStartRequest()
                        start.sandboxID = ids[i]
                        start.sandboxer = "kuasar-vm"
                        let s = try client.call(PodTests.controller, "Start", start, as: Containerd_Services_Sandbox_V1_ControllerStartResponse.self,
                                                metadata: [("containerd-namespace", "k8s.io")])
                        return (pid_t(s.pid), String(s.address.dropFirst("ttrpc+unix://".count)))
                    }
                    results.lock.lock()
                    results.byID[ids[i]] = r
                    results.lock.unlock()
                }
                let started = results.byID
                let startMS = Double(MonotonicClock.nanoseconds() - t0) / 1e6
                var seen: [String: [String]] = [:]
                var pods: [String: (pid: pid_t, address: String)] = [:]
                for id in ids {
                    let (pid, address) = try #require(try started[id]?.get())
                    pods[id] = (pid, address)
                    let info = try Self.status(node, id)
                    #expect(info.contains("\"started_from\":\"template \(key)\"") && info.contains("\"template\":{") && info.contains("\"key\":\"\(key)\""),
                            "\(id) was not cloned: \(info)")
                    let t = try OneShotClient(path: address)
                    defer { t.close() }
                    // Its own identity, and a write of 32 MiB into its memory (tmpfs).
                    let io = try VMSandboxTests.run(t, node, "c-\(id)", pid: pid, ["sh", "-c",
                        "hostname; cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '; "
                        + "head -c 33554432 /dev/zero | tr '\\0' '\(id.last!)' > /dev/shm/fill; ls /dev/shm; date +%s"])
                    defer { io.close() }
                    #expect(try VMSandboxTests.wait(t, "c-\(id)") == 0)
                    let hostNow = Int(time(nil))
                    let lines = io.read("stdout").split(separator: "\n").map(String.init)
                    seen[id] = lines
                    #expect(lines.count >= 5 && lines[0] == "host-\(id)", "\(id): \(lines)")
                    if lines.count >= 5, let guestNow = Int(lines[4]) {
                        #expect(abs(guestNow - hostNow) <= 1, "\(id)'s clock is \(guestNow), the host's \(hostNow): a clone wakes with the template's time and must be set")
                    }
                    #expect(lines.count >= 5 && lines[3] == "fill", "\(id) sees only its own /dev/shm: \(lines)")
                    try VMSandboxTests.delete(t, "c-\(id)")
                }
                let bootIDs = Set(seen.values.compactMap { $0.count > 1 ? $0[1] : nil })
                let randoms = Set(seen.values.compactMap { $0.count > 2 ? $0[2] : nil })
                #expect(bootIDs.count == 3, "every clone has its own boot_id: \(seen)")
                #expect(randoms.count == 3, "every clone has its own random state: \(seen)")
                // The clones' writes stayed theirs: the template's file is as it was built.
                #expect(try Files.digest(ram).hex == before.hex, "a clone's memory reached the template's RAM file")
                print("3 clones started at once in \(Int(startMS)) ms")

                // A clone is a VM pod like any other to a restarted daemon.
                let firstKeeper = try node.killAndRestart {}
                do {
                    let (pid, address) = try #require(pods["tc-b"])
                    #expect(try Self.status(node, "tc-b").contains("\"started_from\":\"template \(key)\""))
                    let t = try OneShotClient(path: address)
                    defer { t.close() }
                    let io = try VMSandboxTests.run(t, node, "again", pid: pid, ["cat", "/etc/hostname"])
                    defer { io.close() }
                    #expect(try VMSandboxTests.wait(t, "again") == 0)
                    #expect(io.read("stdout").hasPrefix("host-tc-b\n"), "the recovered clone runs containers")
                    try VMSandboxTests.delete(t, "again")
                    for id in ids { try TaskServerTests.shutdown(node, id, "kuasar-vm") }
                    #expect(waitUntil(timeoutMS: 10_000) { VMSandboxTests.qemuProcesses(mentioning: node.root).isEmpty })
                } catch {
                    for p in pods.values { kill(p.pid, SIGKILL) }
                    _ = try? Spawner.wait(firstKeeper.process)
                    firstKeeper.log.close()
                    throw error
                }
                #expect(try Spawner.wait(firstKeeper.process) == .exited(137))
                firstKeeper.log.close()
                // The template stays, valid, for the next pods.
                #expect(Self.installed(dir) == [key])
                #expect(try Files.digest(ram).hex == before.hex)
            }
            #expect(VMSandboxTests.qemuProcesses(mentioning: dir).isEmpty, "no template-building QEMU left")
        }
    }

    /// A store on its own loop, as `kuasar vm template build` runs it.
    final class Store {
        let reactor: Reactor
        let supervisor: ProcessSupervisor
        let templates: VMTemplates
        init(dir: String, kernel: String = VMSandboxTests.image + "/vmlinux") throws {
            var logger = Logger(label: "test.templates")
            logger.logLevel = .warning
            reactor = try Reactor(logger: logger)
            supervisor = ProcessSupervisor(reactor: reactor)
            var settings = VMSettings(kernel: kernel, initrd: VMSandboxTests.image + "/initrd.lz4", accelerator: "tcg", memoryMiB: 256, vcpus: 1,
                                      bootTimeoutNS: 90_000_000_000, kernelArgs: [])
            settings.templateDir = dir
            let qemu = QEMU(binary: "/usr/bin/qemu-system-x86_64", machine: .microvm, supervisor: supervisor, reactor: reactor, logger: logger)
            templates = VMTemplates(root: dir, hypervisor: qemu, settings: settings, reactor: reactor, logger: logger)
            templates.removeLeftovers()
        }
        func ensure(memory: UInt32 = 256) throws -> VMTemplates.Template {
            var result: Result<VMTemplates.Template, RPCError>?
            templates.ensure(memoryMiB: memory, vcpus: 1, accelerator: .tcg) { result = $0 }
            _ = try reactor.run(until: { result != nil }, timeoutNS: 150_000_000_000)
            return try #require(result).get()
        }
        func close() {
            supervisor.close()
            reactor.close()
        }
    }

    static func inode(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_ino) : 0
    }

    @Test func aChangedSizeKernelOrCorruptFileMakesANewTemplate() throws {
        let scratch = try scratchDirectory("vm-template-inputs")
        defer { Files.removeTree(scratch) }
        // A kernel of our own, to change it.
        let kernel = scratch + "/vmlinux"
        #expect(try run("/bin/cp", VMSandboxTests.image + "/vmlinux", kernel) == 0)
        try Self.withTemplateDir("inputs") { dir in
            let store = try Store(dir: dir, kernel: kernel)
            defer { store.close() }
            let first = try store.ensure()
            let firstInode = Self.inode(first.dir)
            #expect(Self.installed(dir) == [first.key])

            // The same inputs again: the template is found and checked, not built again.
            let again = try Store(dir: dir, kernel: kernel)
            defer { again.close() }
            let same = try again.ensure()
            #expect(same.key == first.key && Self.inode(same.dir) == firstInode, "an unchanged template is reused")
            #expect(again.templates.ready(memoryMiB: 256, vcpus: 1, nics: 1, accelerator: .tcg)?.key == first.key)
            #expect(again.templates.ready(memoryMiB: 256, vcpus: 1, nics: 2, accelerator: .tcg) == nil, "more NICs than the template's slots: no clone")
            #expect(again.templates.ready(memoryMiB: 512, vcpus: 1, nics: 0, accelerator: .tcg) == nil, "another size: no clone (it boots)")

            // A corrupt state file (one byte) is caught by its digest, before any clone.
            let state = first.dir + "/state"
            _ = chmod(state, 0o600)
            let fd = open(state, O_WRONLY | O_CLOEXEC)
            var byte: UInt8 = 0x5a
            _ = pwrite(fd, &byte, 1, 100)
            _ = close(fd)
            #expect(again.templates.ready(memoryMiB: 256, vcpus: 1, nics: 1, accelerator: .tcg) == nil, "a changed file is never cloned")
            #expect(!Files.exists(first.dir), "the corrupt template is removed")
            let rebuilt = try again.ensure()
            #expect(rebuilt.key == first.key && Files.exists(rebuilt.state))

            // A manifest that is not JSON: the template is not trusted either.
            _ = chmod(rebuilt.dir + "/manifest.json", 0o600)
            try Files.write(rebuilt.dir + "/manifest.json", "{\"description\": [garbage", create: true)
            #expect(again.templates.ready(memoryMiB: 256, vcpus: 1, nics: 1, accelerator: .tcg) == nil)
            #expect(!Files.exists(rebuilt.dir))
            _ = try again.ensure()

            // Another size is another template beside it.
            let bigger = try again.ensure(memory: 320)
            #expect(bigger.key != first.key && Set(Self.installed(dir)) == [first.key, bigger.key])

            // A changed kernel: a new key; the old image's templates go at the next start.
            let k = open(kernel, O_WRONLY | O_APPEND | O_CLOEXEC)
            _ = write(k, "kuasar", 6)
            _ = close(k)
            let third = try Store(dir: dir, kernel: kernel)
            defer { third.close() }
            #expect(Self.installed(dir).isEmpty, "templates of the old kernel are removed: \(Self.installed(dir))")
            let fresh = try third.ensure()
            #expect(fresh.key != first.key && Self.installed(dir) == [fresh.key])
            #expect(VMSandboxTests.qemuProcesses(mentioning: dir).isEmpty, "no template-building QEMU left")
            #expect(Files.list(dir).allSatisfy { !$0.hasPrefix(".build-") }, "no build directory left: \(Files.list(dir))")
        }
    }
}
}

extension AllTests.VMTemplateTests {
    /// The template directory lies in /dev/shm, where anyone may make names: one that is
    /// not ours, or that others can write, is refused.
    @Test func aTemplateDirectoryOthersControlIsRefused() throws {
        let dir = "/dev/shm/kuasar-test-owner-\(getpid())"
        Files.removeTree(dir)
        defer { Files.removeTree(dir) }
        try VMTemplates.prepareRoot(dir)
        #expect(chmod(dir, 0o777) == 0)
        #expect(throws: RPCError.self) { try VMTemplates.prepareRoot(dir) }
        #expect(chmod(dir, 0o700) == 0 && chown(dir, 65534, 65534) == 0)
        do {
            try VMTemplates.prepareRoot(dir)
            Issue.record("a directory of uid 65534 was accepted")
        } catch let e as RPCError {
            #expect(e.code == .permissionDenied && e.message.contains("65534"), "\(e)")
        }
        // A symlink in its place is not a directory of ours either.
        Files.removeTree(dir)
        #expect(symlink("/tmp", dir) == 0)
        #expect(throws: RPCError.self) { try VMTemplates.prepareRoot(dir) }
        _ = unlink(dir)
    }

    /// A template whose files match their digests but whose state does not restore (saved
    /// by another QEMU, say): the pod boots instead, and the template is built again.
    @Test func aTemplateThatDoesNotRestoreIsDroppedAndThePodBoots() throws {
        try Self.withTemplateDir("bad-state") { dir in
            let store = try Store(dir: dir)
            let t = try store.ensure()
            store.close()
            // Garbage in place of the device state, with a manifest that vouches for it.
            _ = chmod(t.state, 0o600)
            try Files.write(t.state, String(repeating: "not a migration stream\n", count: 100), create: true)
            _ = chmod(t.dir + "/manifest.json", 0o600)
            var manifest = try #require(try JSONSerialization.jsonObject(with: Data(Files.read(t.dir + "/manifest.json"))) as? [String: Any])
            manifest["state_digest"] = try Files.digest(t.state).hex
            try Files.write(t.dir + "/manifest.json", String(decoding: try JSONSerialization.data(withJSONObject: manifest), as: UTF8.self), create: true)
            let badState = try Files.digest(t.state).hex

            try AllTests.PodTests.Node.with("vmt-bad", config: AllTests.VMSandboxTests.config(templates: dir)) { node in
                let (pid, address) = try node.runPod("tb", AllTests.PodTests.podConfig(hostname: "booted"), sandboxer: "kuasar-vm")
                #expect(try Self.status(node, "tb").contains("\"started_from\":\"cold boot\""))
                let client = try OneShotClient(path: address)
                defer { client.close() }
                let io = try AllTests.VMSandboxTests.run(client, node, "c", pid: pid, ["hostname"])
                defer { io.close() }
                #expect(try AllTests.VMSandboxTests.wait(client, "c") == 0)
                #expect(io.read("stdout") == "booted\n")
                try AllTests.VMSandboxTests.delete(client, "c")
                // The bad one is gone and a good one takes its place.
                #expect(waitUntil(timeoutMS: 120_000, everyMS: 100) {
                    Self.installed(dir) == [t.key] && (try? Files.digest(t.state).hex) != badState && !Files.list(dir).contains { $0.hasPrefix(".build-") }
                }, "the template is built again: \(Files.list(dir))")
                try AllTests.TaskServerTests.shutdown(node, "tb", "kuasar-vm")
                #expect(waitUntil(timeoutMS: 10_000) { AllTests.VMSandboxTests.qemuProcesses(mentioning: node.root).isEmpty })
            }
        }
    }
}

extension AllTests.VMTemplateTests {
    /// A daemon that exits while it builds its template leaves no VM and no build directory
    /// (no next daemon could finish it).
    @Test func aDaemonThatExitsMidBuildLeavesNothing() throws {
        try Self.withTemplateDir("exit") { dir in
            let node = try AllTests.PodTests.Node("vmt-exit", config: AllTests.VMSandboxTests.config(templates: dir))
            #expect(waitUntil(timeoutMS: 30_000) { !AllTests.VMSandboxTests.qemuProcesses(mentioning: dir).isEmpty }, "the build's QEMU started")
            try node.stop()
            #expect(waitUntil(timeoutMS: 10_000) { AllTests.VMSandboxTests.qemuProcesses(mentioning: dir).isEmpty }, "the build's QEMU is gone")
            #expect(Files.list(dir).isEmpty, "nothing left in \(dir): \(Files.list(dir))")
        }
    }
}
