import Foundation
import Testing
import SwiftProtobuf
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// The Task API in-process: bad input gets the right status, and nothing wedges.
extension AllTests {
@Suite struct TaskServiceTests {
    final class Harness {
        let reactor: Reactor
        let supervisor: ProcessSupervisor
        let engine: ContainerEngine
        let registry: SandboxRegistry
        let tasks: TaskService
        let sandbox: Sandbox
        let root: String

        init(_ reactor: Reactor, _ name: String) throws {
            self.reactor = reactor
            root = "/tmp/kuasar-tasks-\(name)-\(getpid())"
            Files.removeTree(root)
            supervisor = ProcessSupervisor(reactor: reactor)
            engine = try ContainerEngine(reactor: reactor, supervisor: supervisor)
            registry = SandboxRegistry(root: root, engine: engine, logger: .init(label: "test"))
            tasks = TaskService(registry: registry, reactor: reactor, logger: .init(label: "test"))
            sandbox = try registry.register(id: "sb1", namespace: "test", eventsAddress: "").0
            try tasks.serve(sandbox)
        }

        func client() throws -> TTRPCClient { try TTRPCClient.connect(reactor: reactor, path: sandbox.taskSocket) }

        func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ c: TTRPCClient, _ method: String, _ req: Req, _: Resp.Type) throws -> Result<Resp, RPCError> {
            var result: Result<Resp, RPCError>?
            c.unary(service: "containerd.task.v3.Task", method: method, req, as: Resp.self, timeoutNS: 10_000_000_000) { result = $0 }
            try spin(reactor, "\(method)") { result != nil }
            return result!
        }

        func close() throws {
            for c in sandbox.containers.values { try? c.kill(signal: SIGKILL, all: true) }
            try spin(reactor, "containers exit") { sandbox.containers.values.allSatisfy { $0.state == .stopped || $0.state == .created } }
            registry.remove(sandbox)
            try spin(reactor, "reaped") { supervisor.runningCount == 0 }
            tasks.close()
            engine.close()
            supervisor.close()
            #expect(mountsUnder(root).isEmpty)
            Files.removeTree(root)
        }
    }

    /// CloseIO right after the writer closed the stdin FIFO: every byte written reaches the
    /// container, also what still sat in the FIFO while the daemon's reading was paused
    /// (the container not reading yet, its pipe and the daemon's queue full). Before, those
    /// bytes — up to the FIFO's 64 KiB — were dropped with the FIFO.
    @Test func closeIOLosesNoStdinStillInTheFIFO() throws {
        let bundle = try TestBundle("tasks-stdin")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["sh", "-c", "sleep 3; wc -c"])
        try withReactor(.epoll) { reactor in
            let h = try Harness(reactor, "stdin")
            let c = try h.client()
            let fifo = h.root + "/stdin-fifo"
            #expect(mkfifo(fifo, 0o600) == 0)
            var create = Containerd_Task_V2_CreateTaskRequest()
            create.id = "reader"
            create.bundle = bundle.path
            create.stdin = fifo
            create.stdout = "file://" + h.root + "/count"
            _ = try h.call(c, "Create", create, Containerd_Task_V2_CreateTaskResponse.self).get()
            var start = Containerd_Task_V2_StartRequest()
            start.id = "reader"
            _ = try h.call(c, "Start", start, Containerd_Task_V2_StartResponse.self).get()
            // Fill everything while the container sleeps: its pipe, the daemon's queue up
            // to its watermark (reading then pauses), and the FIFO itself. This thread is
            // the daemon's loop too, so the FIFO is read only while it spins.
            let fd = open(fifo, O_WRONLY | O_CLOEXEC | O_NONBLOCK)
            #expect(fd >= 0)
            let chunk = [UInt8](repeating: 0x61, count: 4096)
            var size = 0, stalled = 0
            while stalled < 3 && size < 16 << 20 {
                var wrote = 0
                while true {
                    let n = chunk.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                    if n <= 0 { break }
                    wrote += n
                }
                size += wrote
                stalled = wrote == 0 ? stalled + 1 : 0
                try settle(reactor, ms: 50)
            }
            close(fd)
            #expect(size > 256 << 10, "only \(size) bytes went in")
            var closeIO = Containerd_Task_V2_CloseIORequest()
            closeIO.id = "reader"
            closeIO.stdin = true
            _ = try h.call(c, "CloseIO", closeIO, Google_Protobuf_Empty.self).get()
            var wait = Containerd_Task_V2_WaitRequest()
            wait.id = "reader"
            #expect(try h.call(c, "Wait", wait, Containerd_Task_V2_WaitResponse.self).get().exitStatus == 0)
            let counted = (try? Files.readString(h.root + "/count"))?.trimmingWhitespace
            #expect(counted == String(size), "the container read \(counted ?? "nothing") of \(size) bytes")
            var del = Containerd_Task_V2_DeleteRequest()
            del.id = "reader"
            _ = try h.call(c, "Delete", del, Containerd_Task_V2_DeleteResponse.self).get()
            c.close()
            try h.close()
        }
    }

    @Test func badInputGetsTheRightStatusAndTheServiceKeepsServing() throws {
        let bundle = try TestBundle("tasks-bad")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["sleep", "30"])
        try withReactor(.epoll) { reactor in
            let h = try Harness(reactor, "bad")
            let c = try h.client()
            var create = Containerd_Task_V2_CreateTaskRequest()
            for (id, what) in [("../x", "must start"), ("a/b", "may only contain"), ("", "1 to 128")] {
                create.id = id
                create.bundle = bundle.path
                let r = try h.call(c, "Create", create, Containerd_Task_V2_CreateTaskResponse.self)
                guard case .failure(let e) = r else { Issue.record("id \(id) accepted"); continue }
                #expect(e.code == .invalidArgument && e.message.contains(what), "\(e)")
            }
            create.id = "nobundle"
            create.bundle = "/nonexistent/bundle"
            if case .failure(let e) = try h.call(c, "Create", create, Containerd_Task_V2_CreateTaskResponse.self) {
                #expect(e.code == .notFound && e.message.contains("/nonexistent/bundle/config.json"), "\(e)")
            } else { Issue.record("missing bundle accepted") }
            var state = Containerd_Task_V2_StateRequest()
            state.id = "ghost"
            if case .failure(let e) = try h.call(c, "State", state, Containerd_Task_V2_StateResponse.self) {
                #expect(e.code == .notFound && e.message.contains("ghost"), "\(e)")
            } else { Issue.record("unknown id answered") }
            if case .failure(let e) = try h.call(c, "Checkpoint", Containerd_Task_V2_CheckpointTaskRequest(), Google_Protobuf_Empty.self) {
                #expect(e.code == .unimplemented && e.message.contains("checkpoint"), "\(e)")
            } else { Issue.record("checkpoint answered") }
            // A payload that is not the request message.
            var raw: Result<[UInt8], RPCError>?
            c.start(service: "containerd.task.v2.Task", method: "Create", payload: [0xff, 0xff, 0xff]) { raw = $0 }
            try spin(reactor, "garbage") { raw != nil }
            if case .failure(let e) = raw! { #expect(e.code == .invalidArgument, "\(e)") } else { Issue.record("garbage accepted") }

            // stdout to a FIFO nobody ever opens: the container still starts, runs and exits.
            let fifo = h.root + "/lonely-fifo"
            mkfifo(fifo, 0o600)
            create.id = "c1"
            create.bundle = bundle.path
            create.stdout = fifo
            guard case .success(let created) = try h.call(c, "Create", create, Containerd_Task_V2_CreateTaskResponse.self) else {
                Issue.record("create failed"); return
            }
            #expect(created.pid > 0)
            var start = Containerd_Task_V2_StartRequest()
            start.id = "c1"
            #expect(throws: Never.self) { _ = try h.call(c, "Start", start, Containerd_Task_V2_StartResponse.self).get() }
            // Deleting a running task is refused, not done.
            var del = Containerd_Task_V2_DeleteRequest()
            del.id = "c1"
            if case .failure(let e) = try h.call(c, "Delete", del, Containerd_Task_V2_DeleteResponse.self) {
                #expect(e.code == .failedPrecondition, "\(e)")
            } else { Issue.record("deleted a running task") }

            // A client that disconnects in the middle of Wait: its waiter goes away.
            let quitter = try h.client()
            var wait = Containerd_Task_V2_WaitRequest()
            wait.id = "c1"
            quitter.unary(service: "containerd.task.v2.Task", method: "Wait", wait, as: Containerd_Task_V2_WaitResponse.self) { _ in }
            let initProcess = h.sandbox.containers["c1"]!.initProcess
            try spin(reactor, "wait registered") { initProcess.waiterCount == 1 }
            quitter.close()
            try spin(reactor, "waiter dropped") { initProcess.waiterCount == 0 }
            // ...and the others are still served: kill, wait, delete.
            var waited: Result<Containerd_Task_V2_WaitResponse, RPCError>?
            c.unary(service: "containerd.task.v2.Task", method: "Wait", wait, as: Containerd_Task_V2_WaitResponse.self) { waited = $0 }
            var kill = Containerd_Task_V2_KillRequest()
            kill.id = "c1"
            kill.signal = 9
            _ = try h.call(c, "Kill", kill, Google_Protobuf_Empty.self)
            try spin(reactor, "wait answered") { waited != nil }
            #expect((try? waited!.get().exitStatus) == 137)
            #expect((try? h.call(c, "Delete", del, Containerd_Task_V2_DeleteResponse.self).get().exitStatus) == 137)
            c.close()
            try h.close()
        }
    }
}
}
