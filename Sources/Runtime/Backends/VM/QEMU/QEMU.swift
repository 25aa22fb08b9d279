#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarHostWire
import KuasarSandbox

/// The QEMU driver: a `microvm` (virtio-mmio devices, the PVH `vmlinux`) on x86-64, or a
/// `q35` machine with virtio PCI devices; no default devices, QEMU's own seccomp filter
/// (`-sandbox on`). The process is the daemon's child, watched by pidfd; QMP, the serial
/// console and the agent's virtio-serial port are unix sockets QEMU listens on, so a new
/// daemon can connect to them again after a restart.
public final class QEMU: Hypervisor {
    public enum Machine: String, Sendable, CaseIterable { case microvm, q35 }

    public let name = "qemu"
    public let binary: String
    public let machine: Machine
    let supervisor: ProcessSupervisor
    let reactor: Reactor
    let logger: Logger
    /// From QEMU start to its first QMP answer.
    public var controlTimeoutNS: UInt64 = 10_000_000_000

    public init(binary: String, machine: Machine, supervisor: ProcessSupervisor, reactor: Reactor, logger: Logger) {
        self.binary = binary
        self.machine = machine
        self.supervisor = supervisor
        self.reactor = reactor
        self.logger = logger
    }

    public var unavailableReason: String? { Self.unavailableReason(binary: binary) }

    /// The binary (path, and what changes when it is replaced or upgraded) and the machine.
    public var templateIdentity: String { "vmm qemu \(binary) \(Files.fingerprint(binary) ?? "missing") machine \(machine.rawValue)" }

    public static func unavailableReason(binary: String) -> String? {
        access(binary, X_OK) == 0 ? nil : "QEMU: \(binary) is not an executable file (Debian: apt-get install qemu-system-x86)"
    }

    /// The host's TSC rate in kHz: the guest kernel is told it (calibrating under TCG
    /// takes seconds, or never ends).
    /// PCIe root ports a q35 VM gets for hot-plugged disks: that many block rootfs at once.
    static let hotplugPorts = 8

    static let hostKHz: Int = {
        let info = (try? Files.readString("/proc/cpuinfo")) ?? ""
        for line in info.split(separator: "\n") where line.hasPrefix("cpu MHz") {
            if let v = Double(line.split(separator: ":").last.map { String($0).trimmingWhitespace } ?? "") { return Int(v * 1000) }
        }
        return 2_000_000
    }()

    /// The guest kernel's command line: what boots fastest here (../shared/MACHINE.md),
    /// the agent's channel, then the spec's own words.
    public static func kernelCommandLine(_ spec: VMSpec) -> String {
        let khz = hostKHz
        let base = ["console=ttyS0", "quiet", "panic=-1", "tsc_early_khz=\(khz)", "lpj=\(khz * 1000 / 250)", "init_on_alloc=0",
                    "cryptomgr.notests=1", "mitigations=off", "loglevel=0", "nokaslr", "no_timer_check", "tsc=reliable",
                    "lsm=capability", "audit=0", "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,load_system_certificate_list",
                    // The CPU's RDRAND seeds the guest's CRNG at once (the agent's runtime
                    // otherwise waits ~1 s for entropy at start).
                    "random.trust_cpu=on", "kuasar.channel=serial://agent", "kuasar.share=\(spec.shareTag)"]
        // A template (and so each clone) boots without mounting the share.
        let template = spec.snapshot == nil ? [] : ["kuasar.template=1"]
        return (base + template + spec.kernelArgs).joined(separator: " ")
    }

    /// QEMU's argv for `spec` (argv[0] included). A comma in a path is doubled, as QEMU's
    /// option syntax wants.
    public func arguments(_ spec: VMSpec) -> [String] { Self.arguments(binary: binary, machine: machine, spec) }

    public static func arguments(binary: String, machine: Machine, _ spec: VMSpec) -> [String] {
        func esc(_ s: String) -> String { s.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,") }
        let pci = machine == .q35
        let snap = spec.snapshot
        var a = [binary, "-name", "kuasar-\(spec.id)"]
        let ram = snap == nil ? "" : ",memory-backend=ram"
        switch machine {
        case .microvm: a += ["-M", "microvm,pic=off,pit=off" + ram]
        case .q35: a += ["-M", "q35" + ram]
        }
        if let snap {
            // The template's VMM writes the guest's RAM into the file (share=on); a clone
            // maps it privately (share=off): its writes never reach the file.
            a += ["-object", "memory-backend-file,id=ram,size=\(spec.memoryMiB)M,mem-path=\(esc(snap.memoryFile)),share=\(snap.role == .template ? "on" : "off")"]
        }
        a += ["-accel", spec.accelerator.rawValue,
              "-cpu", spec.accelerator == .kvm ? "host" : "qemu64,+rdrand",
              "-m", String(spec.memoryMiB), "-smp", String(spec.vcpus),
              "-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
              "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
              "-kernel", spec.kernel, "-initrd", spec.initrd, "-append", kernelCommandLine(spec),
              "-chardev", "socket,id=con,path=\(esc(spec.consoleSocket)),server=on,wait=off", "-serial", "chardev:con",
              "-chardev", "socket,id=agent,path=\(esc(spec.agentSocket)),server=on,wait=off",
              "-device", pci ? "virtio-serial-pci,id=vser" : "virtio-serial-device,id=vser",
              "-device", "virtserialport,chardev=agent,name=agent,id=agentport",
              "-fsdev", "local,id=share,path=\(esc(spec.sharePath)),security_model=passthrough,multidevs=remap",
              "-device", (pci ? "virtio-9p-pci" : "virtio-9p-device") + ",fsdev=share,mount_tag=\(spec.shareTag)",
              // Free page reporting: the guest hands back the RAM it freed (the initramfs
              // image once unpacked, boot-time memory, a container's exited processes), and
              // QEMU drops those pages, so a pod costs the host what its guest uses now.
              // Not for templates and clones: QEMU 7.2 punches the holes into the memory
              // file even when the mapping is private, under every clone of it.
              "-device", (pci ? "virtio-balloon-pci" : "virtio-balloon-device") + (snap == nil ? ",free-page-reporting=on" : "")]
        for i in 0..<max(spec.nics.count, snap?.nicSlots ?? 0) {
            if i < spec.nics.count {
                // The taps' fds are the child's fds 3, 4, ... (see launch).
                a += ["-netdev", "tap,id=net\(i),fd=\(3 + i)"]
            } else {
                // A template's NIC slot this pod does not use: no backend (a hub of its own).
                a += ["-netdev", "hubport,id=net\(i),hubid=\(i)"]
            }
            // A clone's NICs keep the template's MACs (the saved state has them); the agent
            // gives each the pod's.
            let mac = snap == nil ? spec.nics[i].mac : VMSpec.Snapshot.nicMAC(i)
            a += ["-device", (pci ? "virtio-net-pci" : "virtio-net-device") + ",netdev=net\(i),mac=\(mac)"]
        }
        if pci {
            // Hot-plugged disks (a container's block rootfs each) need a free PCIe slot.
            for i in 0..<Self.hotplugPorts { a += ["-device", "pcie-root-port,id=hotplug\(i),chassis=\(i + 1),slot=\(i + 1)"] }
        }
        if case .clone = snap?.role {
            // Restored over QMP once x-ignore-shared is set (see QEMUMachine.restore).
            a += ["-incoming", "defer"]
        }
        a += ["-qmp", "unix:\(esc(spec.controlSocket)),server=on,wait=off"]
        return a
    }

    public func launch(_ spec: VMSpec, spawned: @escaping ([String: String]) -> Void, done: @escaping (Result<VirtualMachine, RPCError>) -> Void) {
        for path in [spec.kernel, spec.initrd] where access(path, R_OK) != 0 {
            done(.failure(RPCError(.failedPrecondition, "sandbox \(spec.id): guest image file \(path) is missing or unreadable (make guest builds it)")))
            return
        }
        for socket in [spec.agentSocket, spec.consoleSocket, spec.controlSocket] { _ = unlink(socket) }
        let vm: QEMUMachine
        do {
            let log = try sys("open", spec.vmmLog) { open(spec.vmmLog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
            defer { _ = close(log) }
            let null = try sys("open", "/dev/null") { open("/dev/null", O_RDONLY | O_CLOEXEC) }
            defer { _ = close(null) }
            var fdMap: [(from: Int32, to: Int32)] = [(null, 0), (log, 1), (log, 2)]
            for (i, nic) in spec.nics.enumerated() { fdMap.append((nic.tapFD, Int32(3 + i))) }
            var stateFD: Int32 = -1
            if case .clone(let state) = spec.snapshot?.role {
                stateFD = try sys("open", state) { open(state, O_RDONLY | O_CLOEXEC) }
                fdMap.append((stateFD, Int32(3 + spec.nics.count)))
            }
            defer { if stateFD >= 0 { _ = close(stateFD) } }
            var p = ProcessSpec(executable: binary, arguments: arguments(spec), environment: ["PATH=/usr/bin:/bin"], workingDirectory: spec.stateDir, fdMap: fdMap)
            // Its own session: a signal to the daemon's process group never reaches it.
            p.newSession = true
            vm = QEMUMachine(spec: spec, driver: self)
            let pid = try supervisor.spawn(p) { [weak vm] status in vm?.exited(status) }
            vm.pid = pid
            vm.startTime = ExitRecords.startTime(of: pid)
        } catch {
            done(.failure(RPCError(.internal, "sandbox \(spec.id): start \(binary): \(error)")))
            return
        }
        logger.info("sandbox \(spec.id): QEMU started, pid \(vm.pid), \(spec.accelerator.rawValue), \(spec.vcpus) vCPU, \(spec.memoryMiB) MiB")
        spawned(vm.persistentState)
        vm.attach(deadline: MonotonicClock.nanoseconds() + controlTimeoutNS) { result in
            guard case .success(let vm) = result, case .clone = spec.snapshot?.role else { return done(result.map { $0 as VirtualMachine }) }
            vm.restore { r in
                switch r {
                case .success: done(.success(vm))
                case .failure(let e):
                    vm.kill()
                    done(.failure(e))
                }
            }
        }
    }

    /// The pid and start time a `QEMUMachine.persistentState` recorded.
    static func recorded(_ state: [String: String]) -> (pid_t, UInt64)? {
        guard let pid = state["vmm_pid"].flatMap({ pid_t($0) }), let start = state["vmm_start"].flatMap({ UInt64($0) }) else { return nil }
        return (pid, start)
    }

    public func kill(recorded state: [String: String], exits: ExitRecords) -> pid_t? {
        guard let (pid, start) = Self.recorded(state) else { return nil }
        guard supervisor.watchForeign(pid: pid, startTime: start, exits: exits, onExit: { _ in }) != nil else {
            _ = exits.take(pid: pid, startTime: start)
            return nil
        }
        try? supervisor.signal(pid, SIGKILL)
        return pid
    }

    public func recover(_ spec: VMSpec, state: [String: String], exits: ExitRecords, done: @escaping (Result<VirtualMachine, RPCError>) -> Void) {
        guard let (pid, start) = Self.recorded(state) else {
            done(.failure(RPCError(.notFound, "sandbox \(spec.id): no QEMU recorded in its state")))
            return
        }
        let vm = QEMUMachine(spec: spec, driver: self)
        vm.pid = pid
        vm.startTime = start
        guard supervisor.watchForeign(pid: pid, startTime: start, exits: exits, onExit: { [weak vm] status in vm?.exited(status) }) != nil else {
            let status = exits.take(pid: pid, startTime: start)
            done(.failure(RPCError(.notFound, "sandbox \(spec.id): QEMU (pid \(pid)) exited while no daemon ran\(status.map { " (\($0))" } ?? "")")))
            return
        }
        vm.attach(deadline: MonotonicClock.nanoseconds() + controlTimeoutNS) { result in done(result.map { $0 as VirtualMachine }) }
    }
}

/// One QEMU process and its sockets.
final class QEMUMachine: VirtualMachine {
    let spec: VMSpec
    unowned let driver: QEMU
    var pid: pid_t = 0
    var startTime: UInt64 = 0
    var qmp: QMPClient?
    var console: ConsoleLog?
    var exitStatus: ExitStatus?
    private(set) var hasExited = false
    var onExit: ((ExitStatus?) -> Void)?
    private var agentPortOpen = false
    /// unplugDisk's next step per device id, run on its DEVICE_DELETED event.
    private var deviceDeleted: [String: () -> Void] = [:]
    var onAgentPortOpen: (() -> Void)? {
        didSet { if agentPortOpen { onAgentPortOpen?() } }
    }
    private var exitWaiters: [() -> Void] = []
    var accelerator: Accelerator { spec.accelerator }

    /// From QMP's greeting: `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    var vmmVersion: String {
        guard let v = qmp?.greeting?["version"], let q = v["qemu"] else { return "unknown" }
        let n = [q["major"], q["minor"], q["micro"]].map { $0?.numberValue.map { String(Int($0)) } ?? "?" }.joined(separator: ".")
        let package = v["package"]?.stringValue?.trimmingWhitespace ?? ""
        return package.isEmpty ? n : "\(n) (\(package))"
    }

    init(spec: VMSpec, driver: QEMU) {
        self.spec = spec
        self.driver = driver
    }

    var persistentState: [String: String] {
        ["vmm": "qemu", "vmm_pid": String(pid), "vmm_start": String(startTime), "accelerator": spec.accelerator.rawValue]
    }

    /// Connects QMP (retrying while QEMU makes its socket), negotiates, checks the VM
    /// runs, then follows the console.
    func attach(deadline: UInt64, done: @escaping (Result<QEMUMachine, RPCError>) -> Void) {
        if hasExited {
            done(.failure(RPCError(.internal, "sandbox \(spec.id): QEMU exited at start (\(exitStatus.map { "\($0)" } ?? "status unknown")): \(vmmLogTail)")))
            return
        }
        guard let client = try? QMPClient.connect(reactor: driver.reactor, path: spec.controlSocket, logger: driver.logger) else {
            guard MonotonicClock.nanoseconds() < deadline else {
                kill()
                done(.failure(RPCError(.deadlineExceeded, "sandbox \(spec.id): QEMU's QMP socket \(spec.controlSocket) did not accept within \(driver.controlTimeoutNS / 1_000_000) ms: \(vmmLogTail)")))
                return
            }
            driver.reactor.schedule(afterNS: 5_000_000) { [self] in attach(deadline: deadline, done: done) }
            return
        }
        qmp = client
        client.onEvent = { [weak self] event, data in
            guard let self else { return }
            // The guest opened the agent's virtio-serial port: it is about to serve.
            switch event {
            case "VSERPORT_CHANGE" where data["id"]?.stringValue == "agentport":
                self.agentPortOpen = data["open"]?.boolValue == true
                if self.agentPortOpen { self.onAgentPortOpen?() }
                return
            case "DEVICE_DELETED":
                if let id = data["device"]?.stringValue, let then = self.deviceDeleted.removeValue(forKey: id) { then() }
            default:
                break
            }
            self.driver.logger.info("sandbox \(self.spec.id): QEMU event \(event) \(data.text.prefix(200))")
        }
        client.handshake(timeoutNS: driver.controlTimeoutNS) { [self] r in
            switch r {
            case .failure(let f):
                done(.failure(RPCError(.internal, "sandbox \(spec.id): QMP: \(f); \(vmmLogTail)")))
            case .success:
                client.execute("query-status") { [self] s in
                    switch s {
                    case .failure(let f): done(.failure(RPCError(.internal, "sandbox \(spec.id): QMP query-status: \(f)")))
                    case .success(let status):
                        driver.logger.debug("sandbox \(spec.id): QEMU \(status["status"]?.stringValue ?? "?")")
                        followConsole()
                        done(.success(self))
                    }
                }
            }
        }
    }

    private func followConsole() {
        guard console == nil else { return }
        do {
            let c = try ConsoleLog(reactor: driver.reactor, socket: spec.consoleSocket, file: spec.consoleLog)
            console = c
        } catch {
            driver.logger.warning("sandbox \(spec.id): console \(spec.consoleSocket): \(error)")
        }
    }

    func exited(_ status: ExitStatus?) {
        guard !hasExited else { return }
        hasExited = true
        exitStatus = status
        qmp?.close()
        qmp = nil
        // What the guest printed last is in the socket still: read it before closing.
        console?.drainAndClose()
        console = nil
        for path in [spec.agentSocket, spec.consoleSocket, spec.controlSocket] { _ = unlink(path) }
        driver.logger.info("sandbox \(spec.id): QEMU (pid \(pid)) exited: \(status.map { "\($0)" } ?? "status unknown")")
        let waiters = exitWaiters
        exitWaiters.removeAll()
        for w in waiters { w() }
        onExit?(status)
    }

    func status(_ done: @escaping (Result<String, RPCError>) -> Void) {
        guard let qmp, !hasExited else { done(.success("exited")); return }
        qmp.execute("query-status", timeoutNS: 2_000_000_000) { r in
            switch r {
            case .success(let v): done(.success(v["status"]?.stringValue ?? "unknown"))
            case .failure(let f): done(.failure(RPCError(.unavailable, "QMP query-status: \(f)")))
            }
        }
    }

    func stop(timeoutNS: UInt64, done: @escaping () -> Void) {
        if hasExited { done(); return }
        exitWaiters.append(done)
        let reactor = driver.reactor
        // The guest is asked first (ACPI power button); a guest that does not act on it
        // is ended by QEMU (quit) after the grace, and by SIGKILL if QEMU hangs.
        qmp?.execute("system_powerdown", timeoutNS: 1_000_000_000) { _ in }
        reactor.schedule(afterNS: timeoutNS) { [weak self] in
            guard let self, !self.hasExited else { return }
            self.qmp?.execute("quit", timeoutNS: 1_000_000_000) { _ in }
            reactor.schedule(afterNS: 2_000_000_000) { [weak self] in
                guard let self, !self.hasExited else { return }
                self.driver.logger.warning("sandbox \(self.spec.id): QEMU did not quit within 2 s: SIGKILL")
                self.kill()
            }
        }
    }

    /// Through the supervisor's pidfd: our child, or the one recovered after a restart.
    func kill() {
        guard !hasExited, pid > 0 else { return }
        try? driver.supervisor.signal(pid, SIGKILL)
    }

    var canHotplugDisks: Bool { driver.machine == .q35 }

    /// The root port each disk this daemon plugged sits on (a recovered VM's earlier disks
    /// are not in it: a port they hold refuses device_add and the next one is tried).
    private var diskPorts: [String: Int] = [:]

    func hotplugDisk(id: String, path: String, readOnly: Bool, done: @escaping (Result<Void, RPCError>) -> Void) {
        guard driver.machine == .q35 else {
            done(.failure(RPCError(.failedPrecondition, "a microvm has no hot-plug bus (virtio-mmio): disk \(path) needs [vm] machine = \"q35\"")))
            return
        }
        guard let qmp else { done(.failure(RPCError(.unavailable, "QEMU's QMP connection is gone"))); return }
        var st = stat()
        let isBlock = stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFBLK
        let node: JSONValue = ["node-name": .string(id), "driver": "raw", "read-only": .bool(readOnly),
                               "file": ["driver": .string(isBlock ? "host_device" : "file"), "filename": .string(path)]]
        qmp.execute("blockdev-add", node) { r in
            if case .failure(let f) = r { done(.failure(RPCError(.internal, "blockdev-add \(path): \(f)"))); return }
            // The guest finds it by its serial (virtio-blk's, at most 20 bytes): the id.
            var tried: [String] = []
            func plug(_ port: Int) {
                guard port < QEMU.hotplugPorts else {
                    qmp.execute("blockdev-del", ["node-name": .string(id)]) { _ in }
                    done(.failure(RPCError(.resourceExhausted, "device_add \(id): no free hot-plug port of \(QEMU.hotplugPorts) (\(tried.joined(separator: "; ")))")))
                    return
                }
                if self.diskPorts.values.contains(port) { return plug(port + 1) }
                qmp.execute("device_add", ["driver": "virtio-blk-pci", "id": .string(id), "drive": .string(id), "bus": .string("hotplug\(port)"),
                                           "serial": .string(String(id.prefix(20)))]) { [weak self] r in
                    switch r {
                    case .success:
                        self?.diskPorts[id] = port
                        done(.success(()))
                    case .failure(let f):
                        tried.append("hotplug\(port): \(f)")
                        plug(port + 1)
                    }
                }
            }
            plug(0)
        }
    }

    func unplugDisk(id: String, done: @escaping (Result<Void, RPCError>) -> Void) {
        guard let qmp else { done(.failure(RPCError(.unavailable, "QEMU's QMP connection is gone"))); return }
        // device_del completes when the guest lets go (DEVICE_DELETED); then the node goes.
        deviceDeleted[id] = { [weak self] in
            self?.diskPorts[id] = nil
            qmp.execute("blockdev-del", ["node-name": .string(id)]) { r in
                done(r.map { _ in () }.mapError { RPCError(.internal, "blockdev-del \(id): \($0)") })
            }
        }
        qmp.execute("device_del", ["id": .string(id)]) { [weak self] r in
            if case .failure(let f) = r, self?.deviceDeleted.removeValue(forKey: id) != nil {
                done(.failure(RPCError(.notFound, "device_del \(id): \(f)")))
            }
        }
    }

    // MARK: templates

    /// Runs `steps` (QMP commands) in order; the first failure ends them.
    private func run(_ steps: [(String, JSONValue?)], _ what: String, done: @escaping (Result<Void, RPCError>) -> Void) {
        guard let qmp else { return done(.failure(RPCError(.unavailable, "sandbox \(spec.id): \(what): QEMU's QMP connection is gone"))) }
        guard let (command, args) = steps.first else { return done(.success(())) }
        qmp.execute(command, args) { [weak self] r in
            switch r {
            case .failure(let f): done(.failure(RPCError(.internal, "sandbox \(self?.spec.id ?? "?"): \(what): \(command): \(f)")))
            case .success: self?.run(Array(steps.dropFirst()), what, done: done) ?? done(.failure(RPCError(.unavailable, "\(what): the VM is gone")))
            }
        }
    }

    /// Polls query-migrate until the migration completed (or failed) or `deadline`.
    private func awaitMigration(_ what: String, deadline: UInt64, done: @escaping (Result<Void, RPCError>) -> Void) {
        guard let qmp, !hasExited else {
            return done(.failure(RPCError(.internal, "sandbox \(spec.id): \(what): QEMU exited (\(exitStatus.map { "\($0)" } ?? "status unknown")): \(vmmLogTail)")))
        }
        qmp.execute("query-migrate") { [weak self] r in
            guard let self else { return }
            switch r {
            case .failure(let f):
                done(.failure(RPCError(.internal, "sandbox \(self.spec.id): \(what): query-migrate: \(f)")))
            case .success(let v):
                switch v["status"]?.stringValue {
                case "completed":
                    done(.success(()))
                case "failed", "cancelled":
                    let why = v["error-desc"]?.stringValue ?? "no reason given"
                    done(.failure(RPCError(.internal, "sandbox \(self.spec.id): \(what) failed: \(why); \(self.vmmLogTail)")))
                default:
                    guard MonotonicClock.nanoseconds() < deadline else {
                        return done(.failure(RPCError(.deadlineExceeded, "sandbox \(self.spec.id): \(what) did not complete in time (\(v["status"]?.stringValue ?? "no status"))")))
                    }
                    self.driver.reactor.schedule(afterNS: 2_000_000) { [weak self] in self?.awaitMigration(what, deadline: deadline, done: done) }
                }
            }
        }
    }

    private static let ignoreShared: JSONValue = ["capabilities": [["capability": "x-ignore-shared", "state": true]]]

    /// The stream comes to a unix socket the daemon listens on and is written to `path`
    /// on the loop: complete once QEMU says so and closed its end (no `exec:` child, so
    /// the template's VMM keeps spawn=deny too).
    func saveState(to path: String, done: @escaping (Result<Void, RPCError>) -> Void) {
        let socket = spec.stateDir + "/save.sock"
        var file: Int32 = -1
        var listener: Listener?
        var stream: Connection?
        var (received, completed, finished) = (false, false, false)
        var writeError: String?
        func finish(_ r: Result<Void, RPCError>) {
            guard !finished else { return }
            finished = true
            listener?.close()
            stream?.close()
            _ = unlink(socket)
            var result = r
            if case .success = r, let writeError { result = .failure(RPCError(.internal, "sandbox \(spec.id): write the template's state \(path): \(writeError)")) }
            if case .success = result, fsync(file) != 0 { result = .failure(RPCError(.internal, "fsync \(path): \(Errno(rawValue: errno))")) }
            if file >= 0 { _ = close(file) }
            done(result)
        }
        do {
            _ = unlink(socket)
            file = try sys("open", path) { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o400) }
            listener = try Listener(reactor: driver.reactor, fd: try Socket.listenUnix(path: socket, backlog: 1)) { fd in
                guard stream == nil else { return }
                let c = Connection(reactor: self.driver.reactor, fd: fd)
                c.onRead = { _, bytes in
                    var off = 0
                    while off < bytes.count, writeError == nil {
                        let n = write(file, bytes.baseAddress! + off, bytes.count - off)
                        if n < 0 { if errno != EINTR { writeError = "\(Errno(rawValue: errno))" } } else { off += n }
                    }
                }
                c.onReadEOF = { c in
                    c.close()
                    received = true
                    if completed { finish(.success(())) }
                }
                stream = c
                do { try c.start() } catch { finish(.failure(RPCError(.internal, "sandbox \(self.spec.id): read the template's state: \(error)"))) }
            }
        } catch {
            return finish(.failure(RPCError(.internal, "sandbox \(spec.id): prepare the template's state \(path): \(error)")))
        }
        // The RAM is the shared file already: only the devices' state is written.
        run([("migrate-set-capabilities", Self.ignoreShared), ("stop", nil), ("migrate", ["uri": .string("unix:" + socket)])], "save the template") { [weak self] r in
            guard let self else { return }
            if case .failure = r { return finish(r) }
            self.awaitMigration("save the template", deadline: MonotonicClock.nanoseconds() + 30_000_000_000) { r in
                if case .failure = r { return finish(r) }
                completed = true
                if received { finish(.success(())) }
                // QEMU closes its end as it completes; a stream that never ends fails.
                self.driver.reactor.schedule(afterNS: 5_000_000_000) {
                    finish(.failure(RPCError(.deadlineExceeded, "sandbox \(self.spec.id): the template's state stream did not end 5 s after QEMU completed it")))
                }
            }
        }
    }

    /// A clone's start: its saved devices read from the state file (the child's fd after
    /// the taps), its RAM the template's file already; then it runs.
    func restore(done: @escaping (Result<Void, RPCError>) -> Void) {
        let fd = 3 + spec.nics.count
        run([("migrate-set-capabilities", Self.ignoreShared), ("migrate-incoming", ["uri": .string("fd:\(fd)")])], "restore the template") { [weak self] r in
            guard let self else { return }
            if case .failure = r { return done(r) }
            self.awaitMigration("restore the template", deadline: MonotonicClock.nanoseconds() + 30_000_000_000) { [weak self] r in
                guard let self else { return }
                if case .failure = r { return done(r) }
                // The template was saved paused, and a restored VM keeps that state.
                self.run([("cont", nil)], "resume the clone", done: done)
            }
        }
    }

    func detach() {
        qmp?.close()
        qmp = nil
        console?.close()
        console = nil
    }

    var vmmLogTail: String {
        let text = (try? Files.readString(spec.vmmLog)) ?? ""
        let tail = text.trimmingWhitespace.suffix(600)
        return tail.isEmpty ? "QEMU printed nothing" : "QEMU said: \(tail)"
    }
}

/// A serial console read on the loop into `console.log`, rotated to `console.log.1` at
/// `maxBytes`: the guest never waits for us (QEMU drops output nobody reads), the disk
/// never fills.
final class ConsoleLog {
    let connection: Connection
    let path: String
    let maxBytes: Int
    private var file: Int32
    private var size: Int

    init(reactor: Reactor, socket: String, file path: String, maxBytes: Int = 1 << 20) throws(SystemError) {
        self.path = path
        self.maxBytes = maxBytes
        file = try sys("open", path) { open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600) }
        var st = stat()
        size = fstat(file, &st) == 0 ? Int(st.st_size) : 0
        do {
            connection = Connection(reactor: reactor, fd: try Socket.connectUnix(path: socket))
        } catch {
            _ = Glibc.close(file)
            throw error
        }
        connection.isWriteOnly = false
        connection.onRead = { [unowned self] _, bytes in self.append(bytes) }
        connection.onReadEOF = { c in c.close() }
        try connection.start()
    }

    deinit { if file >= 0 { _ = Glibc.close(file) } }

    private func append(_ bytes: UnsafeRawBufferPointer) {
        if size + bytes.count > maxBytes { rotate() }
        let n = write(file, bytes.baseAddress, bytes.count)
        if n > 0 { size += n }
    }

    private func rotate() {
        _ = rename(path, path + ".1")
        _ = Glibc.close(file)
        file = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0o600)
        size = 0
    }

    /// Whatever the socket still holds, then closed.
    func drainAndClose() {
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { read(connection.rawFD, $0.baseAddress, $0.count) }
            guard n > 0 else { break }
            buf.withUnsafeBytes { append(UnsafeRawBufferPointer(rebasing: $0.prefix(n))) }
        }
        connection.close()
    }

    func close() { connection.close() }
}
