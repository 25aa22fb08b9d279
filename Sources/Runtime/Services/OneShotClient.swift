#if canImport(Glibc)
import Glibc
#endif
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer
import KuasarSandbox
import KuasarTasks

/// A ttrpc client with its own short-lived reactor, for tools that make a few calls and
/// exit (the shim binary, the CLI). The daemon itself never uses this.
public final class OneShotClient {
    public let reactor: Reactor
    let client: TTRPCClient

    /// `path` may carry containerd's `unix://` prefix.
    public init(path: String) throws {
        let path = path.hasPrefix("unix://") ? String(path.dropFirst(7)) : path
        reactor = try Reactor(backend: .epoll)
        do {
            client = try TTRPCClient.connect(reactor: reactor, path: path)
        } catch {
            reactor.close()
            throw error
        }
    }

    /// One unary call, waiting on our reactor for the answer (and running whatever else
    /// is registered on it meanwhile). A nil timeout waits as long as it takes (Wait).
    public func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ service: String, _ method: String, _ request: Req, as: Resp.Type, timeoutNS: UInt64? = 30_000_000_000,
        namespace: String? = nil
    ) throws -> Resp {
        var result: Result<Resp, RPCError>?
        let md = namespace.map { [("containerd-namespace-ttrpc", $0)] } ?? []
        client.unary(service: service, method: method, request, as: Resp.self, timeoutNS: timeoutNS, metadata: md) { result = $0 }
        _ = try reactor.run(until: { result != nil }, timeoutNS: (timeoutNS ?? 1 << 62) + 1_000_000_000)
        guard let result else { throw RPCError(.deadlineExceeded, "\(service)/\(method): no answer") }
        return try result.get()
    }

    public func close() {
        client.close()
        reactor.close()
    }
}
