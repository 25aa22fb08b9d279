import Testing
import Foundation
import SwiftProtobuf
@testable import Runtime

extension AllTests {
@Suite struct ProtoTests {
    /// The bytes containerd (Go, gogo/protobuf) writes for a CRI PodSandboxConfig,
    /// hand-assembled from the field numbers, decode into our generated type; and
    /// what we encode decodes back the same.
    @Test func podSandboxConfigRoundTrip() throws {
        var c = Runtime_V1_PodSandboxConfig()
        c.metadata.name = "nginx"
        c.metadata.uid = "u-1"
        c.metadata.namespace = "default"
        c.hostname = "nginx-host"
        c.logDirectory = "/var/log/pods/default_nginx_u-1"
        c.dnsConfig.servers = ["10.96.0.10"]
        c.dnsConfig.searches = ["svc.cluster.local"]
        c.labels = ["app": "nginx"]
        c.annotations = ["io.kubernetes.cri.sandbox-id": "abc"]
        c.linux.cgroupParent = "/kubepods/besteffort"
        c.linux.sysctls = ["net.ipv4.ip_forward": "1"]
        c.linux.securityContext.namespaceOptions.pid = .container
        c.linux.resources.memoryLimitInBytes = 256 << 20
        let bytes: [UInt8] = try c.serializedBytes()
        // metadata (field 1, length-delimited) comes first: tag 0x0a.
        #expect(bytes.first == 0x0A)
        let back = try Runtime_V1_PodSandboxConfig(serializedBytes: bytes)
        #expect(back == c)

        // As containerd sends it: inside an Any in ControllerCreateRequest.options.
        let any = try Google_Protobuf_Any(message: c, typePrefix: "type.googleapis.com")
        #expect(any.typeURL == "type.googleapis.com/runtime.v1.PodSandboxConfig")
        #expect(try Runtime_V1_PodSandboxConfig(unpackingAny: any).hostname == "nginx-host")
    }

    /// Task.Stats carries cgroup metrics as an Any whose type URL containerd's typeurl
    /// registry knows: io.containerd.cgroups.v1.Metrics.
    @Test func cgroupMetricsTypeURLs() throws {
        var m = Io_Containerd_Cgroups_V1_Metrics()
        m.memory.usage.usage = 1234
        m.pids.current = 3
        let any = try Google_Protobuf_Any(message: m, typePrefix: "")
        #expect(any.typeURL.hasSuffix("io.containerd.cgroups.v1.Metrics"))
        #expect(Io_Containerd_Cgroups_V2_Metrics.protoMessageName == "io.containerd.cgroups.v2.Metrics")
        #expect(try Io_Containerd_Cgroups_V1_Metrics(unpackingAny: any).memory.usage.usage == 1234)
    }
}
}
