#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarSystem
import KuasarWire

private let MS_NOSUID = UInt(Glibc.MS_NOSUID), MS_NODEV = UInt(Glibc.MS_NODEV), MS_NOEXEC = UInt(Glibc.MS_NOEXEC)

/// The agent's settings from the kernel command line (`kuasar.*` keys), so the host needs
/// no second channel to configure it:
///
/// | key | meaning | default |
/// |---|---|---|
/// | `kuasar.channel` | where to serve, comma-separated (`serial://agent`, `vsock://1024`) | `serial://agent,vsock://1024` |
/// | `kuasar.share` | the host share's mount tag | `kuasar` |
/// | `kuasar.share_type` | `9p` or `virtiofs` | `9p` |
/// | `kuasar.log` | log level (`trace` … `critical`) | `info` |
/// | `kuasar.hostname` | hostname before SetupSandbox | `kuasar` |
/// | `kuasar.debug` | `1`: extra logging of the boot | `0` |
/// | `kuasar.template` | `1`: a template's boot (saved, then cloned): no share until `Restored` | `0` |
public struct GuestSettings: Equatable, Sendable {
    public var channels: [String] = ["serial://agent", "vsock://\(AgentChannel.defaultVsockPort)"]
    public var shareTag = "kuasar"
    public var shareType = "9p"
    public var logLevel = "info"
    public var hostname = "kuasar"
    public var debug = false
    /// Booted to be saved as a VM template: the share is mounted only once a clone is
    /// told it was restored (a mounted 9p share blocks QEMU's save), and nothing is read
    /// that must differ per clone (boot_id, random bytes).
    public var template = false
    /// Keys it did not know (logged: a typo should not pass silently).
    public var unknown: [String] = []

    public init() {}

    /// Parsed as bytes, not Characters: PID 1 reads this before it serves, and under TCG
    /// each stdlib path run for the first time (grapheme breaking here) costs milliseconds.
    public init(cmdline: String) {
        let prefix = Array("kuasar.".utf8)
        let bytes = Array(cmdline.utf8)
        var i = 0
        // Words by hand: split(whereSeparator:) on the UTF-8 view stays generic (~0.7k
        // more instructions translated before the first answer).
        while i < bytes.count {
            let start = i
            while i < bytes.count && bytes[i] != 0x20 && bytes[i] != 0x0A && bytes[i] != 0x09 { i += 1 }
            let word = bytes[start..<i]
            i += 1
            guard word.starts(with: prefix) else { continue }
            let body = word.dropFirst(prefix.count)
            let eq = body.firstIndex(of: UInt8(ascii: "=")) ?? body.endIndex
            let valueBytes = body[min(eq + 1, body.endIndex)...]
            let key = String(decoding: body[..<eq], as: UTF8.self)
            let value = String(decoding: valueBytes, as: UTF8.self)
            switch key {
            case "channel": channels = valueBytes.split(separator: UInt8(ascii: ",")).map { String(decoding: $0, as: UTF8.self) }
            case "share": shareTag = value
            case "share_type": shareType = value
            case "log": logLevel = value
            case "hostname": hostname = value
            case "debug": debug = value == "1" || value == "true"
            case "template": template = value == "1" || value == "true"
            default: unknown.append(String(decoding: word, as: UTF8.self))
            }
        }
    }
}

/// What PID 1 of the guest does before it serves: the file systems, the modules the
/// channel and the share need, the share itself, the hostname. Every step is timed for
/// Check's boot breakdown; a failing step is logged and the agent serves anyway (PID 1
/// exiting would panic the kernel and lose the VM with every container in it).
public enum GuestInit {
    /// Where the host's share (bundles and rootfs) is mounted in the guest.
    public static let sharePath = "/run/kuasar/share"
    /// What the channels need, in the order they are loaded; each brings its
    /// dependencies from modules.dep first. The serial channel's (the image's
    /// `kuasar.boot`) load on the constructor's boot thread before the runtime starts;
    /// what else the settings use (a module costs ~10–20 ms under TCG) once that thread is
    /// done (`PendingBoot.finish`): the PCI transport only when the guest has virtio PCI
    /// devices, vsock only for a vsock channel; the share's modules once the channel
    /// serves (`finishBoot`), overlay on first use (`ensureModule`).
    public static func modules(for settings: GuestSettings) -> [String] {
        var m = ["virtio_mmio"]
        if hasVirtioPCI() { m.append("virtio_pci") }
        if settings.channels.contains(where: { $0.hasPrefix("serial://") }) { m.append("virtio_console") }
        if settings.channels.contains(where: { $0.hasPrefix("vsock://") }) { m.append("vmw_vsock_virtio_transport") }
        return m
    }

    /// What the share needs: virtio-fs, or 9p over virtio (five modules with their
    /// dependencies, ~60 ms under TCG — more than the rest of the init together).
    public static func shareModules(for settings: GuestSettings) -> [String] {
        settings.shareType == "virtiofs" ? ["virtiofs"] : ["9pnet_virtio", "9p"]
    }

    /// The boot's last steps, off the path to the first answer: the share's modules and
    /// the share (not in a template: it mounts the share when restored). The agent runs
    /// them once the channel serves — after its first answer, or before the first call
    /// that needs a bundle, whichever comes first. Returns their timings (ms) and whether
    /// the share is mounted. Once per boot: PID 1 serving again after its loop failed
    /// gets the first outcome, not a second 9p mount stacked on the share.
    public static func finishBoot(_ settings: GuestSettings, logger: Logger) -> (timings: [String: Double], shareMounted: Bool) {
        if let done = finished { return done }
        let done = finishBootOnce(settings, logger: logger)
        finished = done
        return done
    }

    /// PID 1 is one thread: its agent's loop is the only caller.
    nonisolated(unsafe) private static var finished: (timings: [String: Double], shareMounted: Bool)?

    private static func finishBootOnce(_ settings: GuestSettings, logger: Logger) -> (timings: [String: Double], shareMounted: Bool) {
        var timings: [String: Double] = [:]
        var t = MonotonicClock.nanoseconds()
        func lap(_ key: String) {
            let now = MonotonicClock.nanoseconds()
            timings[key] = Double(now - t) / 1e6
            t = now
        }
        if var mods = bootModules(logger: logger) { load(shareModules(for: settings), &mods, logger: logger) }
        lap("shareModules")
        var mounted = false
        do {
            try mountShare(settings)
            mounted = true
        } catch {
            logger.error("init: share: \(error)")
        }
        lap("share")
        return (timings, mounted)
    }

    /// The image's modules (its modules.dep), nil (logged) when it has none.
    static func bootModules(logger: Logger) -> KernelModules? {
        do { return try imageModules() } catch {
            logger.error("init: modules: \(error)")
            return nil
        }
    }

    /// The running kernel's modules.dep, parsed once (the boot, the share and each first
    /// use ask for it); each caller gets its own copy to load with.
    static func imageModules() throws(SystemError) -> KernelModules {
        if let parsed = parsedImageModules { return parsed }
        let parsed = try KernelModules(directory: "/lib/modules/" + kernelRelease())
        parsedImageModules = parsed
        return parsed
    }

    /// The agent's one thread (the loop; PID 1's init before it) is the only caller.
    nonisolated(unsafe) private static var parsedImageModules: KernelModules?

    /// Loads each of `names` (with its dependencies); a failure is logged and the others
    /// are loaded anyway.
    static func load(_ names: [String], _ mods: inout KernelModules, logger: Logger) {
        for m in names where mods.knows(m) {
            do { try mods.load(m) } catch { logger.error("init: module \(m): \(error)") }
        }
        logger.debug("init: loaded \(mods.loaded.joined(separator: " "))")
    }

    /// Whether a virtio device of this type (1: network) is on a transport already bound.
    static func hasVirtioDevice(id: Int) -> Bool {
        Files.list("/sys/bus/virtio/devices").contains { dev in
            Int(((try? Files.readString("/sys/bus/virtio/devices/\(dev)/device")) ?? "").trimmingWhitespace.dropFirst(2), radix: 16) == id
        }
    }

    /// Whether a PCI device of virtio's vendor (0x1af4) is present.
    static func hasVirtioPCI() -> Bool {
        Files.list("/sys/bus/pci/devices").contains { dev in
            ((try? Files.readString("/sys/bus/pci/devices/\(dev)/vendor")) ?? "").hasPrefix("0x1af4")
        }
    }

    /// What the guest needs soon but not to answer its host: the balloon driver, whose
    /// free page reporting hands freed RAM back (the host takes it back), loaded off the
    /// boot's critical path.
    public static func loadDeferredModules(logger: Logger) {
        guard hasVirtioDevice(id: 5) else { return }
        do { try ensureModule("virtio_balloon") } catch { logger.warning("init: module virtio_balloon: \(error); freed guest RAM stays with the VM") }
    }

    /// Loads a module (and what it needs) from the guest image when it is not loaded yet.
    /// The image's boot modules first, then the on-demand ones the host shares; a module
    /// in neither is taken to be built in.
    public static func ensureModule(_ name: String) throws {
        var boot = try imageModules()
        guard !boot.isLoaded(name) else { return }
        if boot.knows(name) {
            try boot.load(name)
            return
        }
        let shared = sharePath + "/" + AgentProtocol.modulesDirectory + "/" + kernelRelease()
        guard Files.exists(shared + "/modules.dep") else { return }
        var onDemand = try KernelModules(directory: shared)
        try onDemand.load(name)
    }

    public static func kernelRelease() -> String {
        var u = utsname()
        guard uname(&u) == 0 else { return "" }
        return withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }

    /// Milliseconds since the kernel started (CLOCK_BOOTTIME), for the breakdown.
    static func bootMS() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_BOOTTIME, &ts)
        return Double(ts.tv_sec) * 1000 + Double(ts.tv_nsec) / 1e6
    }

    struct Step {
        let what: String
        let run: () throws -> Void
    }

    /// Runs the early init; returns the settings, the boot breakdown (ms) and the boot's
    /// kernel work still under way. `kernel` is until the process started (its first C
    /// constructor); `mounts` the constructor's mounts (`early`) or this function's;
    /// `runtime` from there to the executable's first Swift statement (the Swift
    /// runtime's start, with exec's page faults and, under TCG, the first translation of
    /// that code); `main` from there to here; then each step.
    public static func run(logger: Logger, processStartBootNS: UInt64 = 0, mainStartBootNS: UInt64 = 0, early: EarlyBoot? = nil) -> (GuestSettings, [String: Double], PendingBoot) {
        let now = bootMS()
        let started = processStartBootNS > 0 ? Double(processStartBootNS) / 1e6 : now
        let mainAt = mainStartBootNS > 0 ? Double(mainStartBootNS) / 1e6 : started
        var timings: [String: Double] = ["kernel": started, "main": now - mainAt]
        var t = MonotonicClock.nanoseconds()
        func lap(_ key: String) {
            let now = MonotonicClock.nanoseconds()
            timings[key] = Double(now - t) / 1e6
            t = now
        }
        func attempt(_ what: String, _ body: () throws -> Void) {
            do { try body() } catch { logger.error("init: \(what): \(error)") }
        }
        if let early, early.mounted {
            // Done by the constructor, before the runtime started.
            for step in early.failures(.mount) + early.failures(.link) { logger.error("init: \(step)") }
            timings["mounts"] = early.source.summary(.mount).ms + early.source.summary(.link).ms
        } else {
            // The file systems are the constructor's (CAgentInit, linked into the guest
            // image's kuasar-agent only): without it this is PID 1 of something else — a
            // PID namespace with /proc already — whose mounts are not this one's to change.
            logger.warning("init: not mounting the guest's file systems: this binary is not the guest image's kuasar-agent")
        }
        timings["runtime"] = max(0, mainAt - started - (timings["mounts"] ?? 0))
        let settings = GuestSettings(cmdline: (try? Files.readString("/proc/cmdline")) ?? "")
        for key in settings.unknown { logger.warning("init: unknown kernel command line key \(key)") }
        attempt("hostname") {
            guard sethostname(settings.hostname, settings.hostname.utf8.count) == 0 else {
                throw SystemError("sethostname", settings.hostname, errno: Errno(rawValue: errno))
            }
        }
        lap("settings")
        timings["init"] = timings.filter { !["kernel", "runtime", "main"].contains($0.key) }.values.reduce(0, +)
        return (settings, timings, PendingBoot(early: early, settings: settings))
    }

    /// The boot's kernel work while it runs on the constructor's thread (`run`): the
    /// channel's modules, cgroup2, loopback. The agent waits for it before its container
    /// engine looks at the cgroups; `finish` then does what that thread did not.
    public final class PendingBoot: @unchecked Sendable {  // PID 1's one thread only
        let early: EarlyBoot?
        let settings: GuestSettings
        init(early: EarlyBoot?, settings: GuestSettings) {
            self.early = early
            self.settings = settings
        }

        /// Waits for the boot thread (its failures logged), then loads what else the
        /// settings need (the PCI transport, vsock, a template's share modules, a NIC's
        /// driver) and mounts cgroups or brings up loopback where the thread did not.
        /// Returns the thread's steps and this one's in ms — `bootWait` is how long it
        /// waited — once per boot.
        public func finish(logger: Logger) -> [String: Double] {
            guard !finished else { return [:] }
            finished = true
            var timings: [String: Double] = [:]
            var threadDid: Set<EarlyBoot.Step.Kind> = []
            var cgroup2Failed = false
            if let early {
                let (waitedMS, threadMS) = early.source.join()
                timings["bootWait"] = waitedMS
                timings["bootThread"] = threadMS
                for kind in [EarlyBoot.Step.Kind.module, .cgroup, .network] {
                    let (ms, failed) = early.source.summary(kind)
                    timings["\(kind)"] = ms
                    if ms > 0 || failed > 0 { threadDid.insert(kind) }
                    for step in early.failures(kind) {
                        if step.kind == .cgroup && step.what == "cgroup2" {
                            cgroup2Failed = true
                            // No cgroup2 in this kernel is no failure: v1 below.
                            if step.result == -ENODEV { threadDid.remove(.cgroup); continue }
                        }
                        logger.error("init: \(step)")
                    }
                }
            }
            var unified = threadDid.contains(.cgroup) && !cgroup2Failed
            var t = MonotonicClock.nanoseconds()
            func lap(_ key: String) {
                let now = MonotonicClock.nanoseconds()
                timings[key] = Double(now - t) / 1e6
                t = now
            }
            // What the thread did not load; modules.dep is read only when the kernel
            // lacks one of them (none for the serial channel on microvm).
            var mods: KernelModules?
            func load(_ names: [String]) {
                guard names.contains(where: { !KernelModules.isLoaded($0) }) else { return }
                if mods == nil { mods = GuestInit.bootModules(logger: logger) }
                if mods != nil { GuestInit.load(names, &mods!, logger: logger) }
            }
            load(GuestInit.modules(for: settings) + (settings.template ? GuestInit.shareModules(for: settings) : []))
            // A NIC shows once its transport's driver is loaded.
            if GuestInit.hasVirtioDevice(id: 1) { load(["virtio_net"]) }
            if !threadDid.contains(.cgroup) {
                do { unified = try GuestInit.mountCgroups() } catch { logger.error("init: cgroups: \(error)") }
            }
            // PID 1 in the root of the cgroup2 just mounted: what the engine would find
            // by parsing /proc/self/mountinfo, known without it.
            cgroups = unified ? CgroupHost.unified(at: "/sys/fs/cgroup") : nil
            // Loopback, for the pod's containers (they share the guest's network).
            if !threadDid.contains(.network) {
                do { try Network.setUp("lo") } catch { logger.error("init: lo: \(error)") }
            }
            lap("afterBoot")
            return timings
        }
        private var finished = false
        /// The guest's cgroups once `finish` mounted cgroup2 (nil: the engine looks).
        public private(set) var cgroups: CgroupHost?
    }

    /// The host's share at `sharePath` (at boot; a clone's once it was restored).
    public static func mountShare(_ settings: GuestSettings) throws {
        try makeDirectories(sharePath, mode: 0o755)
        if settings.shareType == "virtiofs" {
            try mount(settings.shareTag, sharePath, "virtiofs", MS_NOSUID | MS_NODEV)
        } else {
            try mount(settings.shareTag, sharePath, "9p", MS_NOSUID | MS_NODEV, "trans=virtio,version=9p2000.L,msize=524288,cache=mmap")
        }
    }

    private static func mount(_ source: String, _ target: String, _ type: String, _ flags: UInt, _ data: String? = nil) throws {
        try makeDirectories(target, mode: 0o755)
        try Mounts.mount(source: source, target: target, type: type, flags: flags, data: data)
    }

    /// cgroup v2 where the kernel has it (the container engine handles both); else v1's
    /// controllers, each on its own directory under a tmpfs.
    /// True when it is cgroup2, at /sys/fs/cgroup.
    @discardableResult
    static func mountCgroups() throws -> Bool {
        let fs = (try? Files.readString("/proc/filesystems")) ?? ""
        if fs.contains("cgroup2") {
            try mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, "nsdelegate")
            // Every controller the kernel offers, for the containers' cgroups below.
            let controllers = (try? Files.readString("/sys/fs/cgroup/cgroup.controllers")) ?? ""
            let enable = controllers.split(separator: " ").map { "+" + $0.filter { !$0.isWhitespace } }.joined(separator: " ")
            if !enable.isEmpty { try? Files.write("/sys/fs/cgroup/cgroup.subtree_control", enable) }
            return true
        }
        try mount("tmpfs", "/sys/fs/cgroup", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755")
        let lines = ((try? Files.readString("/proc/cgroups")) ?? "").split(separator: "\n").dropFirst()
        for line in lines {
            let f = line.split(separator: "\t")
            guard f.count >= 4, f[3] == "1" else { continue }
            let name = String(f[0])
            try mount("cgroup", "/sys/fs/cgroup/" + name, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, name)
        }
        return false
    }
}
