import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// containerd 2.x's sandbox Controller on the daemon's API socket, driven by grpcio with
/// stubs protoc generates from our own .proto files; the Task API at the address Start
/// returns runs a container in between.
extension AllTests {
@Suite struct ControllerTests {
    @Test func grpcioDrivesTheSandboxLifecycle() throws {
        let bundle = try TestBundle("controller")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["sleep", "300"])
        let root = "/tmp/kuasar-ctl-\(getpid())"
        Files.removeTree(root)
        defer { Files.removeTree(root) }
        let stubs = root + "-stubs"
        Files.removeTree(stubs)
        defer { Files.removeTree(stubs) }
        try makeDirectories(stubs, mode: 0o755)
        let gen = try shell("cd \(repositoryRoot)/Protos && protoc -I . -I /usr/include --python_out=\(stubs) $(find containerd/services/sandbox containerd/types cri cgroups -name '*.proto' | sort)")
        #expect(gen.code == 0, "protoc: \(gen.out)")

        let socket = root + "/kuasar.sock"
        let daemon = try AllTests.DaemonTests.start(["--root", root], socket: socket)
        #expect(AllTests.DaemonTests.waitForSocket(socket))
        // The line protocol still answers on the same socket.
        #expect((try? HealthProbe.query(socketPath: socket))?.hasPrefix("ok ") == true)

        signal(SIGPIPE, SIG_IGN)  // a peer that died must fail the test, not kill it
        let toPeer = try makePipe(nonBlocking: false), fromPeer = try makePipe(nonBlocking: false)
        let toRead = toPeer.first.take(), toWrite = toPeer.second.take()
        let fromRead = fromPeer.first.take(), fromWrite = fromPeer.second.take()
        let peer = try Spawner.spawn(ProcessSpec(
            executable: systemPython, arguments: pythonPeer("controller_client.py", stubs, socket, "pod1"),
            fdMap: [(toRead, 0), (fromWrite, 1), (2, 2)]))
        close(toRead)
        close(fromWrite)
        var out = ""
        func readLine() -> String? {
            while !out.contains("\n") {
                var b: UInt8 = 0
                if read(fromRead, &b, 1) != 1 { return nil }
                out += String(decoding: [b], as: UTF8.self)
            }
            let line = String(out[..<out.firstIndex(of: "\n")!])
            out = String(out[out.index(after: out.firstIndex(of: "\n")!)...])
            return line
        }
        var address = ""
        var log: [String] = []
        while let line = readLine() {
            log.append(line)
            if line.hasPrefix("address ") { address = String(line.dropFirst(8)); break }
        }
        #expect(address.hasPrefix("ttrpc+unix://"), "peer said: \(log)")
        if address.hasPrefix("ttrpc+unix://") {
            // A container in the sandbox, over the Task API v3 at the returned address.
            let tasks = try OneShotClient(path: String(address.dropFirst("ttrpc+unix://".count)))
            var create = Containerd_Task_V3_CreateTaskRequest()
            create.id = "c1"
            create.bundle = bundle.path
            let created = try tasks.call("containerd.task.v3.Task", "Create", create, as: Containerd_Task_V3_CreateTaskResponse.self)
            #expect(created.pid > 0)
            var start = Containerd_Task_V3_StartRequest()
            start.id = "c1"
            _ = try tasks.call("containerd.task.v3.Task", "Start", start, as: Containerd_Task_V3_StartResponse.self)
            // It joined the sandbox's pinned network namespace.
            let netns = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(created.pid)/ns/net")) ?? "?"
            var st = stat()
            _ = stat(root + "/pod1/net", &st)
            #expect(netns == "net:[\(st.st_ino)]", "container netns \(netns), pinned inode \(st.st_ino)")
            tasks.close()
        }
        _ = write(toWrite, "go\n", 3)
        while let line = readLine() { log.append(line) }
        close(toWrite)
        close(fromRead)
        let status = try Spawner.wait(peer)
        #expect(status == .exited(0), "controller client: \(log.joined(separator: "\n"))")
        #expect(log.contains { $0.hasPrefix("done") }, "\(log)")
        #expect(!Files.exists(root + "/pod1"), "sandbox state left after Shutdown")
        let (exit, _) = try AllTests.DaemonTests.stop(daemon)
        #expect(exit == .exited(0))
        #expect(mountsUnder(root).isEmpty)
    }
}
}
