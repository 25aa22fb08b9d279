#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KuasarOCI
import KuasarSystem
import KuasarReactor

/// What this engine supports, as the OCI runtime-spec's features document (features.md,
/// the JSON `runc features` prints): containerd 2.x reads it from `-info` to decide, for
/// instance, whether recursive read-only mounts can be asked for. Built from the same
/// tables the engine uses, so it cannot claim more than the engine does.
public enum RuntimeFeatures {
    public static let typeURL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"

    public static func document(cgroups: CgroupHost?) -> [String: Any] {
        var mountOptions = Array(MountOptions.flags.keys) + Array(MountOptions.propagations.keys)
        if Mounts.haveMountSetattr { mountOptions.append("rro") }
        let linux: [String: Any] = [
            "namespaces": NamespaceFlag.flags.keys.sorted(),
            "capabilities": CapabilityNames.names,
            "cgroup": ["v1": cgroups?.mode == .v1, "v2": cgroups?.mode == .v2, "systemd": false, "systemdUser": false, "rdma": false],
            "seccomp": ["enabled": true, "actions": SeccompNames.actions.keys.sorted(), "operators": SeccompNames.operators.keys.sorted(),
                        "archs": SeccompNames.arches.keys.sorted(),
                        "knownFlags": [String](), "supportedFlags": [String]()],
            "apparmor": ["enabled": false],
            "selinux": ["enabled": false],
            "intelRdt": ["enabled": false],
            "mountExtensions": ["idmap": ["enabled": false]],
        ]
        return [
            "ociVersionMin": "1.0.0",
            "ociVersionMax": "1.3.0",
            "hooks": HookPhase.allCases.map(\.rawValue),
            "mountOptions": mountOptions.sorted(),
            "linux": linux,
            "annotations": [
                "io.github.seccomp.libseccomp.version": HostInfo.seccompVersion,
            ],
        ]
    }

    public static func json(cgroups: CgroupHost?) -> Data {
        Data(JSONWriter.bytes(document(cgroups: cgroups)))
    }
}
