import Foundation
import Testing
import Logging
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The QMP client against a real QEMU (no guest: `-M none`), the JSON it speaks, and the
/// QEMU driver's command line.
extension AllTests {
@Suite struct QMPTests {
    @Test func jsonValuesRoundTripAndGarbageIsAnErrorNotACrash() throws {
        let doc: JSONValue = ["execute": "device_add", "arguments": ["id": "d\"1\n", "n": 42, "ok": true, "list": [1, "x", .null]]]
        #expect(doc.text == #"{"execute":"device_add","arguments":{"id":"d\"1\n","n":42,"ok":true,"list":[1,"x",null]}}"#)
        let parsed = try JSONValue.parse(Array(doc.text.utf8))
        #expect(parsed["arguments"]?["id"]?.stringValue == "d\"1\n" && parsed["arguments"]?["n"]?.numberValue == 42)
        #expect(JSONValue.string("\u{1}").text == #""\u0001""#)
        for bad in ["", "{", "{\"a\":}", "[1 2]", "nul", "\"\\x\""] {
            #expect(throws: (any Error).self, "\(bad)") { try JSONValue.parse(Array(bad.utf8)) }
        }
        // Random bytes and truncations of a real answer: errors only.
        var rng = SystemRandomNumberGenerator()
        let answer = Array(#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 3}"#.utf8)
        for i in 0..<2000 {
            let input: [UInt8] = i % 2 == 0 ? (0..<Int.random(in: 0..<64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                                            : Array(answer.prefix(Int.random(in: 0..<answer.count, using: &rng)))
            _ = try? JSONValue.parse(input)
        }
    }

    static func startQEMU(_ dir: String, extra: [String] = []) throws -> SpawnedProcess {
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        let args = ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "unix:\(dir)/qmp.sock,server=on,wait=off"] + extra
        return try Spawner.spawn(ProcessSpec(executable: "/usr/bin/qemu-system-x86_64", arguments: args, fdMap: [(null, 0), (null, 1), (null, 2)]))
    }

    @Test func theClientNegotiatesRunsCommandsAndSeesQEMUGo() throws {
        let dir = try scratchDirectory("qmp")
        defer { Files.removeTree(dir) }
        let qemu = try Self.startQEMU(dir)
        let pid = qemu.pid
        #expect(waitUntil { Files.exists(dir + "/qmp.sock") })
        do { try withReactor(.epoll) { reactor in
            let client = try QMPClient.connect(reactor: reactor, path: dir + "/qmp.sock")
            var greeting: JSONValue?
            client.handshake(timeoutNS: 5_000_000_000) { greeting = try? $0.get() }
            try spin(reactor, "greeting") { greeting != nil }
            #expect(greeting?["version"]?["qemu"]?["major"]?.numberValue ?? 0 >= 7, "\(String(describing: greeting))")

            // Several commands in flight at once, each answered to its own caller.
            var status: String?, unknown: QMPClient.Failure?, version: JSONValue?
            client.execute("query-status") { status = try? $0.get()["status"]?.stringValue }
            client.execute("no-such-command") { if case .failure(let f) = $0 { unknown = f } }
            client.execute("query-version") { version = try? $0.get() }
            try spin(reactor, "answers") { status != nil && unknown != nil && version != nil }
            #expect(status == "prelaunch")
            #expect(unknown?.errorClass == "CommandNotFound" && unknown?.desc.contains("no-such-command") == true, "\(String(describing: unknown))")

            // Bad arguments are QEMU's error, named.
            var bad: QMPClient.Failure?
            client.execute("device_add", ["driver": "no-such-device", "id": "x"]) { if case .failure(let f) = $0 { bad = f } }
            try spin(reactor, "device_add error") { bad != nil }
            #expect(bad?.desc.contains("no-such-device") == true, "\(String(describing: bad))")

            // quit: the answer, then the connection ends; later calls fail at once.
            var quit = false, closed: QMPClient.Failure?
            client.onClose = { closed = $0 }
            client.execute("quit") { _ in quit = true }
            try spin(reactor, "quit") { quit && closed != nil }
            var after: QMPClient.Failure?
            client.execute("query-status") { if case .failure(let f) = $0 { after = f } }
            #expect(after?.errorClass == "Disconnected")
        } } catch {
            kill(pid, SIGKILL)
            _ = try? Spawner.wait(qemu)
            throw error
        }
        #expect(try Spawner.wait(qemu) == .exited(0))
    }

    @Test func aPeerThatSendsGarbageOrVanishesFailsTheCallsNotTheLoop() throws {
        try withReactor(.epoll) { reactor in
            let pair = try Socket.pair()
            let peer = OwnedFD(adopting: pair.second.take())
            let client = try QMPClient(reactor: reactor, fd: OwnedFD(adopting: pair.first.take()))
            var greeted: Result<JSONValue, QMPClient.Failure>?
            client.handshake(timeoutNS: 5_000_000_000) { greeted = $0 }
            // Not JSON, then a greeting: the line is skipped, the greeting works.
            _ = writeRaw(peer.rawValue, Array("this is not json\r\n{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n".utf8))
            try settle(reactor, ms: 20)
            _ = writeRaw(peer.rawValue, Array("{\"return\": {}, \"id\": 1}\r\n".utf8))
            try spin(reactor, "handshake") { greeted != nil }
            #expect((try? greeted?.get()) != nil)
            var failure: QMPClient.Failure?, timedOut: QMPClient.Failure?
            client.execute("query-status") { if case .failure(let f) = $0 { failure = f } }
            client.execute("stop", timeoutNS: 50_000_000) { if case .failure(let f) = $0 { timedOut = f } }
            try spin(reactor, "timeout") { timedOut != nil }
            #expect(timedOut?.errorClass == "Timeout")
            // An answer to nothing and an event are no trouble; then the peer goes.
            var events: [String] = []
            client.onEvent = { name, _ in events.append(name) }
            _ = writeRaw(peer.rawValue, Array("{\"return\": {}, \"id\": 99}\r\n{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true}}\r\n".utf8))
            try spin(reactor, "event") { events == ["SHUTDOWN"] }
            peer.close()
            try spin(reactor, "disconnect") { failure != nil }
            #expect(failure?.errorClass == "Disconnected" && failure?.desc.contains("query-status") == true, "\(String(describing: failure))")
        }
    }

    @Test func theCommandLineIsAMicroVMWithNoDefaultsAndQEMUsSeccomp() throws {
        try withReactor(.epoll) { reactor in
            let supervisor = ProcessSupervisor(reactor: reactor)
            defer { supervisor.close() }
            let qemu = QEMU(binary: "/usr/bin/qemu-system-x86_64", machine: .microvm, supervisor: supervisor, reactor: reactor, logger: Logger(label: "test"))
            var spec = VMSpec(id: "p1", stateDir: "/run/k/p1", kernel: "/img/vmlinux", initrd: "/img/initrd.lz4", memoryMiB: 384, vcpus: 2, accelerator: .tcg, sharePath: "/run/k/p1/sh,are")
            spec.kernelArgs = ["kuasar.log=debug"]
            let a = qemu.arguments(spec)
            func value(_ flag: String) -> [String] { a.indices.filter { a[$0] == flag }.map { a[$0 + 1] } }
            #expect(value("-M") == ["microvm,pic=off,pit=off"] && value("-accel") == ["tcg"] && value("-m") == ["384"] && value("-smp") == ["2"])
            #expect(a.contains("-nodefaults") && a.contains("-no-user-config") && value("-sandbox").first?.hasPrefix("on,") == true)
            #expect(value("-cpu") == ["qemu64,+rdrand"], "TCG gets RDRAND: the guest's CRNG is seeded at once")
            #expect(value("-fsdev").first?.contains("path=/run/k/p1/sh,,are,") == true, "a comma in a path is doubled: \(value("-fsdev"))")
            #expect(value("-append").first?.hasSuffix("kuasar.channel=serial://agent kuasar.share=kuasar kuasar.log=debug") == true)
            #expect(value("-qmp") == ["unix:/run/k/p1/qmp.sock,server=on,wait=off"])
            #expect(!a.contains("-netdev"), "no NIC without a tap")
            let q35 = QEMU(binary: "/usr/bin/qemu-system-x86_64", machine: .q35, supervisor: supervisor, reactor: reactor, logger: Logger(label: "test"))
            spec.accelerator = .kvm
            spec.nics = [.init(tapFD: 9, mac: "02:00:00:00:00:01"), .init(tapFD: 11, mac: "02:00:00:00:00:02")]
            let b = q35.arguments(spec)
            #expect(b.contains("virtio-9p-pci,fsdev=share,mount_tag=kuasar") && b.contains("host"), "\(b)")
            let nets = b.indices.filter { b[$0] == "-netdev" || b[$0] == "-device" }.map { b[$0 + 1] }.filter { $0.contains("net") }
            #expect(nets == ["tap,id=net0,fd=3", "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01", "tap,id=net1,fd=4", "virtio-net-pci,netdev=net1,mac=02:00:00:00:00:02"],
                    "each tap is the child's fd 3, 4, ... with its MAC: \(nets)")
        }
    }
}
}
