import Foundation
import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// grpc.health.v1 on the API socket, driven by grpcio with the standard health stubs (as
/// grpc_health_probe and Kubernetes' gRPC probes call it).
extension AllTests {
@Suite struct HealthTests {
    @Test func grpcioHealthStubsCheckAndWatch() throws {
        let wheel = try healthCheckingWheel()
        let root = "/tmp/kuasar-health-\(getpid())"
        Files.removeTree(root)
        defer { Files.removeTree(root) }
        let socket = root + "/kuasar.sock"
        let daemon = try AllTests.DaemonTests.start(["--root", root], socket: socket)
        #expect(AllTests.DaemonTests.waitForSocket(socket))
        let env = ["PYTHONPATH=\(wheel)", "PATH=/usr/bin:/bin"]
        func probe(_ args: String) throws -> String {
            let r = try shell("\(systemPython) \(repositoryRoot)/Tests/Peers/python/health_probe.py \(socket) \(args)", env: env)
            return r.out.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(try probe("check ''") == "SERVING")
        #expect(try probe("check containerd.services.sandbox.v1.Controller") == "SERVING")
        #expect(try probe("check grpc.health.v1.Health") == "SERVING")
        let unknown = try probe("check no.such.Service")
        #expect(unknown.hasPrefix("NOT_FOUND") && unknown.contains("no.such.Service"), "\(unknown)")
        #expect(try probe("watch no.such.Service 1") == "SERVICE_UNKNOWN\nEND OK")

        // A watch hears the daemon stop: SERVING, then NOT_SERVING, then the stream ends.
        let out = root + "-watch.out"
        defer { unlink(out) }
        var spec = ProcessSpec(executable: systemPython, arguments: [systemPython, "\(repositoryRoot)/Tests/Peers/python/health_probe.py", socket, "watch", "", "5"],
                               environment: env)
        let fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        spec.fdMap = [(from: fd, to: 1), (from: fd, to: 2)]
        let watcher = try Spawner.spawn(spec)
        close(fd)
        #expect(waitUntil { ((try? Files.readString(out)) ?? "").contains("SERVING") }, "no first status")
        let (status, log) = try AllTests.DaemonTests.stop(daemon)
        #expect(status == .exited(0), "\(log)")
        #expect(try Spawner.wait(watcher) == .exited(0))
        let lines = ((try? Files.readString(out)) ?? "").split(separator: "\n").map(String.init)
        #expect(lines.first == "SERVING" && lines.contains("NOT_SERVING") && lines.last?.hasPrefix("END") == true, "\(lines)")
    }
}
}
