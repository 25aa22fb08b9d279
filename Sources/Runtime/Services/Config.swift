import TOMLKit
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer
import KuasarSandbox
import KuasarTasks

/// The daemon's configuration: `/etc/kuasar/config.toml`, or the file `--config` names,
/// over the embedded defaults below — so the daemon runs with no file at all, and a file
/// only lists what it changes. Unknown keys and bad values are refused at start with the
/// key named (`[daemon] on_exit: "later" is not one of keep, stop`).
public struct KuasarConfig: Sendable, Equatable {
    public static let defaultPath = "/etc/kuasar/config.toml"

    /// What the daemon does with its containers when it exits (SIGTERM/SIGINT).
    public enum OnExit: String, Sendable, CaseIterable {
        /// They keep running; the next daemon recovers them (restarts and upgrades lose nothing).
        case keep
        /// They are killed and their cgroups, mounts and state released.
        case stop
    }

    /// The sandbox kinds a sandboxer name can map to.
    public enum Kind: String, Sendable, CaseIterable {
        case namespace, vm, wasm
        /// Why a build has no backend for the kind (a sandboxer of it is accepted in the
        /// config, and its Controller.Create answers FailedPrecondition with this).
        public var unavailableReason: String? {
            switch self {
            case .namespace: return nil
            case .vm: return nil
            case .wasm: return nil
            }
        }
    }

    public var socket = "/run/kuasar/kuasar.sock"
    /// nil: the socket's directory.
    public var root: String?
    /// nil: io_uring when the kernel allows it, else epoll.
    public var reactor: BackendKind?
    public var logLevel = "info"
    public var onExit = OnExit.keep
    /// containerd's sandboxer (proxy plugin) names → sandbox kind: a `Kind`'s name, or
    /// `oci:<runtime>` for pods whose containers an external OCI runtime of `runtimes` runs.
    public var sandboxers: [String: String] = ["kuasar": "namespace", "kuasar-ns": "namespace", "namespace": "namespace", "kuasar-vm": "vm", "kuasar-wasm": "wasm"]
    /// External OCI runtimes ([runtimes.<name>]), by name.
    public var runtimes: [String: OCIRuntimeConfig] = [:]

    /// One `[runtimes.<name>]` table: an OCI runtime command line (runc, crun, runsc, youki).
    public struct OCIRuntimeConfig: Sendable, Equatable {
        public var path: String
        /// Its `--root` (state directory); nil: `<daemon root>/runtimes/<name>`.
        public var root: String?
        public var extraArgs: [String] = []
        /// A call that takes longer is killed and fails (DeadlineExceeded).
        public var timeoutSecs: UInt32 = 30
        public init(path: String, root: String? = nil, extraArgs: [String] = [], timeoutSecs: UInt32 = 30) {
            self.path = path
            self.root = root
            self.extraArgs = extraArgs
            self.timeoutSecs = timeoutSecs
        }
    }

    /// The kind prefix of a sandboxer served by an external OCI runtime.
    public static let ociKindPrefix = "oci:"
    /// The kind prefix of a sandboxer whose pods a task-serving program of `servers` runs.
    public static let serverKindPrefix = "server:"

    /// Task-serving sandbox programs ([servers.<name>]), by name.
    public var servers: [String: TaskServerConfig] = [:]

    /// One `[servers.<name>]` table: a program launched per pod, in the pod's namespaces,
    /// that serves the Task API itself (Quark's sandboxed mode, `kuasar agent --listen`).
    /// In `args` and `address`, {id}, {state_dir}, {namespace} and {events} are replaced
    /// by the pod's id, its state directory, its containerd namespace and containerd's
    /// events address.
    public struct TaskServerConfig: Sendable, Equatable {
        public var path: String
        public var args: [String] = []
        /// Where it serves (`unix:///path`); empty: the first line it prints on stdout.
        public var address = ""
        /// "never": its exit stops the pod; "on-failure": a non-zero exit restarts it.
        public var restart = "never"
        public var maxRestarts: UInt32 = 3
        /// From launch to its first ttrpc answer.
        public var readyTimeoutSecs: UInt32 = 10
        public init(path: String) { self.path = path }
    }
    /// `[vm]`: microVM sandboxes.
    public var vm = VMConfig()

    public struct VMConfig: Sendable, Equatable {
        public static let imageDir = "/var/lib/kuasar/guest"
        /// Only "qemu" so far (Cloud Hypervisor and StratoVirt plug in behind the same driver protocol).
        public var hypervisor = "qemu"
        public var qemu = "/usr/bin/qemu-system-x86_64"
        /// "microvm" (virtio-mmio, PVH vmlinux, fastest) or "q35" (PCI: disks can be hot-plugged).
        public var machine = "microvm"
        public var kernel = imageDir + "/vmlinux"
        public var initrd = imageDir + "/initrd.lz4"
        /// "auto": KVM when a probe guest runs under it, else TCG; "kvm"; "tcg".
        public var accelerator = "auto"
        /// A pod's VM when its resources (linux.resources) say nothing.
        public var memoryMiB: UInt32 = 256
        public var vcpus: UInt32 = 1
        /// From QEMU's start to the agent's first answer.
        public var bootTimeoutSecs: UInt32 = 60
        /// Extra guest kernel command-line words (kuasar.log=debug, ...).
        public var kernelArgs: [String] = []
        /// Pods of the default size start as clones of a template (booted once, saved),
        /// built at daemon start when none matches.
        public var template = true
        /// Where templates live: tmpfs (their RAM is a file), ours only.
        public var templateDir = "/dev/shm/kuasar-vm-templates"
        public init() {}
    }

    /// `[wasm]`: WebAssembly sandboxes.
    public var wasm = WasmConfig()

    public struct WasmConfig: Sendable, Equatable {
        /// "wasmkit" (embedded) or "wasmtime" (its C library, loaded at run time).
        public var engine = "wasmkit"
        /// A container's `io.kuasar.wasm.engine` annotation may choose the other engine.
        public var engineAnnotation = true
        /// Wasmtime's shared library; nil: found in the Python site-packages (pip's `wasmtime`).
        public var wasmtimeLibrary: String?
        /// Compiled modules (Wasmtime); nil: `<root>/wasm-cache`.
        public var cacheDir: String?
        /// The module runner; nil: `kuasar-wasm-run` beside the daemon's binary.
        public var runner: String?
        public init() {}
    }

    /// The cgroup (below the daemon's own) under which each namespace sandbox gets its parent.
    public var cgroupParent = "kuasar"
    /// containerd's ttrpc address, where events of sandboxes made through the Controller go.
    public var containerdAddress = "/run/containerd/containerd.sock.ttrpc"

    public init() {}

    /// The state directory: `root`, else the API socket's directory.
    public var effectiveRoot: String {
        if let root { return root }
        guard let slash = socket.lastIndex(of: "/"), slash != socket.startIndex else { return "/run/kuasar" }
        return String(socket[..<slash])
    }
    public var adminSocketPath: String { effectiveRoot + "/admin.sock" }

    /// The defaults as a commented file (`kuasar config default`); parsing it gives `KuasarConfig()`.
    public static let defaultText = """
    # kuasar daemon configuration. Every key is shown with its default; a file only
    # needs the keys it changes. Unknown keys are refused.

    [daemon]
    # The API socket: gRPC (containerd's sandbox Controller and grpc.health.v1). Created 0600.
    socket = "/run/kuasar/kuasar.sock"
    # State directory: one directory per sandbox (state files, task.sock), admin.sock.
    # Default: the socket's directory.
    # root = "/run/kuasar"
    # Event loop backend: "auto" (io_uring when the kernel allows it, else epoll), "io_uring", "epoll".
    reactor = "auto"
    # trace, debug, info, notice, warning, error, critical.
    log_level = "info"
    # When the daemon exits: "keep" leaves containers running for the next daemon to recover,
    # "stop" kills them and releases their cgroups, mounts and state.
    on_exit = "keep"

    # containerd sandboxer (proxy plugin) names and the sandbox kind each one starts.
    # Kinds: "namespace" (Linux namespaces and cgroups), "vm" (a microVM per pod, see [vm]),
    # "wasm" (a namespace pod whose containers are WebAssembly modules, see [wasm]).
    [sandboxers]
    kuasar = "namespace"
    kuasar-ns = "namespace"
    namespace = "namespace"
    kuasar-vm = "vm"
    kuasar-wasm = "wasm"

    # An external OCI runtime runs a sandboxer's containers (the daemon still makes the pod):
    # [runtimes.crun]
    # path = "/usr/bin/crun"           # required
    # root = "/run/kuasar/runtimes/crun"  # its --root; default <root>/runtimes/<name>
    # extra_args = []                  # given before the subcommand
    # timeout_secs = 30                # a call that takes longer is killed and fails
    # and in [sandboxers]: kuasar-crun = "oci:crun"

    # A program per pod that serves the Task API itself, launched in the pod's namespaces:
    # [servers.agent]
    # path = "/usr/local/bin/kuasar"   # required
    # args = ["agent", "--listen", "unix://{state_dir}/agent.sock", "--root", "{state_dir}/agent",
    #         "--sandbox-id", "{id}", "--namespace", "{namespace}", "--events-address", "{events}"]
    # address = "unix://{state_dir}/agent.sock"  # empty: the first line the program prints
    # restart = "never"                # or "on-failure" (up to max_restarts = 3)
    # ready_timeout_secs = 10          # launch to its first answer
    # and in [sandboxers]: kuasar-agent = "server:agent"

    [vm]
    # A microVM per pod: the guest agent (kuasar agent) is its PID 1 and runs the containers;
    # the daemon serves containerd's Task API on the host and forwards to it.
    hypervisor = "qemu"
    qemu = "/usr/bin/qemu-system-x86_64"
    # "microvm" (virtio-mmio, boots the PVH vmlinux fastest) or "q35" (PCI; disks hot-plug).
    machine = "microvm"
    # The guest image (make guest installs it here).
    kernel = "/var/lib/kuasar/guest/vmlinux"
    initrd = "/var/lib/kuasar/guest/initrd.lz4"
    # "auto": KVM when a probe guest really runs under it, else TCG (emulated); "kvm"; "tcg".
    accelerator = "auto"
    # A pod's VM size when its linux.resources do not set one (memory limit, CPU quota/period).
    memory_mib = 256
    vcpus = 1
    # QEMU start to the agent's first answer; past it the VM is killed and Start fails.
    boot_timeout_secs = 60
    # Extra guest kernel command-line words, e.g. ["kuasar.log=debug"].
    kernel_args = []
    # Pods of the default size start as clones of a template: a guest booted once to its
    # agent and saved (its RAM a file in template_dir, on tmpfs), restored in a fraction of
    # a boot. Built at daemon start when none matches (kernel, initrd, QEMU, machine, size);
    # `kuasar vm template build` makes one for another size. Clones get no free page
    # reporting (QEMU 7.2 would punch it into the shared file).
    template = true
    template_dir = "/dev/shm/kuasar-vm-templates"

    [wasm]
    # A container whose entrypoint is a WebAssembly module (WASI preview 1) runs it in its own
    # process, in the pod's namespaces and its own cgroup; other entrypoints run as Linux
    # processes. "wasmkit" (embedded interpreter) or "wasmtime" (compiles; pip's wasmtime).
    engine = "wasmkit"
    # A container's io.kuasar.wasm.engine annotation may pick the other engine.
    engine_annotation = true
    # Wasmtime's C library; default: wasmtime/linux-x86_64/_libwasmtime.so in Python's site-packages.
    # wasmtime_library = "/usr/local/lib/python3.11/site-packages/wasmtime/linux-x86_64/_libwasmtime.so"
    # Compiled modules, by digest and engine version; default <root>/wasm-cache.
    # cache_dir = "/run/kuasar/wasm-cache"
    # The module runner; default: kuasar-wasm-run beside the daemon's binary.
    # runner = "/usr/local/bin/kuasar-wasm-run"

    [namespace]
    # Cgroup, relative to the daemon's own, under which every sandbox gets <cgroup_parent>/<sandbox id>.
    cgroup_parent = "kuasar"

    [containerd]
    # containerd's ttrpc socket: task events (create, start, exit, oom, delete) of pods made
    # through the sandbox Controller are published to its events service there, in order,
    # re-dialled while containerd restarts (up to 10000 events wait; the oldest go first).
    address = "/run/containerd/containerd.sock.ttrpc"

    """

    public struct Error: Swift.Error, CustomStringConvertible, Sendable {
        public let description: String
        init(_ d: String) { description = d }
    }

    /// Parses a config file's text over the defaults. `origin` names the file in errors.
    public static func parse(_ text: String, origin: String = "config") throws(Error) -> KuasarConfig {
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch let e as TOMLParseError {
            throw Error("\(origin): line \(e.source.begin.line), column \(e.source.begin.column): \(e.description)")
        } catch {
            throw Error("\(origin): \(error)")
        }
        var c = KuasarConfig()
        for key in table.keys {
            guard let section = table[key]?.table else {
                if Self.sections.contains(key) {
                    throw Error("\(origin): \(key) must be a table ([\(key)])")
                }
                throw Error("\(origin): unknown key \"\(key)\" (sections: \(Self.sections.joined(separator: ", ")))")
            }
            switch key {
            case "daemon": try c.applyDaemon(section, origin)
            case "sandboxers": try c.applySandboxers(section, origin)
            case "namespace": try c.applyNamespace(section, origin)
            case "containerd": try c.applyContainerd(section, origin)
            case "runtimes": try c.applyRuntimes(section, origin)
            case "servers": try c.applyServers(section, origin)
            case "vm": try c.applyVM(section, origin)
            case "wasm": try c.applyWasm(section, origin)
            default: throw Error("\(origin): unknown section [\(key)] (sections: \(Self.sections.joined(separator: ", ")))")
            }
        }
        // Checked once every section is read: [runtimes] may come after [sandboxers].
        for (name, kind) in c.sandboxers.sorted(by: { $0.key < $1.key }) where kind.hasPrefix(Self.serverKindPrefix) {
            let server = String(kind.dropFirst(Self.serverKindPrefix.count))
            guard c.servers[server] != nil else {
                throw Error("\(origin): [sandboxers] \(name) = \"\(kind)\": no [servers.\(server)] table (servers: \(c.servers.keys.sorted().joined(separator: ", ")))")
            }
        }
        for (name, kind) in c.sandboxers.sorted(by: { $0.key < $1.key }) where kind.hasPrefix(Self.ociKindPrefix) {
            let runtime = String(kind.dropFirst(Self.ociKindPrefix.count))
            guard c.runtimes[runtime] != nil else {
                throw Error("\(origin): [sandboxers] \(name) = \"\(kind)\": no [runtimes.\(runtime)] table (runtimes: \(c.runtimes.keys.sorted().joined(separator: ", ")))")
            }
        }
        return c
    }

    private static func string(_ t: TOMLTable, _ section: String, _ key: String, _ origin: String) throws(Error) -> String {
        guard let v = t[key]?.string else {
            throw Error("\(origin): [\(section)] \(key) must be a string")
        }
        return v
    }

    private static func choice<T: RawRepresentable & CaseIterable>(_ value: String, _ section: String, _ key: String, _ origin: String) throws(Error) -> T where T.RawValue == String {
        guard let v = T(rawValue: value) else {
            throw Error("\(origin): [\(section)] \(key): \"\(value)\" is not one of \(T.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return v
    }

    /// An absolute path.
    private static func path(_ t: TOMLTable, _ section: String, _ key: String, _ origin: String) throws(Error) -> String {
        let v = try string(t, section, key, origin)
        guard v.hasPrefix("/") else { throw Error("\(origin): [\(section)] \(key) must be an absolute path, not \"\(v)\"") }
        return v
    }

    private static func strings(_ t: TOMLTable, _ section: String, _ key: String, _ origin: String) throws(Error) -> [String] {
        guard let a = t[key]?.array, let v = Optional(a.compactMap { $0.string }), v.count == a.count else {
            throw Error("\(origin): [\(section)] \(key) must be an array of strings")
        }
        return v
    }

    /// A whole number in `range` (`unit` names what it counts in the error).
    private static func number(_ t: TOMLTable, _ section: String, _ key: String, _ range: ClosedRange<Int>, unit: String = "", _ origin: String) throws(Error) -> UInt32 {
        guard let v = t[key]?.int, range.contains(v) else {
            throw Error("\(origin): [\(section)] \(key) must be a number\(unit.isEmpty ? "" : " of \(unit)") from \(range.lowerBound) to \(range.upperBound)")
        }
        return UInt32(v)
    }

    private mutating func applyDaemon(_ t: TOMLTable, _ origin: String) throws(Error) {
        for key in t.keys {
            let v = try Self.string(t, "daemon", key, origin)
            switch key {
            case "socket":
                socket = try Self.path(t, "daemon", key, origin)
            case "root":
                root = try Self.path(t, "daemon", key, origin)
            case "reactor":
                if v == "auto" { reactor = nil; continue }
                guard let k = BackendKind(rawValue: v) else {
                    throw Error("\(origin): [daemon] reactor: \"\(v)\" is not one of auto, io_uring, epoll")
                }
                reactor = k
            case "log_level":
                let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
                guard levels.contains(v) else { throw Error("\(origin): [daemon] log_level: \"\(v)\" is not one of \(levels.joined(separator: ", "))") }
                logLevel = v
            case "on_exit":
                onExit = try Self.choice(v, "daemon", key, origin)
            default:
                throw Error("\(origin): unknown key [daemon] \(key) (keys: socket, root, reactor, log_level, on_exit)")
            }
        }
    }

    static let sections = ["daemon", "sandboxers", "namespace", "vm", "wasm", "containerd", "runtimes", "servers"]

    private mutating func applySandboxers(_ t: TOMLTable, _ origin: String) throws(Error) {
        var map: [String: String] = [:]
        for name in t.keys {
            let v = try Self.string(t, "sandboxers", name, origin)
            if (v.hasPrefix(Self.ociKindPrefix) && v.count > Self.ociKindPrefix.count)
                || (v.hasPrefix(Self.serverKindPrefix) && v.count > Self.serverKindPrefix.count) {
                map[name] = v
                continue
            }
            guard Kind(rawValue: v) != nil else {
                throw Error("\(origin): [sandboxers] \(name): \"\(v)\" is not one of \(Kind.allCases.map(\.rawValue).joined(separator: ", ")), oci:<runtime>, server:<program>")
            }
            map[name] = v
        }
        sandboxers = map
    }

    private mutating func applyRuntimes(_ t: TOMLTable, _ origin: String) throws(Error) {
        for name in t.keys {
            let section = "runtimes.\(name)"
            guard let r = t[name]?.table else { throw Error("\(origin): [\(section)] must be a table") }
            guard (try? Identifier.validate(name, what: "runtime")) != nil else {
                throw Error("\(origin): [\(section)]: a runtime name is letters, digits, '_', '-' and '.'")
            }
            var path: String?
            var config = OCIRuntimeConfig(path: "")
            for key in r.keys {
                switch key {
                case "path", "root":
                    let v = try Self.path(r, section, key, origin)
                    if key == "path" { path = v } else { config.root = v }
                case "extra_args":
                    config.extraArgs = try Self.strings(r, section, key, origin)
                case "timeout_secs":
                    config.timeoutSecs = try Self.number(r, section, key, 1...3600, unit: "seconds", origin)
                default:
                    throw Error("\(origin): unknown key [\(section)] \(key) (keys: path, root, extra_args, timeout_secs)")
                }
            }
            guard let path else { throw Error("\(origin): [\(section)] needs path (the runtime binary)") }
            config.path = path
            runtimes[name] = config
        }
    }

    private mutating func applyServers(_ t: TOMLTable, _ origin: String) throws(Error) {
        for name in t.keys {
            let section = "servers.\(name)"
            guard let r = t[name]?.table else { throw Error("\(origin): [\(section)] must be a table") }
            guard (try? Identifier.validate(name, what: "server")) != nil else {
                throw Error("\(origin): [\(section)]: a server name is letters, digits, '_', '-' and '.'")
            }
            var config = TaskServerConfig(path: "")
            for key in r.keys {
                switch key {
                case "path":
                    config.path = try Self.path(r, section, key, origin)
                case "address":
                    let v = try Self.string(r, section, key, origin)
                    guard v.isEmpty || v.hasPrefix("unix:///") || v.hasPrefix("unix://{") || v.hasPrefix("/") || v.hasPrefix("{") else {
                        throw Error("\(origin): [\(section)] address must be unix:///path (or empty: the program prints it), not \"\(v)\"")
                    }
                    config.address = v
                case "args":
                    config.args = try Self.strings(r, section, key, origin)
                case "restart":
                    let v = try Self.string(r, section, key, origin)
                    guard v == "never" || v == "on-failure" else { throw Error("\(origin): [\(section)] restart must be \"never\" or \"on-failure\", not \"\(v)\"") }
                    config.restart = v
                case "max_restarts":
                    config.maxRestarts = try Self.number(r, section, key, 0...100, origin)
                case "ready_timeout_secs":
                    config.readyTimeoutSecs = try Self.number(r, section, key, 1...600, unit: "seconds", origin)
                default:
                    throw Error("\(origin): unknown key [\(section)] \(key) (keys: path, args, address, restart, max_restarts, ready_timeout_secs)")
                }
            }
            guard !config.path.isEmpty else { throw Error("\(origin): [\(section)] needs path (the program)") }
            servers[name] = config
        }
    }

    private mutating func applyVM(_ t: TOMLTable, _ origin: String) throws(Error) {
        let keys = "hypervisor, qemu, machine, kernel, initrd, accelerator, memory_mib, vcpus, boot_timeout_secs, kernel_args, template, template_dir"
        for key in t.keys {
            switch key {
            case "hypervisor", "machine", "accelerator":
                let v = try Self.string(t, "vm", key, origin)
                let allowed = key == "hypervisor" ? ["qemu"] : key == "machine" ? ["microvm", "q35"] : ["auto", "kvm", "tcg"]
                guard allowed.contains(v) else { throw Error("\(origin): [vm] \(key): \"\(v)\" is not one of \(allowed.joined(separator: ", "))") }
                if key == "hypervisor" { vm.hypervisor = v } else if key == "machine" { vm.machine = v } else { vm.accelerator = v }
            case "qemu", "kernel", "initrd", "template_dir":
                let v = try Self.path(t, "vm", key, origin)
                if key == "qemu" { vm.qemu = v } else if key == "kernel" { vm.kernel = v } else if key == "initrd" { vm.initrd = v } else { vm.templateDir = v }
            case "template":
                guard let v = t[key]?.bool else { throw Error("\(origin): [vm] template must be true or false") }
                vm.template = v
            case "memory_mib":
                vm.memoryMiB = try Self.number(t, "vm", key, 64...(1 << 20), unit: "MiB", origin)
            case "vcpus":
                vm.vcpus = try Self.number(t, "vm", key, 1...255, origin)
            case "boot_timeout_secs":
                vm.bootTimeoutSecs = try Self.number(t, "vm", key, 1...3600, unit: "seconds", origin)
            case "kernel_args":
                let args = try Self.strings(t, "vm", key, origin)
                guard !args.contains(where: { $0.contains(" ") || $0.isEmpty }) else { throw Error("\(origin): [vm] kernel_args: one word each, no spaces") }
                vm.kernelArgs = args
            default:
                throw Error("\(origin): unknown key [vm] \(key) (keys: \(keys))")
            }
        }
    }

    private mutating func applyWasm(_ t: TOMLTable, _ origin: String) throws(Error) {
        for key in t.keys {
            switch key {
            case "engine":
                let v = try Self.string(t, "wasm", key, origin)
                guard v == "wasmkit" || v == "wasmtime" else { throw Error("\(origin): [wasm] engine: \"\(v)\" is not one of wasmkit, wasmtime") }
                wasm.engine = v
            case "engine_annotation":
                guard let v = t[key]?.bool else { throw Error("\(origin): [wasm] engine_annotation must be true or false") }
                wasm.engineAnnotation = v
            case "wasmtime_library": wasm.wasmtimeLibrary = try Self.path(t, "wasm", key, origin)
            case "cache_dir": wasm.cacheDir = try Self.path(t, "wasm", key, origin)
            case "runner": wasm.runner = try Self.path(t, "wasm", key, origin)
            default:
                throw Error("\(origin): unknown key [wasm] \(key) (keys: engine, engine_annotation, wasmtime_library, cache_dir, runner)")
            }
        }
    }

    private mutating func applyNamespace(_ t: TOMLTable, _ origin: String) throws(Error) {
        for key in t.keys {
            switch key {
            case "cgroup_parent":
                let v = try Self.string(t, "namespace", key, origin)
                let parts = v.split(separator: "/", omittingEmptySubsequences: false)
                guard !v.isEmpty, !v.hasPrefix("/"), parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }) else {
                    throw Error("\(origin): [namespace] cgroup_parent must be a relative path without '.' or '..', not \"\(v)\"")
                }
                cgroupParent = v
            default:
                throw Error("\(origin): unknown key [namespace] \(key) (keys: cgroup_parent)")
            }
        }
    }

    private mutating func applyContainerd(_ t: TOMLTable, _ origin: String) throws(Error) {
        for key in t.keys {
            switch key {
            case "address":
                let v = try Self.string(t, "containerd", key, origin)
                var path = v
                for prefix in ["ttrpc+unix://", "unix://"] where path.hasPrefix(prefix) { path = String(path.dropFirst(prefix.count)) }
                guard path.hasPrefix("/") else {
                    throw Error("\(origin): [containerd] address must be an absolute socket path (or unix://PATH), not \"\(v)\"")
                }
                containerdAddress = v
            default:
                throw Error("\(origin): unknown key [containerd] \(key) (keys: address)")
            }
        }
    }

    /// The daemon's configuration: the file `explicit` names (--config), else
    /// $KUASAR_CONFIG, else /etc/kuasar/config.toml when it exists, over the defaults.
    /// Returns the file read, nil for the embedded defaults alone.
    public static func resolve(explicit: String?, environment: [String: String]) throws(Error) -> (KuasarConfig, file: String?) {
        let named = explicit ?? environment["KUASAR_CONFIG"]
        let path = named ?? defaultPath
        let config = try load(path: path, required: named != nil)
        return (config, named != nil || Files.exists(path) ? path : nil)
    }

    /// The file at `path` over the defaults; with `required` false a missing file is
    /// the defaults (the daemon's /etc/kuasar/config.toml).
    public static func load(path: String, required: Bool) throws(Error) -> KuasarConfig {
        let text: String
        do { text = try Files.readString(path) } catch {
            if !required && error.errno == .ENOENT { return KuasarConfig() }
            throw Error("\(path): \(error)")
        }
        return try parse(text, origin: path)
    }
}
