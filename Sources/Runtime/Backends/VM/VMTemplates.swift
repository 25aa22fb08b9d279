#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarOCI
import KuasarSandbox
import KuasarContainer
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarHostWire

/// VM templates: a guest booted once to its agent's first answer and saved — its RAM in
/// a file (`ram`), its devices' state beside it (`state`) — so that a pod's VM starts as
/// a clone of it (private copy-on-write RAM over the file, the devices restored) instead
/// of booting. One directory per template under `root`, named by its key: a digest of
/// everything a clone must match (`description`). A template is written in a `.build-*`
/// directory and renamed into place once complete; its files are read-only then, and
/// their digests (in `manifest.json`) are checked before the first clone: a template whose
/// files are missing or changed is removed and built again, never cloned.
public final class VMTemplates {
    public struct Template {
        public let key: String
        public let dir: String
        public let memoryMiB: UInt32
        public let vcpus: UInt32
        public let nicSlots: Int
        public let vmmVersion: String
        public let buildMS: Double
        /// What the files were when their digests were last checked: a clone checks these
        /// (cheap) and digests again only when one changed.
        var fingerprints: [String]
        public var clones = 0
        public var ram: String { dir + "/ram" }
        public var state: String { dir + "/state" }
    }

    /// Bumped whenever what a template holds or how it is cloned changes.
    public static let format = 1
    /// NIC slots of a template: pods with up to this many interfaces clone it (a CRI pod
    /// has one; the shim path's none), the unused slots have no backend.
    public static let nicSlots = 1

    public let root: String
    let hypervisor: Hypervisor
    let settings: VMSettings
    let reactor: Reactor
    let logger: Logger
    public private(set) var templates: [String: Template] = [:]
    private var building: [String: [(Result<Template, RPCError>) -> Void]] = [:]
    /// Builds that failed, by key, and why: not tried again until the daemon restarts.
    public private(set) var failures: [String: String] = [:]
    private var imageCache: (fingerprints: String, id: String)?
    /// Builds under way: how to end each at once (its VM killed, its directory removed).
    private var underWay: [String: () -> Void] = [:]

    public init(root: String, hypervisor: Hypervisor, settings: VMSettings, reactor: Reactor, logger: Logger) {
        self.root = root
        self.hypervisor = hypervisor
        self.settings = settings
        self.reactor = reactor
        self.logger = logger
    }

    // MARK: keys

    /// The guest image and VMM a template was made with: content digests of the kernel and
    /// initramfs (recomputed only when their files change), the VMM's identity, the kernel
    /// arguments, the format.
    func image() throws -> String {
        let prints = [settings.kernel, settings.initrd].map { Files.fingerprint($0) ?? "missing" }.joined(separator: " ")
        if let c = imageCache, c.fingerprints == prints { return c.id }
        var parts = ["format \(Self.format)", hypervisor.templateIdentity]
        for (what, path) in [("kernel", settings.kernel), ("initrd", settings.initrd)] {
            let d: (hex: String, size: UInt64)
            do { d = try Files.digest(path) } catch { throw RPCError(.failedPrecondition, "VM template: the guest \(what) \(path): \(error)") }
            parts.append("\(what) \(path) \(d.hex) \(d.size)")
        }
        parts.append("kernel_args \(settings.kernelArgs.joined(separator: " "))")
        let id = parts.joined(separator: "\n")
        imageCache = (prints, id)
        return id
    }

    /// Everything a clone must match, one item per line.
    func description(memoryMiB: UInt32, vcpus: UInt32, accelerator: Accelerator) throws -> String {
        try image() + "\nmemory_mib \(memoryMiB)\nvcpus \(vcpus)\nnic_slots \(Self.nicSlots)\naccelerator \(accelerator.rawValue)"
    }

    static func key(_ description: String) -> String {
        var h: UInt64 = 0xcbf29ce484222325
        for b in description.utf8 { h = (h ^ UInt64(b)) &* 0x100000001b3 }
        let s = String(h, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    // MARK: use

    /// The verified template a VM of this size and these NICs can clone; nil when there is
    /// none ready (nothing is built here: see `ensure`).
    public func ready(memoryMiB: UInt32, vcpus: UInt32, nics: Int, accelerator: Accelerator) -> Template? {
        guard nics <= Self.nicSlots, let d = try? description(memoryMiB: memoryMiB, vcpus: vcpus, accelerator: accelerator) else { return nil }
        let key = Self.key(d)
        guard var t = templates[key] else { return nil }
        if currentFingerprints(t) != t.fingerprints {
            // Touched since it was checked: digested again before any clone trusts it.
            templates[key] = nil
            guard let again = load(key: key, description: d) else { return nil }
            t = again
        }
        t.clones += 1
        templates[key] = t
        return t
    }

    private func currentFingerprints(_ t: Template) -> [String] {
        [t.ram, t.state, t.dir + "/manifest.json"].map { Files.fingerprint($0) ?? "missing" }
    }

    /// The template for this size: loaded from disk when one is there and valid, else
    /// built (a guest booted under the same accelerator, ~1 boot). One build per key at a
    /// time; callers meanwhile wait for the same one.
    public func ensure(memoryMiB: UInt32, vcpus: UInt32, accelerator: Accelerator, done: @escaping (Result<Template, RPCError>) -> Void) {
        let d: String
        do { d = try description(memoryMiB: memoryMiB, vcpus: vcpus, accelerator: accelerator) } catch {
            return done(.failure(RPCError.from(error)))
        }
        let key = Self.key(d)
        // Nothing is read from (or built into) a directory someone else controls.
        do { try Self.prepareRoot(root) } catch { return done(.failure(RPCError.from(error))) }
        if let t = templates[key], currentFingerprints(t) == t.fingerprints { return done(.success(t)) }
        if let t = load(key: key, description: d) { return done(.success(t)) }
        if building[key] != nil { building[key]!.append(done); return }
        building[key] = [done]
        build(key: key, description: d, memoryMiB: memoryMiB, vcpus: vcpus, accelerator: accelerator) { [weak self] r in
            guard let self else { return }
            switch r {
            case .success(let t):
                self.templates[key] = t
                self.failures[key] = nil
            case .failure(let e):
                self.failures[key] = e.message
            }
            for w in self.building.removeValue(forKey: key) ?? [] { w(r) }
        }
    }

    /// Reads `<root>/<key>` and checks it: its manifest names this description, its files
    /// have their recorded digests. Anything else is removed (and so built again).
    func load(key: String, description: String) -> Template? {
        let dir = root + "/" + key
        guard Files.isDirectory(dir) else { return nil }
        let examined = Files.fingerprint(dir)
        func reject(_ why: String) -> Template? {
            templates[key] = nil
            // Another daemon on the same directory may have put a new one in its place meanwhile.
            guard Files.fingerprint(dir) == examined else { return nil }
            logger.warning("VM template \(key): \(why): removed, it is built again")
            Files.removeTree(dir)
            return nil
        }
        guard let bytes = try? Files.read(dir + "/manifest.json"), let m = try? JSONValue.parse(bytes) else { return reject("no readable manifest.json") }
        guard m["description"]?.stringValue == description else { return reject("made for other inputs (guest image, VMM or size changed)") }
        for file in ["ram", "state"] {
            guard let want = m[file + "_digest"]?.stringValue else { return reject("the manifest has no digest of \(file)") }
            let got: (hex: String, size: UInt64)
            do { got = try Files.digest(dir + "/" + file) } catch { return reject("\(file): \(error)") }
            guard got.hex == want else { return reject("\(file) does not match its recorded digest (corrupt or changed)") }
        }
        var t = Template(key: key, dir: dir, memoryMiB: UInt32(m["memory_mib"]?.numberValue ?? 0), vcpus: UInt32(m["vcpus"]?.numberValue ?? 0),
                         nicSlots: Int(m["nic_slots"]?.numberValue ?? 0), vmmVersion: m["vmm_version"]?.stringValue ?? "unknown",
                         buildMS: m["build_ms"]?.numberValue ?? 0, fingerprints: [])
        t.fingerprints = currentFingerprints(t)
        templates[key] = t
        return t
    }

    /// Boots the guest with its RAM in a shared file, waits for the agent, saves the
    /// devices, and moves the result into place.
    private func build(key: String, description: String, memoryMiB: UInt32, vcpus: UInt32, accelerator: Accelerator,
                       done: @escaping (Result<Template, RPCError>) -> Void) {
        let started = MonotonicClock.nanoseconds()
        let tmp = root + "/.build-" + key + "-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        var spec = VMSpec(id: "template-" + key, stateDir: tmp, kernel: settings.kernel, initrd: settings.initrd,
                          memoryMiB: memoryMiB, vcpus: vcpus, accelerator: accelerator, sharePath: tmp + "/share")
        spec.kernelArgs = settings.kernelArgs
        spec.snapshot = VMSpec.Snapshot(role: .template, memoryFile: tmp + "/ram", nicSlots: Self.nicSlots)
        do {
            try Self.prepareRoot(root)
            try makeDirectories(tmp, mode: 0o700)
            try makeDirectories(spec.sharePath, mode: 0o700)
        } catch {
            Files.removeTree(tmp)
            return done(.failure(RPCError(.internal, "VM template \(key): prepare \(tmp): \(error)")))
        }
        logger.info("VM template \(key): building (\(memoryMiB) MiB, \(vcpus) vCPU, \(accelerator.rawValue)) in \(tmp)")
        var vm: VirtualMachine?
        var link: AgentLink?
        var finished = false
        var spawned: (pid: pid_t, start: UInt64)?
        underWay[tmp] = {
            finished = true
            link?.close()
            if let vm { vm.kill() } else if let (pid, start) = spawned, ExitRecords.startTime(of: pid) == start { _ = Glibc.kill(pid, SIGKILL) }
            Files.removeTree(tmp)
        }
        let done: (Result<Template, RPCError>) -> Void = { [weak self] r in
            self?.underWay[tmp] = nil
            done(r)
        }
        func fail(_ e: RPCError) {
            guard !finished else { return }
            finished = true
            link?.close()
            let console = String(((try? Files.readString(spec.consoleLog)) ?? "").trimmingWhitespace.suffix(600))
            let message = "VM template \(key): \(e.message)\(console.isEmpty ? "" : "; console: \(console)")"
            logger.error("\(message)")
            let cleanup = { Files.removeTree(tmp) }
            if let vm, !vm.hasExited { vm.onExit = { _ in cleanup() }; vm.kill() } else { cleanup() }
            done(.failure(RPCError(e.code, message)))
        }
        hypervisor.launch(spec, spawned: { state in
            if let pid = state["vmm_pid"].flatMap({ pid_t($0) }), let start = state["vmm_start"].flatMap({ UInt64($0) }) { spawned = (pid, start) }
            // A daemon that dies mid-build leaves this for the next one to end (`removeLeftovers`).
            try? Files.writeAtomically(tmp + "/vmm.state", Array(state.map { "\($0.key)=\($0.value)" }.sorted().joined(separator: "\n").utf8))
        }) { [weak self] result in
            guard let self else { return }
            switch result {
            case .failure(let e):
                fail(e)
            case .success(let machine):
                vm = machine
                machine.onExit = { status in fail(RPCError(.internal, "the VM exited while it was built (\(status.map { "\($0)" } ?? "status unknown")): \(machine.vmmLogTail)")) }
                let l = AgentLink(reactor: self.reactor, path: spec.agentSocket, namespace: "k8s.io", logger: self.logger)
                link = l
                machine.onAgentPortOpen = { [weak l] in l?.kick() }
                l.connect(deadline: started + self.settings.bootTimeoutNS, alive: { !machine.hasExited }) { r in
                    if case .failure(let e) = r { return fail(e) }
                    // The host's end goes first: the clones' hosts connect anew.
                    l.close()
                    machine.saveState(to: tmp + "/state") { r in
                        if case .failure(let e) = r { return fail(e) }
                        let version = machine.vmmVersion
                        machine.onExit = { _ in
                            guard !finished else { return }
                            finished = true
                            done(self.install(tmp: tmp, key: key, description: description, spec: spec, vmmVersion: version,
                                              buildMS: Double(MonotonicClock.nanoseconds() - started) / 1e6))
                        }
                        machine.kill()
                    }
                }
            }
        }
    }

    /// The build's files digested, made read-only, recorded, and renamed into place.
    private func install(tmp: String, key: String, description: String, spec: VMSpec, vmmVersion: String, buildMS: Double) -> Result<Template, RPCError> {
        do {
            var manifest: [String: Any] = ["description": description, "memory_mib": Int(spec.memoryMiB), "vcpus": Int(spec.vcpus),
                                           "nic_slots": Self.nicSlots, "vmm_version": vmmVersion, "build_ms": buildMS,
                                           "created_unix": Int(WallTime.now().seconds)]
            for file in ["ram", "state"] {
                let path = tmp + "/" + file
                _ = chmod(path, 0o400)
                let d = try Files.digest(path)
                manifest[file + "_digest"] = d.hex
                manifest[file + "_bytes"] = Int(d.size)
            }
            for junk in Files.list(tmp) where !["ram", "state", "console.log"].contains(junk) { Files.removeTree(tmp + "/" + junk) }
            try Files.writeAtomically(tmp + "/manifest.json", JSONWriter.bytes(manifest), mode: 0o400)
            let dir = root + "/" + key
            Files.removeTree(dir)
            _ = try sys("rename", dir) { rename(tmp, dir) }
            logger.info("VM template \(key): built in \(Int(buildMS)) ms (\(spec.memoryMiB) MiB, \(spec.vcpus) vCPU; QEMU \(vmmVersion))")
            guard let t = load(key: key, description: description) else {
                return .failure(RPCError(.internal, "VM template \(key): it did not verify right after it was built"))
            }
            return .success(t)
        } catch {
            Files.removeTree(tmp)
            return .failure(RPCError(.internal, "VM template \(key): install it: \(error)"))
        }
    }

    /// `root` made if missing; refused unless it is a directory of ours that no one else can
    /// write (it lies in /dev/shm, where anyone may make names).
    public static func prepareRoot(_ root: String) throws {
        try makeDirectories(root, mode: 0o700)
        var st = stat()
        guard lstat(root, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
            throw RPCError(.failedPrecondition, "VM templates: \(root) is not a directory")
        }
        guard st.st_uid == geteuid(), st.st_mode & 0o022 == 0 else {
            throw RPCError(.permissionDenied, "VM templates: \(root) belongs to uid \(st.st_uid) or others can write it (mode \(String(st.st_mode & 0o777, radix: 8))): refused")
        }
    }

    /// At start: builds a dead daemon left (their VMs killed, checked by pid and start
    /// time), and templates of another guest image or VMM (they can never be cloned again;
    /// a clone already running keeps its RAM file open).
    public func removeLeftovers() {
        guard Files.isDirectory(root) else { return }
        do { try Self.prepareRoot(root) } catch {
            logger.error("\(RPCError.from(error).message): nothing in it is removed or used")
            return
        }
        let current = try? image()
        for name in Files.list(root) {
            let dir = root + "/" + name
            if name.hasPrefix(".build-") {
                let text = (try? Files.readString(dir + "/vmm.state")) ?? ""
                var state: [String: String] = [:]
                for line in text.split(separator: "\n") {
                    let kv = line.split(separator: "=", maxSplits: 1)
                    if kv.count == 2 { state[String(kv[0])] = String(kv[1]) }
                }
                if let pid = state["vmm_pid"].flatMap({ pid_t($0) }), let start = state["vmm_start"].flatMap({ UInt64($0) }),
                   pid > 0, ExitRecords.startTime(of: pid) == start, Glibc.kill(pid, SIGKILL) == 0 {
                    logger.warning("VM template build \(name): its VM (pid \(pid)) outlived the last daemon: killed")
                }
                Files.removeTree(dir)
                continue
            }
            guard let current, let bytes = try? Files.read(dir + "/manifest.json"), let m = try? JSONValue.parse(bytes),
                  let d = m["description"]?.stringValue else { continue }
            if !d.hasPrefix(current + "\n") {
                logger.info("VM template \(name): made for another guest image or VMM: removed")
                Files.removeTree(dir)
            }
        }
    }

    /// The daemon exits: builds under way are ended (their callers are not told).
    public func abandonBuilds() {
        let builds = underWay
        underWay.removeAll()
        for end in builds.values { end() }
        if !builds.isEmpty { logger.info("VM templates: \(builds.count) build(s) abandoned as the daemon exits") }
    }

    /// A template a clone could not restore from: removed, built again on the next `ensure`.
    public func discard(_ key: String) {
        guard let t = templates.removeValue(forKey: key) else { return }
        Files.removeTree(t.dir)
    }

    /// One line per template in `root` (what its manifest says; not verified here).
    public static func describe(root: String) -> [String] {
        Files.list(root).filter { !$0.hasPrefix(".") }.sorted().map { name in
            guard let bytes = try? Files.read(root + "/" + name + "/manifest.json"), let m = try? JSONValue.parse(bytes) else {
                return "\(name): no readable manifest (removed and built again when needed)"
            }
            let n = { (k: String) in Int(m[k]?.numberValue ?? 0) }
            return "\(name): \(n("memory_mib")) MiB, \(n("vcpus")) vCPU, \(n("nic_slots")) NIC slot(s); RAM file \(n("ram_bytes") >> 20) MiB, state \(n("state_bytes") >> 10) KiB; built in \(n("build_ms")) ms with QEMU \(m["vmm_version"]?.stringValue ?? "?")"
        }
    }

    /// For `kuasar info` and Status: each template ready, and each build that failed.
    public var info: [[String: Any]] {
        templates.values.sorted { $0.key < $1.key }.map {
            ["key": $0.key, "dir": $0.dir, "memory_mib": Int($0.memoryMiB), "vcpus": Int($0.vcpus), "nic_slots": $0.nicSlots,
             "vmm_version": $0.vmmVersion, "build_ms": $0.buildMS, "clones": $0.clones] as [String: Any]
        } + failures.sorted { $0.key < $1.key }.map { ["key": $0.key, "failed": $0.value] as [String: Any] }
    }
}
