import Foundation
import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct ContainerEngineTests {
    /// Runs a container from `bundle` to its exit; returns (status, stdout).
    func runContainer(_ bundle: TestBundle, reactor: Reactor, cgroup: String? = nil) throws -> (ExitStatus?, String, ContainerError?) {
        let supervisor = ProcessSupervisor(reactor: reactor)
        let engine = try ContainerEngine(reactor: reactor, supervisor: supervisor)
        let out = bundle.path + "/stdout"
        unlink(out)
        var container: Container?
        var failure: ContainerError?
        var status: ExitStatus?
        let spec = try bundle.spec()
        Container.create(id: "c1", bundle: bundle.path, spec: spec, rootfs: bundle.rootfs,
                         stdio: StdioPaths(stdout: "file://" + out, stderr: "file://" + out),
                         cgroupPath: cgroup, engine: engine) { result in
            switch result {
            case .success(let c): container = c
            case .failure(let e): failure = e
            }
        }
        try spin(reactor, "create") { container != nil || failure != nil }
        if let failure {
            try spin(reactor, "children reaped") { supervisor.runningCount == 0 }
            return (nil, "", failure)
        }
        var started = false
        container!.start { r in
            if case .failure(let e) = r { failure = e }
            started = true
        }
        try spin(reactor, "start") { started }
        container!.initProcess.wait { s, _ in status = s }
        try spin(reactor, "exit") { status != nil }
        container!.destroy()
        try spin(reactor, "children reaped") { supervisor.runningCount == 0 }
        let text = (try? Files.readString(out)) ?? ""
        return (status, text, failure)
    }

    @Test func runcSpecBundleRunsWithItsNamespacesAndHostname() throws {
        let bundle = try TestBundle("basic")
        defer { bundle.remove() }
        try bundle.setProcess(args: ["sh", "-c", "echo hello; hostname; echo pid=$$; cat /proc/self/status | grep CapEff; exit 3"])
        let fdsBefore = openFDCount()
        try withReactor(.epoll) { reactor in
            let (status, out, err) = try runContainer(bundle, reactor: reactor, cgroup: "kuasar-test/basic")
            #expect(err == nil, "\(String(describing: err))")
            #expect(status == .exited(3))
            #expect(out.contains("hello\nrunc\npid=1\n"), "stdout: \(out)")
            // runc spec grants CAP_AUDIT_WRITE, CAP_KILL, CAP_NET_BIND_SERVICE: bits 29, 5, 10.
            #expect(out.contains("CapEff:\t0000000020000420"), "stdout: \(out)")
        }
        #expect(openFDCount() == fdsBefore)
        #expect(mountsUnder(bundle.path).isEmpty, "mounts left: \(mountsUnder(bundle.path))")
    }
}
}
