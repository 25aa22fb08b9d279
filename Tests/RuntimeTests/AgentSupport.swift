import Foundation
import SwiftProtobuf
@testable import Runtime

/// Something that serves the guest agent's services on a ttrpc channel: `kuasar agent
/// --listen` on this host, or the agent as PID 1 of a guest. The calls a host makes of it.
protocol AgentPeer {
    func call<Resp: SwiftProtobuf.Message>(_ service: String, _ m: String, _ r: some SwiftProtobuf.Message, _: Resp.Type) throws -> Resp
}

extension AgentPeer {
    static var taskService: String { "containerd.task.v3.Task" }
    static var agentService: String { "kuasar.agent.v1.Agent" }

    /// A Task API call.
    func task<Resp: SwiftProtobuf.Message>(_ m: String, _ r: some SwiftProtobuf.Message, _: Resp.Type) throws -> Resp {
        try call(Self.taskService, m, r, Resp.self)
    }

    /// Every byte of a stream, to its EOF, in pulls of at most `max` bytes (0: the agent's default).
    func readAll(_ id: String, exec: String = "", _ stream: Kuasar_Agent_V1_Stream = .stdout, max: UInt32 = 0) throws -> [UInt8] {
        var out: [UInt8] = []
        var r = Kuasar_Agent_V1_ReadStdioRequest()
        r.containerID = id
        r.execID = exec
        r.stream = stream
        r.maxBytes = max
        while true {
            let resp = try call(Self.agentService, "ReadStdio", r, Kuasar_Agent_V1_ReadStdioResponse.self)
            if resp.eof { return out }
            out += resp.data
            r.offset = resp.offset + UInt64(resp.data.count)
        }
    }

    /// Create + Start with `stream:` stdio; the init's pid.
    func run(_ id: String, bundle: String, stdin: Bool = false, terminal: Bool = false) throws -> UInt32 {
        var create = Containerd_Task_V3_CreateTaskRequest()
        create.id = id
        create.bundle = bundle
        create.stdout = "stream:"
        create.stderr = terminal ? "" : "stream:"
        if stdin { create.stdin = "stream:" }
        create.terminal = terminal
        let pid = try task("Create", create, Containerd_Task_V3_CreateTaskResponse.self).pid
        var start = Containerd_Task_V3_StartRequest()
        start.id = id
        _ = try task("Start", start, Containerd_Task_V3_StartResponse.self)
        return pid
    }

    func wait(_ id: String, exec: String = "") throws -> UInt32 {
        var w = Containerd_Task_V3_WaitRequest()
        w.id = id
        w.execID = exec
        return try task("Wait", w, Containerd_Task_V3_WaitResponse.self).exitStatus
    }

    func delete(_ id: String, exec: String = "") throws {
        var d = Containerd_Task_V3_DeleteRequest()
        d.id = id
        d.execID = exec
        _ = try task("Delete", d, Containerd_Task_V3_DeleteResponse.self)
    }

    /// Exec of `args`, started; answers once it runs. Its stdout is `stream:`, or with
    /// `out` its stdout and stderr go to that file.
    func exec(_ id: String, _ execID: String, _ args: [String], out: String? = nil) throws {
        var exec = Containerd_Task_V3_ExecProcessRequest()
        exec.id = id
        exec.execID = execID
        exec.stdout = out.map { "file://" + $0 } ?? "stream:"
        if let out { exec.stderr = "file://" + out }
        exec.spec.typeURL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
        exec.spec.value = try JSONEncoder().encode(OCISpec.Process(args: args, env: ["PATH=/bin"], cwd: "/"))
        _ = try task("Exec", exec, Google_Protobuf_Empty.self)
        var start = Containerd_Task_V3_StartRequest()
        start.id = id
        start.execID = execID
        _ = try task("Start", start, Containerd_Task_V3_StartResponse.self)
    }

    func kill(_ id: String, signal: UInt32 = 9) throws {
        var kill = Containerd_Task_V3_KillRequest()
        kill.id = id
        kill.signal = signal
        _ = try task("Kill", kill, Google_Protobuf_Empty.self)
    }
}
