#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem
import KuasarWire
import KuasarReactor

/// What a VMM driver is asked to run: one microVM per pod, described without any one
/// VMM's vocabulary. The driver turns it into its command line or API calls.
public struct VMSpec: Sendable, Equatable {
    public var id: String
    /// The sandbox's state directory: sockets, console.log, the VMM's own log.
    public var stateDir: String
    public var kernel: String
    public var initrd: String
    /// Kernel command-line words after the driver's own (`kuasar.*` settings).
    public var kernelArgs: [String] = []
    public var memoryMiB: UInt32
    public var vcpus: UInt32
    public var accelerator: Accelerator
    /// The host directory exported to the guest (9p), and its tag.
    public var sharePath: String
    public var shareTag = "kuasar"
    /// The guest's NICs: a tap device's fd each, and the MAC the NIC takes (none: no NIC).
    public var nics: [NIC] = []
    /// A template's boot or a clone's: see `Snapshot`. nil: an ordinary cold boot.
    public var snapshot: Snapshot?

    /// A VM that is saved as a template (`.template`) or restored from one (`.clone`).
    /// Both have the same devices, so the saved device state fits: the template's NIC
    /// slots (a pod's taps fill the first ones, the rest have no backend), no free page
    /// reporting (a clone's would punch holes in the memory file every clone maps), and
    /// the guest's RAM in `memoryFile` — shared and written by the template's VMM, a
    /// private copy-on-write view for a clone's.
    public struct Snapshot: Sendable, Equatable {
        public enum Role: Sendable, Equatable {
            case template
            /// The device state the template's VMM saved.
            case clone(state: String)
        }
        public var role: Role
        public var memoryFile: String
        public var nicSlots: Int
        public init(role: Role, memoryFile: String, nicSlots: Int) {
            self.role = role
            self.memoryFile = memoryFile
            self.nicSlots = nicSlots
        }

        /// The MAC of a template's NIC slot `i` (locally administered); a clone's agent
        /// gives each NIC the pod's.
        public static func nicMAC(_ i: Int) -> String {
            let h = String(i + 1, radix: 16)
            return "02:6b:74:00:00:" + (h.count < 2 ? "0" + h : h)
        }
    }

    public struct NIC: Sendable, Equatable {
        public var tapFD: Int32
        public var mac: String
        public init(tapFD: Int32, mac: String) {
            self.tapFD = tapFD
            self.mac = mac
        }
    }

    /// The host end of the agent's channel (the VMM listens on it), the console's, QMP's.
    public var agentSocket: String { stateDir + "/agent.sock" }
    public var consoleSocket: String { stateDir + "/console.sock" }
    public var controlSocket: String { stateDir + "/qmp.sock" }
    public var consoleLog: String { stateDir + "/console.log" }
    public var vmmLog: String { stateDir + "/vmm.log" }

    public init(id: String, stateDir: String, kernel: String, initrd: String, memoryMiB: UInt32, vcpus: UInt32, accelerator: Accelerator, sharePath: String) {
        self.id = id
        self.stateDir = stateDir
        self.kernel = kernel
        self.initrd = initrd
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.accelerator = accelerator
        self.sharePath = sharePath
    }
}

public enum Accelerator: String, Sendable, Equatable {
    case kvm, tcg

    /// What `[vm] accelerator` ("auto", "kvm", "tcg") gives, and why.
    public static func chosen(by setting: String) -> (Accelerator, why: String) {
        switch setting {
        case "kvm": return (.kvm, "[vm] accelerator = \"kvm\"")
        case "tcg": return (.tcg, "[vm] accelerator = \"tcg\"")
        default: return probed
        }
    }

    /// KVM when the probe guest ran under it, else TCG; `why` says which and why.
    public static func decide(_ probe: (ran: Bool, detail: String)) -> (Accelerator, why: String) {
        guard probe.ran else { return (.tcg, "KVM unusable (\(probe.detail)): TCG, emulated and many times slower") }
        // A para-virtualised KVM (PVM, this host being a guest itself) runs our real-mode
        // test guest, but not an ordinary kernel: QEMU aborts or never reaches /init.
        if KVMProbe.isPVM {
            return (.tcg, "/dev/kvm is PVM (kvm_pvm loaded), which runs only PVM-enabled guest kernels: TCG, emulated and many times slower")
        }
        return (.kvm, "KVM works (\(probe.detail))")
    }

    /// Probed once per process, waiting for the probe (the CLI; the daemon probes on its loop).
    public static let probed: (Accelerator, why: String) = decide(KVMProbe.run())
}

/// A running VM as its driver sees it.
public protocol VirtualMachine: AnyObject {
    var pid: pid_t { get }
    /// The process's start time (from /proc), to recognise it after a daemon restart.
    var startTime: UInt64 { get }
    var accelerator: Accelerator { get }
    /// Runs once, when the VMM process has exited (with its status; nil when it was not
    /// our child and its status is unknown).
    var onExit: ((ExitStatus?) -> Void)? { get set }
    var hasExited: Bool { get }

    /// Runs when the guest opens the agent's port (at once if it has), for VMMs that can
    /// tell; others never call it and the host's tries find the agent anyway.
    var onAgentPortOpen: (() -> Void)? { get set }

    /// The VMM's own view (QMP query-status: "running", "paused", "shutdown", …).
    func status(_ done: @escaping (Result<String, RPCError>) -> Void)
    /// Asks the guest to power off (ACPI), then ends the VMM (quit, then SIGKILL) once
    /// `timeoutNS` has passed; `done` once the process is gone.
    func stop(timeoutNS: UInt64, done: @escaping () -> Void)
    /// SIGKILL to the VMM at once.
    func kill()
    /// Whether disks can be attached while it runs (q35's PCIe root ports; a microvm's
    /// virtio-mmio cannot).
    var canHotplugDisks: Bool { get }
    /// Attaches a host block device or image file as a virtio disk (`id` names it for
    /// removal and is its serial, how the guest finds it); `done` once the guest was offered it.
    func hotplugDisk(id: String, path: String, readOnly: Bool, done: @escaping (Result<Void, RPCError>) -> Void)
    func unplugDisk(id: String, done: @escaping (Result<Void, RPCError>) -> Void)
    /// Pauses the guest and saves its device state (without the shared RAM) to `path`:
    /// a template's VM, once its agent answered. The VM stays paused.
    func saveState(to path: String, done: @escaping (Result<Void, RPCError>) -> Void)
    /// The VMM's version as the running VM reports it (QMP's greeting for QEMU).
    var vmmVersion: String { get }
    /// The end of what the VMM printed itself (its stderr), for errors.
    var vmmLogTail: String { get }
    /// What a new daemon needs to find the VM again (strings: kept in the state file).
    var persistentState: [String: String] { get }
    /// Stops reading its sockets (the daemon is exiting and leaves the VM running).
    func detach()
}

/// One VMM (QEMU first; Cloud Hypervisor and StratoVirt behind the same protocol).
public protocol Hypervisor: AnyObject {
    var name: String { get }
    /// What a VM template made with this VMM depends on (its binary, machine type): part
    /// of every template's key.
    var templateIdentity: String { get }
    /// Why no VM can be launched with it (binary missing), nil when it can.
    var unavailableReason: String? { get }
    /// Starts the VMM and answers once its control socket works (the guest is booting).
    /// `spawned` gets the VMM's `persistentState` as soon as its process exists (before
    /// its control socket answers), so a daemon that dies while it boots leaves a record.
    /// Kills the VMM a `persistentState` names if it still runs (checked by pid and start
    /// time, never a stranger that reused the pid); its pid, nil when it is gone.
    func kill(recorded state: [String: String], exits: ExitRecords) -> pid_t?
    /// A clone (`spec.snapshot` role `.clone`) answers once its state is restored and it runs.
    func launch(_ spec: VMSpec, spawned: @escaping ([String: String]) -> Void, done: @escaping (Result<VirtualMachine, RPCError>) -> Void)
    /// After a daemon restart: the VM `state` names, if its process is still the one
    /// that was started (pid and start time), with its control socket and console again.
    func recover(_ spec: VMSpec, state: [String: String], exits: ExitRecords, done: @escaping (Result<VirtualMachine, RPCError>) -> Void)
}
