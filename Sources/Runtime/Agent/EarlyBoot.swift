#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem

/// What the guest agent's first C constructor did before the Swift runtime started (PID 1
/// of a fresh initramfs: the mounts, then the channel's modules, cgroup2 and loopback on a
/// thread of its own), handed in by the executable that links that constructor
/// (`kuasar-agent`; Sources/CAgentInit says why it is C). Read as totals and failures:
/// the steps themselves become Swift values only when one failed or is needed by name.
public struct EarlyBoot {
    public struct Step: CustomStringConvertible, Sendable {
        /// The C side's KS_BOOT_* values (CAgentInit.h; a test holds them equal): this
        /// module does not link CAgentInit, whose constructor belongs to PID 1's binary only.
        public enum Kind: Int32, Sendable, CustomStringConvertible {
            case mount = 1, module = 2, cgroup = 3, network = 4, link = 5
            /// The boot breakdown's name for the kind's total.
            public var description: String {
                switch self {
                case .mount: "mounts"
                case .module: "modules"
                case .cgroup: "cgroups"
                case .network: "lo"
                case .link: "links"
                }
            }
        }
        public let kind: Kind
        /// A mount point or link, a module's path under the modules directory, "cgroup2",
        /// "cgroup.subtree_control", "lo".
        public let what: String
        /// 0, or -errno.
        public let result: Int32
        public let ms: Double

        public init(kind: Kind, what: String, result: Int32, ms: Double) {
            self.kind = kind
            self.what = what
            self.result = result
            self.ms = ms
        }

        public var description: String {
            let call = switch kind {
            case .mount: "mount"
            case .link: "symlink"
            case .module: "finit_module"
            case .cgroup: what == "cgroup2" ? "mount" : "write"
            case .network: "SIOCSIFFLAGS"
            }
            return result == 0 ? "\(call)(\"\(what)\"): ok" : "\(SystemError(call, what, errno: Errno(rawValue: -result)))"
        }
    }

    /// What the early boot can tell, from the C side.
    public struct Source {
        /// The total time (ms) of the steps of a kind readable now, and how many failed.
        public let summary: (Step.Kind) -> (ms: Double, failed: Int)
        /// The steps readable now (the mounts at once; the thread's once joined).
        public let steps: () -> [Step]
        /// Joins the boot thread: how long the caller waited and the thread's own time, ms.
        public let join: () -> (waitedMS: Double, threadMS: Double)

        public init(summary: @escaping (Step.Kind) -> (ms: Double, failed: Int), steps: @escaping () -> [Step],
                    join: @escaping () -> (waitedMS: Double, threadMS: Double)) {
            self.summary = summary
            self.steps = steps
            self.join = join
        }
    }

    /// Whether the constructor mounted the guest's file systems and started the boot
    /// thread; false elsewhere (a process with /proc: nothing was done).
    public let mounted: Bool
    public let source: Source

    public init(mounted: Bool, source: Source) {
        self.mounted = mounted
        self.source = source
    }

    /// The steps of `kind` that failed (read only when some did).
    public func failures(_ kind: Step.Kind) -> [Step] {
        source.summary(kind).failed == 0 ? [] : source.steps().filter { $0.kind == kind && $0.result != 0 }
    }
}
