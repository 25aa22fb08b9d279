#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarHostWire
import KuasarGRPC
import KuasarContainer
import KuasarSandbox
import KuasarTasks

/// The standard gRPC health service (`grpc.health.v1.Health`) on the API socket, as
/// grpc_health_probe, grpcurl and Kubernetes' gRPC probes call it. Services: "" (the
/// daemon as a whole), the sandbox Controller, and the health service itself; any other
/// name is NOT_FOUND to Check and SERVICE_UNKNOWN to Watch, as the protocol says.
/// Watch answers the current status at once and again on every change; a daemon that
/// is stopping answers NOT_SERVING and ends its watches.
public final class HealthService {
    public static let service = "grpc.health.v1.Health"
    public typealias Status = Grpc_Health_V1_HealthCheckResponse.ServingStatus

    private var statuses: [String: Status]
    private var watchers: [Int: (service: String, call: GRPCServerCall)] = [:]
    private var nextWatcher = 0

    public init(services: [String]) {
        statuses = Dictionary(uniqueKeysWithValues: ([""] + services + [Self.service]).map { ($0, Status.serving) })
    }

    public func register(on server: GRPCServer) {
        server.registerUnary(service: Self.service, method: "Check") { [unowned self] (call: GRPCServerCall, r: Grpc_Health_V1_HealthCheckRequest) in
            guard let status = self.statuses[r.service] else {
                throw RPCError(.notFound, "unknown service \"\(r.service.prefix(128))\": this daemon serves \(self.statuses.keys.sorted().map { "\"\($0)\"" }.joined(separator: ", "))")
            }
            call.respond(Self.response(status))
        }
        server.registerUnary(service: Self.service, method: "Watch") { [unowned self] (call: GRPCServerCall, r: Grpc_Health_V1_HealthCheckRequest) in
            call.send(Self.response(self.statuses[r.service] ?? .serviceUnknown))
            let token = self.nextWatcher
            self.nextWatcher += 1
            self.watchers[token] = (r.service, call)
            call.onCancel = { [weak self] _ in self?.watchers.removeValue(forKey: token) }
        }
    }

    /// Sets a service's status and tells its watchers when it changed.
    public func set(_ service: String, _ status: Status) {
        guard statuses[service] != status else { return }
        statuses[service] = status
        for (_, w) in watchers where w.service == service { w.call.send(Self.response(status)) }
    }

    /// The daemon is stopping: everything is NOT_SERVING, and the watches end.
    public func shutdown() {
        for name in Array(statuses.keys) { set(name, .notServing) }
        let all = watchers
        watchers.removeAll()
        for (_, w) in all where !w.call.isFinished { w.call.finish() }
    }

    static func response(_ status: Status) -> Grpc_Health_V1_HealthCheckResponse {
        var r = Grpc_Health_V1_HealthCheckResponse()
        r.status = status
        return r
    }
}

/// `kuasar health` and tests: a blocking grpc.health.v1 Check on the API socket, with
/// the daemon's details from its admin socket when that is reachable (it is 0600).
public enum HealthProbe {
    public static func check(socketPath: String, service: String = "") throws -> HealthService.Status {
        let client = try GRPCClient(path: socketPath)
        defer { client.close() }
        var r = Grpc_Health_V1_HealthCheckRequest()
        r.service = service
        return try client.call(HealthService.service, "Check", r, as: Grpc_Health_V1_HealthCheckResponse.self).status
    }

    /// "ok serving version=… reactor=… uptime_ms=… sandboxes=… containers=… pid=…", or
    /// "not-serving …"; the admin socket defaults to the one beside the API socket.
    public static func query(socketPath: String, adminSocketPath: String? = nil) throws -> String {
        let status = try check(socketPath: socketPath)
        var line = status == .serving ? "ok serving" : "not-serving status=\(status)"
        var config = KuasarConfig()
        config.socket = socketPath
        if let admin = try? OneShotClient(path: adminSocketPath ?? config.adminSocketPath) {
            defer { admin.close() }
            if let h = try? admin.call(AdminService.service, "Health", Kuasar_Admin_V1_HealthRequest(), as: Kuasar_Admin_V1_HealthResponse.self) {
                line += " version=\(h.version) reactor=\(h.reactor) uptime_ms=\(h.uptimeMs) sandboxes=\(h.sandboxes) containers=\(h.containers) pid=\(h.pid)"
            }
        }
        return line
    }
}
