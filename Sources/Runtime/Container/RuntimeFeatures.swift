#if canImport(Glibc)
import Glibc
#endif
import CShims
import Foundation

/// What this engine supports, as the OCI runtime-spec's features document (features.md,
/// the JSON `runc features` prints): containerd 2.x reads it from `-info` to decide, for
/// instance, whether recursive read-only mounts can be asked for. Built from the same
/// tables the engine uses, so it cannot claim more than the engine does.
public enum RuntimeFeatures {
    public static let typeURL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"

    public static func document(cgroups: CgroupHost?) -> [String: Any] {
        var mountOptions = ["defaults", "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async",
                            "dirsync", "mand", "nomand", "noatime", "atime", "nodiratime", "diratime", "relatime",
                            "norelatime", "strictatime", "bind", "rbind", "remount", "silent", "loud",
                            "private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable"]
        if ks_have_mount_setattr() != 0 { mountOptions.append("rro") }
        let arches = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM",
                      "SCMP_ARCH_RISCV64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390X"].filter { SeccompNames.arch($0) != nil }
        let actions = ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
                       "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"].filter { SeccompNames.action($0, errno: nil) != nil }
        let operators = ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ",
                         "SCMP_CMP_NE"].filter { SeccompNames.op($0) != nil }
        let linux: [String: Any] = [
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"],
            "capabilities": CapabilityNames.names,
            "cgroup": ["v1": cgroups?.mode == .v1, "v2": cgroups?.mode == .v2, "systemd": false, "systemdUser": false, "rdma": false],
            "seccomp": ["enabled": true, "actions": actions, "operators": operators, "archs": arches,
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
            "mountOptions": mountOptions,
            "linux": linux,
            "annotations": [
                "io.github.seccomp.libseccomp.version": HostInfo.seccompVersion,
            ],
        ]
    }

    public static func json(cgroups: CgroupHost?) -> Data {
        (try? JSONSerialization.data(withJSONObject: document(cgroups: cgroups), options: [.sortedKeys])) ?? Data()
    }
}
