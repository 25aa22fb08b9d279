#if canImport(Glibc)
import Glibc
#endif
import Logging
import SwiftProtobuf
import KuasarSystem
import KuasarReactor
import KuasarWire

/// The host's end of one guest agent's channel: a ttrpc client on the unix socket QEMU
/// listens on for the virtio-serial port. Every Task and Agent call of the pod goes over
/// it; long polls (stdio, events) are calls like any other, many in flight at once.
final class AgentLink {
    static let task = "containerd.task.v3.Task"
    static let agent = "kuasar.agent.v1.Agent"

    let reactor: Reactor
    let path: String
    let namespace: String
    let logger: Logger
    private(set) var client: TTRPCClient?
    private(set) var check: Kuasar_Agent_V1_CheckResponse?
    /// Runs when the connection ends after the agent had answered (the VM died, or the
    /// guest closed its port).
    var onLost: ((RPCError) -> Void)?
    /// Calls are refused (the VM is gone): no reconnect.
    var isClosed = false
    /// This connection's session, named in each Check: the agent drops the calls a
    /// previous host left open on a virtio-serial port that outlived it.
    private(set) var session: UInt64 = 0

    init(reactor: Reactor, path: String, namespace: String, logger: Logger) {
        self.reactor = reactor
        self.path = path
        self.namespace = namespace
        self.logger = logger
    }

    /// The Check loop under way: one `done` for however many tries are in flight.
    private var pending: (deadline: UInt64, alive: () -> Bool, done: (Result<Kuasar_Agent_V1_CheckResponse, RPCError>) -> Void)?

    /// Calls Check until the agent answers. A guest that has not opened its port yet
    /// drops what we send, so each try is a fresh call with a short deadline; `kick`
    /// (the VMM saw the guest open the port) sends one at once. `alive` says whether
    /// waiting still makes sense (the VMM runs).
    func connect(deadline: UInt64, alive: @escaping () -> Bool, done: @escaping (Result<Kuasar_Agent_V1_CheckResponse, RPCError>) -> Void) {
        pending = (deadline, alive, done)
        attempt()
    }

    /// The guest opened its end: try now rather than at the next retry.
    func kick() {
        if pending != nil { attempt() }
    }

    private func finish(_ r: Result<Kuasar_Agent_V1_CheckResponse, RPCError>) {
        guard let p = pending else { return }
        pending = nil
        p.done(r)
    }

    private func attempt() {
        guard let p = pending else { return }
        guard !isClosed, p.alive() else {
            finish(.failure(RPCError(.unavailable, "the VM exited before its agent answered")))
            return
        }
        guard MonotonicClock.nanoseconds() < p.deadline else {
            finish(.failure(RPCError(.deadlineExceeded, "the guest agent did not answer on \(path)")))
            return
        }
        if client == nil || client?.isClosed == true {
            client = try? TTRPCClient.connect(reactor: reactor, path: path)
            client?.onClose = { [weak self] e in self?.lost(e) }
            session = UInt64.random(in: 1...UInt64.max)
        }
        guard let client else {
            reactor.schedule(afterNS: 10_000_000) { [weak self] in self?.attempt() }
            return
        }
        var check = Kuasar_Agent_V1_CheckRequest()
        check.session = session
        client.unary(service: Self.agent, method: "Check", check, as: Kuasar_Agent_V1_CheckResponse.self,
                     timeoutNS: 300_000_000) { [weak self] r in
            guard let self, self.pending != nil else { return }
            switch r {
            case .success(let c):
                self.check = c
                self.finish(.success(c))
            case .failure:
                self.reactor.schedule(afterNS: 20_000_000) { [weak self] in self?.attempt() }
            }
        }
    }

    private func lost(_ e: RPCError) {
        client = nil
        guard check != nil, !isClosed else { return }
        onLost?(e)
    }

    /// One call; `timeoutNS` nil for long polls.
    func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ service: String, _ method: String, _ request: Req, as: Resp.Type,
                                                                       timeoutNS: UInt64? = 60_000_000_000, done: @escaping (Result<Resp, RPCError>) -> Void) {
        guard let client, !isClosed else {
            done(.failure(RPCError(.unavailable, "the guest agent is not connected (\(service)/\(method))")))
            return
        }
        client.unary(service: service, method: method, request, as: Resp.self, timeoutNS: timeoutNS,
                     metadata: [("containerd-namespace-ttrpc", namespace)], completion: done)
    }

    func task<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ method: String, _ request: Req, as: Resp.Type, done: @escaping (Result<Resp, RPCError>) -> Void) {
        call(Self.task, method, request, as: Resp.self, done: done)
    }

    func close() {
        isClosed = true
        client?.close()
        client = nil
    }
}
