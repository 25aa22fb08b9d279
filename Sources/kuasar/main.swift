import ArgumentParser
import Foundation
import Logging
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarGRPC
import KuasarContainer
import KuasarSandbox
import KuasarSandboxKinds
import KuasarWasmSandbox
import KuasarNamespace
import KuasarExternal
import KuasarVM
import KuasarWasm
import KuasarWasmKit
import KuasarServices
import KuasarTasks
import KuasarAgent

#if canImport(Glibc)
import Glibc
#endif

/// The `kuasar` command: argument parsing and wiring only; all behaviour is in Runtime.
struct Kuasar: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kuasar",
        abstract: "A multi-sandbox container runtime: one daemon per node, no shim per pod.",
        version: KuasarVersion.string,
        subcommands: [DaemonCommand.self, ConfigCommand.self, HealthCommand.self, InfoCommand.self, RunCommand.self, ExecCommand.self,
                      PsCommand.self, KillCommand.self, RmCommand.self, LogsCommand.self, VMCommand.self, WasmRunCommand.self])
}

struct DaemonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "daemon", abstract: "Run the daemon in the foreground.")

    @Option(help: "Configuration file (default: KUASAR_CONFIG, else \(KuasarConfig.defaultPath) when it exists; `kuasar config default` prints one).")
    var config: String?

    @Option(help: "The API socket (created 0600, parent directory created); overrides [daemon] socket.")
    var socket: String?

    @Option(help: "State directory (sandbox state and task sockets, admin.sock); overrides [daemon] root. Default: the socket's directory.")
    var root: String?

    @Option(help: "Reactor backend: io_uring or epoll (default: io_uring when the kernel allows it; KUASAR_REACTOR overrides).")
    var reactor: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical; overrides [daemon] log_level.")
    var logLevel: String?

    @Option(help: "On SIGTERM/SIGINT: keep (containers run on, recovered by the next daemon) or stop; overrides [daemon] on_exit.")
    var onExit: String?

    func run() throws {
        let file: KuasarConfig
        do {
            file = try KuasarConfig.resolve(explicit: config, environment: currentEnvironmentDictionary()).0
        } catch {
            FileHandleStderr.write("kuasar daemon: \(error)\n")
            throw ExitCode(1)
        }
        let levelName = logLevel ?? file.logLevel
        guard let level = Logger.Level(rawValue: levelName) else {
            throw ValidationError("unknown log level \"\(levelName)\"")
        }
        var options = file
        if let socket { options.socket = socket }
        if let root { options.root = root }
        if let reactor {
            guard let kind = BackendKind(rawValue: reactor) else {
                throw ValidationError("--reactor must be io_uring or epoll, not \"\(reactor)\"")
            }
            options.reactor = kind
        }
        if let onExit {
            guard let v = KuasarConfig.OnExit(rawValue: onExit) else { throw ValidationError("--on-exit must be keep or stop, not \"\(onExit)\"") }
            options.onExit = v
        }
        // First the keeper: this process stays behind as the daemon's parent and the
        // subreaper of its containers; the daemon is a fresh exec of the same command.
        if Keeper.pid == nil {
            do {
                try Keeper.become(exitsDir: options.effectiveRoot + "/exits", executable: selfExecutable(), arguments: CommandLine.arguments)
            } catch {
                FileHandleStderr.write("kuasar daemon: \(error)\n")
                throw ExitCode(1)
            }
        }
        // The keeper's store channel, taken (and made close-on-exec) before anything runs.
        _ = KeeperStore.fromKeeper
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let daemon = Daemon(options: options, logger: Logger(label: "kuasar.daemon")) { Backends.all($0, config: options) }
        do {
            try daemon.run()
        } catch {
            // The error names the call and its subject, e.g. bind("/run/kuasar/kuasar.sock").
            FileHandleStderr.write("kuasar daemon: \(error)\n")
            throw ExitCode(1)
        }
    }
}

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config", abstract: "The daemon's configuration.",
        subcommands: [Default.self, Check.self])

    struct Default: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "default", abstract: "Print the embedded defaults as a config file.")
        func run() { print(KuasarConfig.defaultText, terminator: "") }
    }

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "check", abstract: "Check a config file as the daemon would at start.")
        @Argument(help: "The file (default: \(KuasarConfig.defaultPath)).")
        var path = KuasarConfig.defaultPath
        func run() throws {
            do {
                _ = try KuasarConfig.load(path: path, required: true)
                print("\(path): ok")
            } catch {
                FileHandleStderr.write("kuasar config check: \(error)\n")
                throw ExitCode(1)
            }
        }
    }
}

struct HealthCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "health", abstract: "Ask a running daemon whether it is healthy.")

    @Option(help: "The daemon's API socket (asked with grpc.health.v1 Check).")
    var socket = KuasarConfig().socket
    @Option(help: "The daemon's state directory, for its details (default: the socket's directory).")
    var root: String?

    func run() throws {
        do {
            let answer = try HealthProbe.query(socketPath: socket, adminSocketPath: root.map { $0 + "/admin.sock" })
            print(answer)
            if !answer.hasPrefix("ok") { throw ExitCode(1) }
        } catch let e as SystemError {
            FileHandleStderr.write("kuasar health: \(e)\n")
            throw ExitCode(1)
        } catch let e as RPCError {
            FileHandleStderr.write("kuasar health: \(e.code): \(e.message)\n")
            throw ExitCode(1)
        }
    }
}

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "What this host gives the runtime.")

    @Option(help: "Configuration file (default: KUASAR_CONFIG, else \(KuasarConfig.defaultPath) when it exists).")
    var config: String?

    /// The shim binaries (containerd 1.6/1.7's runtime names) that reach these sandboxers:
    /// `kuasar` as containerd-shim-kuasar-v2, `kuasar-<x>` as containerd-shim-kuasar-<x>-v2.
    static func shims(_ sandboxers: [String]) -> String {
        let shims = sandboxers.filter { $0 == "kuasar" || $0.hasPrefix("kuasar-") }.map { "containerd-shim-\($0)-v2" }
        return "shim v2: " + (shims.isEmpty ? "none (a sandboxer named kuasar-<x> is containerd-shim-kuasar-<x>-v2)" : shims.joined(separator: ", "))
    }

    func run() throws {
        print("version: \(KuasarVersion.string)")
        // The backend a daemon would get: a reactor picks it the way the daemon's does.
        let forced = currentEnvironmentDictionary()["KUASAR_REACTOR"] != nil
        do {
            let reactor = try Reactor()
            let chosen = reactor.backendKind
            reactor.close()
            let why = forced ? "forced by KUASAR_REACTOR" : chosen == .uring ? "io_uring is available" : "the kernel refuses io_uring"
            print("reactor: \(chosen.rawValue) (\(why))")
        } catch {
            print("reactor: none: \(error)")
        }
        print("libseccomp: \(HostInfo.seccompVersion)")
        if let cg = try? CgroupHost.detect() {
            print("cgroups: \(cg.mode.rawValue) (controllers: \(cg.controllers.joined(separator: ", ")))")
        } else {
            print("cgroups: not found (containers run without resource limits)")
        }
        let file: KuasarConfig
        do {
            let (c, path) = try KuasarConfig.resolve(explicit: config, environment: currentEnvironmentDictionary())
            file = c
            print("config: \(path ?? "embedded defaults (\(KuasarConfig.defaultPath) does not exist)")")
        } catch {
            print("config: \(error)")
            file = KuasarConfig()
        }
        print("sandbox kinds:")
        for kind in KuasarConfig.Kind.allCases {
            let names = file.sandboxers.filter { $0.value == kind.rawValue }.keys.sorted()
            if !Backends.built.contains(kind.rawValue), let reason = kind.unavailableReason {
                print("  \(kind.rawValue): not available: \(reason)")
            } else if kind == .vm {
                let v = file.vm
                let why = QEMU.unavailableReason(binary: v.qemu) ?? VMBackend.missingImage(kernel: v.kernel, initrd: v.initrd)
                print("  vm: \(why.map { "not available: \($0)" } ?? "available"); sandboxers: \(names.isEmpty ? "none configured" : names.joined(separator: ", ")); \(Self.shims(names))")
                print("    hypervisor: qemu \(v.qemu): \(Spawner.firstLine(v.qemu, ["--version"]) ?? "no --version"); machine \(v.machine)")
                let accel = Accelerator.chosen(by: v.accelerator)
                print("    accelerator: \(accel.0.rawValue) (\(accel.why))")
                print("    guest image: kernel \(v.kernel), initrd \(v.initrd); \(v.vcpus) vCPU, \(v.memoryMiB) MiB by default")
                if v.template {
                    let lines = VMTemplates.describe(root: v.templateDir)
                    print("    templates: \(v.templateDir)\(lines.isEmpty ? ": none yet (the daemon builds the default size's at start; kuasar vm template build)" : "")")
                    for line in lines { print("      " + line) }
                } else {
                    print("    templates: off ([vm] template = false): every VM pod boots")
                }
            } else if kind == .wasm {
                let programs = Backends.wasmPrograms(file.wasm, root: file.effectiveRoot, logger: Logger(label: "kuasar.info"))
                let why = programs.unavailableReason
                print("  wasm: \(why.map { "not available: \($0)" } ?? "available"); sandboxers: \(names.isEmpty ? "none configured" : names.joined(separator: ", ")); \(Self.shims(names))")
                print("    runner: \(programs.settings.runner); engine \(file.wasm.engine)\(file.wasm.engineAnnotation ? ", or per container by the annotation \(WasmPrograms.engineAnnotation)" : " only")")
            } else {
                print("  \(kind.rawValue): available; sandboxers: \(names.isEmpty ? "none configured" : names.joined(separator: ", ")); \(Self.shims(names))")
            }
        }
        print("wasm engines:")
        do {
            let w = try Wasmtime(library: nil, cacheDir: nil)
            print("  wasmtime: available: \(w.version) (\(w.library))")
        } catch {
            print("  wasmtime: not available: \(RPCError.from(error).message)")
        }
        print("  wasmkit: available: \(WasmKitEngine().version) (embedded interpreter)")
        if !file.runtimes.isEmpty { print("OCI runtimes:") }
        for (name, r) in file.runtimes.sorted(by: { $0.key < $1.key }) {
            let names = file.sandboxers.filter { $0.value == KuasarConfig.ociKindPrefix + name }.keys.sorted()
            let used = "sandboxers: \(names.isEmpty ? "none configured" : names.joined(separator: ", "))"
            guard access(r.path, X_OK) == 0 else {
                print("  \(name): not usable: \(r.path) is not an executable file; \(used)")
                continue
            }
            let version = Spawner.firstLine(r.path, ["--version"])
            let features = Spawner.output(r.path, ["features"])
            let spec = (features.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) } as? [String: Any])?["ociVersionMax"] as? String
            print("  \(name): usable: \(version ?? "(no --version)"); \(spec.map { "features: spec up to \($0)" } ?? "no features command"); \(used)")
        }
    }

}

/// The wasm kind's runner for people: `kuasar wasm-run …` is `kuasar-wasm-run …`
/// (WasmRunner: the module's status, 134 after a trap, 125 when it could not start).
struct WasmRunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "wasm-run", abstract: "Run a WebAssembly (WASI preview 1) module in this process.",
                                                    discussion: WasmRunner.usage)
    @Argument(parsing: .allUnrecognized, help: "Options and the module, as kuasar-wasm-run takes them.")
    var arguments: [String] = []

    func run() throws {
        throw ExitCode(WasmRunner.main(arguments, name: "kuasar wasm-run"))
    }
}

struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vm", abstract: "The vm kind's guest templates.", subcommands: [Template.self])

    struct Template: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "template", abstract: "VM templates: a guest booted once and saved, which VM pods clone.",
                                                        subcommands: [Build.self, List.self])
    }

    struct Build: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "build", abstract: "Build (or check) the template for a VM size; pods of that size then clone it.")
        @Option(help: "Configuration file (default: KUASAR_CONFIG, else \(KuasarConfig.defaultPath) when it exists).")
        var config: String?
        @Option(help: "The VM's memory in MiB (default: [vm] memory_mib).")
        var memory: UInt32?
        @Option(help: "The VM's vCPUs (default: [vm] vcpus).")
        var vcpus: UInt32?

        func run() throws {
            try reportingErrors("vm template build") {
                let file = try KuasarConfig.resolve(explicit: config, environment: currentEnvironmentDictionary()).0
                var logger = Logger(label: "kuasar.vm")
                logger.logLevel = .warning
                let reactor = try Reactor(logger: logger)
                let supervisor = ProcessSupervisor(reactor: reactor)
                defer { supervisor.close(); reactor.close() }
                var settings = Backends.vmSettings(file.vm)
                settings.templateDir = file.vm.templateDir
                let qemu = QEMU(binary: file.vm.qemu, machine: QEMU.Machine(rawValue: file.vm.machine) ?? .microvm, supervisor: supervisor, reactor: reactor, logger: logger)
                if let why = qemu.unavailableReason ?? VMBackend.missingImage(kernel: settings.kernel, initrd: settings.initrd) { throw RPCError(.failedPrecondition, why) }
                let templates = VMTemplates(root: file.vm.templateDir, hypervisor: qemu, settings: settings, reactor: reactor, logger: logger)
                templates.removeLeftovers()
                let accel = Accelerator.chosen(by: settings.accelerator)
                var result: Result<VMTemplates.Template, RPCError>?
                let t0 = MonotonicClock.nanoseconds()
                templates.ensure(memoryMiB: memory ?? settings.memoryMiB, vcpus: vcpus ?? settings.vcpus, accelerator: accel.0) { result = $0 }
                _ = try reactor.run(until: { result != nil }, timeoutNS: settings.bootTimeoutNS + 60_000_000_000)
                switch result {
                case .success(let t)?:
                    print("template \(t.key): \(t.dir) (\(t.memoryMiB) MiB, \(t.vcpus) vCPU, \(accel.0.rawValue)); \(Int(Double(MonotonicClock.nanoseconds() - t0) / 1e6)) ms")
                case .failure(let e)?:
                    throw e
                case nil:
                    throw RPCError(.deadlineExceeded, "the template was not built in time")
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "The templates in [vm] template_dir.")
        @Option(help: "Configuration file (default: KUASAR_CONFIG, else \(KuasarConfig.defaultPath) when it exists).")
        var config: String?
        func run() throws {
            try reportingErrors("vm template list") {
                let file = try KuasarConfig.resolve(explicit: config, environment: currentEnvironmentDictionary()).0
                for line in VMTemplates.describe(root: file.vm.templateDir) { print(line) }
            }
        }
    }
}

/// Options every client command shares.
struct ClientOptions: ParsableArguments {
    @Option(help: "The daemon's state directory (KUASAR_ROOT, default /run/kuasar).")
    var root = currentEnvironmentDictionary()["KUASAR_ROOT"] ?? "/run/kuasar"

    func client() -> CLIClient {
        CLIClient(root: root, executable: selfExecutable(), environment: currentEnvironmentDictionary())
    }
}

func selfExecutable() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    return n > 0 ? String(decoding: buf[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
}

/// Runs a client action, printing a failure as `kuasar <cmd>: <error>` with exit code 1.
func reportingErrors(_ cmd: String, _ body: () throws -> Void) throws {
    do { try body() } catch let e as ExitCode { throw e } catch {
        FileHandleStderr.write("kuasar \(cmd): \(error)\n")
        throw ExitCode(1)
    }
}

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Run a container through the daemon, stdio attached; exits with its exit code.")
    @OptionGroup var common: ClientOptions
    @Option(help: "An OCI bundle (a directory with config.json).") var bundle: String?
    @Option(help: "A root filesystem to run the command in (a default spec is made).") var rootfs: String?
    @Option(help: "Container id (default: kuasar-<pid>).") var id: String?
    @Option(name: .customLong("env"), help: "KEY=value for the process (repeatable).") var env: [String] = []
    @Option(help: "Working directory inside the container.") var cwd = "/"
    @Option(help: "Hostname (with --rootfs).") var hostname: String?
    @Flag(name: .shortAndLong, help: "Start it and print its id; do not wait.") var detach = false
    @Flag(help: "Mount the rootfs read-only (with --rootfs).") var readOnly = false
    @Option(help: "A WebAssembly module (WASI preview 1) to run as the container, in a pod of the wasm kind; its arguments after --.") var wasm: String?
    @Option(help: "With --wasm: the engine (wasmkit or wasmtime; default: the config's [wasm] engine).") var engine: String?
    @Option(help: "With --wasm: the sandboxer whose kind runs it.") var sandboxer = "kuasar-wasm"
    @Argument(parsing: .postTerminator, help: "The command (after --), with --rootfs; the module's arguments with --wasm.") var command: [String] = []

    func run() throws {
        try reportingErrors("run") {
            var o = CLIClient.RunOptions(id: id ?? "kuasar-\(getpid())")
            o.bundle = bundle
            o.rootfs = rootfs
            o.args = command
            o.env = env
            o.cwd = cwd
            o.hostname = hostname
            o.detach = detach
            o.readonlyRootfs = readOnly
            o.wasm = wasm
            o.sandboxer = sandboxer
            if let engine { o.annotations[WasmPrograms.engineAnnotation] = engine }
            let code = try common.client().run(o)
            if code != 0 { throw ExitCode(code) }
        }
    }
}

struct ExecCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exec", abstract: "Run a process in a running container.")
    @OptionGroup var common: ClientOptions
    @Option(help: "Exec id (default: exec-<pid>).") var execID: String?
    @Option(name: .customLong("env"), help: "KEY=value (repeatable).") var env: [String] = []
    @Option(help: "Working directory.") var cwd = "/"
    @Argument(help: "The container.") var container: String
    @Argument(parsing: .postTerminator, help: "The command (after --).") var command: [String] = []

    func run() throws {
        try reportingErrors("exec") {
            guard !command.isEmpty else { throw ValidationError("a command is required after --") }
            let code = try common.client().exec(containerID: container, execID: execID ?? "exec-\(getpid())",
                                                args: command, env: env, cwd: cwd)
            if code != 0 { throw ExitCode(code) }
        }
    }
}

struct PsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ps", abstract: "List sandboxes and their containers.")
    @OptionGroup var common: ClientOptions

    func run() throws {
        try reportingErrors("ps") {
            print("SANDBOX".padding(24) + "CONTAINER".padding(24) + "PID".padding(10) + "STATUS".padding(10) + "NAMESPACE")
            for s in try common.client().list() {
                if s.containers.isEmpty { print(s.id.padding(24) + "-".padding(24) + "-".padding(10) + "-".padding(10) + s.namespace) }
                for c in s.containers {
                    print(s.id.padding(24) + c.id.padding(24) + "\(c.pid)".padding(10) + c.status.padding(10) + s.namespace)
                }
            }
        }
    }
}

struct KillCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "kill", abstract: "Signal a container's init (or all its processes).")
    @OptionGroup var common: ClientOptions
    @Flag(help: "Every process of the container.") var all = false
    @Argument(help: "The container.") var container: String
    @Argument(help: "Signal number or name (default TERM).") var signal = "TERM"

    func run() throws {
        try reportingErrors("kill") {
            let names: [String: Int32] = ["HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "TERM": 15, "STOP": 19, "CONT": 18]
            let key = signal.uppercased().hasPrefix("SIG") ? String(signal.uppercased().dropFirst(3)) : signal.uppercased()
            guard let sig = Int32(signal) ?? names[key] else { throw ValidationError("unknown signal \(signal)") }
            try common.client().kill(containerID: container, signal: sig, all: all)
        }
    }
}

struct RmCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "rm", abstract: "Delete a stopped container and its sandbox.")
    @OptionGroup var common: ClientOptions
    @Flag(name: .shortAndLong, help: "Kill it first if it runs.") var force = false
    @Argument(help: "The container.") var container: String

    func run() throws {
        try reportingErrors("rm") { try common.client().remove(containerID: container, force: force) }
    }
}

struct LogsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "logs", abstract: "What a detached container (run -d) wrote.")
    @OptionGroup var common: ClientOptions
    @Argument(help: "The container.") var container: String

    func run() throws {
        try reportingErrors("logs") {
            let bytes = try common.client().logs(containerID: container)
            bytes.withUnsafeBytes { _ = Glibc.write(1, $0.baseAddress, $0.count) }
        }
    }
}

extension String {
    func padding(_ n: Int) -> String { count >= n ? self + " " : self + String(repeating: " ", count: n - count) }
}

enum FileHandleStderr {
    static func write(_ s: String) {
        var s = s
        s.withUTF8 { _ = Glibc.write(2, $0.baseAddress, $0.count) }
    }
}

/// containerd runs the runtime as `containerd-shim-kuasar-v2` (a link to this binary).
func runShim(_ args: [String], invokedAs: String = "") -> Int32 {
    let flags: ShimProtocol.Flags
    do { flags = try ShimProtocol.parse(args) } catch {
        FileHandleStderr.write("containerd-shim-kuasar-v2: \(error)\n")
        return 2
    }
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    let exe = n > 0 ? String(decoding: buf[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    return ShimProtocol.run(flags, environment: currentEnvironmentDictionary(), executable: exe, sandboxer: ShimProtocol.sandboxer(invokedAs: invokedAs),
                            stdout: { bytes in bytes.withUnsafeBytes { _ = Glibc.write(1, $0.baseAddress, $0.count) } },
                            stderr: { FileHandleStderr.write($0) })
}

let invokedAs = CommandLine.arguments.first.map { String($0.split(separator: "/").last ?? "") } ?? ""
if invokedAs.hasPrefix("containerd-shim-kuasar") {
    exit(runShim(Array(CommandLine.arguments.dropFirst()), invokedAs: invokedAs))
}
if CommandLine.arguments.count > 1 && CommandLine.arguments[1] == "shim" {
    exit(runShim(Array(CommandLine.arguments.dropFirst(2))))
}
// The guest agent's own parser (the static kuasar-agent has no ArgumentParser), so both
// binaries take the same flags.
if CommandLine.arguments.count > 1 && CommandLine.arguments[1] == "agent" {
    LoggingSystem.bootstrap { label in
        var h = StreamLogHandler.standardError(label: label)
        h.logLevel = .info
        return h
    }
    exit(AgentMain.main(Array(CommandLine.arguments.dropFirst(2))))
}
Kuasar.main()

/// The sandbox kinds this build has, made for a daemon: the one place that sees them all.
enum Backends {
    static func vmSettings(_ v: KuasarConfig.VMConfig) -> VMSettings {
        var settings = VMSettings(kernel: v.kernel, initrd: v.initrd, accelerator: v.accelerator, memoryMiB: v.memoryMiB, vcpus: v.vcpus,
                                  bootTimeoutNS: UInt64(v.bootTimeoutSecs) * 1_000_000_000, kernelArgs: v.kernelArgs)
        settings.templateDir = v.template ? v.templateDir : nil
        return settings
    }

    /// The vm kind with the configured VMM and guest image.
    static func vm(_ ctx: BackendContext, config: KuasarConfig) -> VMBackend {
        let v = config.vm
        let qemu = QEMU(binary: v.qemu, machine: QEMU.Machine(rawValue: v.machine) ?? .microvm, supervisor: ctx.registry.engine.supervisor,
                        reactor: ctx.reactor, logger: ctx.logger)
        let settings = vmSettings(v)
        return VMBackend(hypervisor: qemu, settings: settings, registry: ctx.registry, reactor: ctx.reactor, logger: ctx.logger)
    }

    static let built: Set<String> = ["namespace", "vm", "wasm"]

    /// The wasm kind's module programs, from `[wasm]`.
    /// `supervisor` runs the compile helper (nil for a look, as `kuasar info` takes).
    static func wasmPrograms(_ w: KuasarConfig.WasmConfig, root: String, supervisor: ProcessSupervisor? = nil, logger: Logger) -> WasmPrograms {
        WasmPrograms(settings: .init(engine: w.engine, engineAnnotation: w.engineAnnotation, wasmtimeLibrary: w.wasmtimeLibrary,
                                     cacheDir: w.cacheDir ?? root + "/wasm-cache", runner: w.runner ?? defaultRunner()),
                     supervisor: supervisor, logger: logger)
    }

    /// `kuasar-wasm-run` beside the binary that is running.
    static func defaultRunner() -> String {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { return "/usr/local/bin/kuasar-wasm-run" }
        let exe = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return exe[..<(exe.lastIndex(of: "/") ?? exe.startIndex)] + "/kuasar-wasm-run"
    }

    /// The namespace kind, and one `oci:<name>` kind per configured runtime: the same pods,
    /// with that runtime running their containers.
    static func all(_ ctx: BackendContext, config: KuasarConfig) -> [SandboxBackend] {
        var kinds: [SandboxBackend] = [NamespaceBackend(registry: ctx.registry, tasks: ctx.containers, reactor: ctx.reactor, logger: ctx.logger)]
        kinds.append(vm(ctx, config: config))
        // The wasm kind: the namespace kind's pods, whose module entrypoints run through the runner.
        let programs = wasmPrograms(config.wasm, root: ctx.registry.root, supervisor: ctx.registry.engine.supervisor, logger: ctx.logger)
        kinds.append(NamespaceBackend(kind: "wasm", registry: ctx.registry, tasks: ContainerTaskBackend(registry: ctx.registry, logger: ctx.logger, programs: programs),
                                      reactor: ctx.reactor, logger: ctx.logger, unavailableReason: { programs.unavailableReason }))
        // One task-server kind per [servers.<name>] a sandboxer uses.
        for (name, s) in config.servers.sorted(by: { $0.key < $1.key }) where config.sandboxers.values.contains(KuasarConfig.serverKindPrefix + name) {
            let program = TaskServerProgram(name: name, path: s.path, args: s.args, address: s.address, restartOnFailure: s.restart == "on-failure",
                                            maxRestarts: s.maxRestarts, readyTimeoutNS: UInt64(s.readyTimeoutSecs) * 1_000_000_000)
            let pods = NamespaceBackend(kind: KuasarConfig.serverKindPrefix + name, registry: ctx.registry, tasks: ctx.containers, reactor: ctx.reactor, logger: ctx.logger)
            kinds.append(TaskServerBackend(program: program, pods: pods, registry: ctx.registry, reactor: ctx.reactor, logger: ctx.logger))
        }
        let used = Set(config.sandboxers.values.filter { $0.hasPrefix(KuasarConfig.ociKindPrefix) })
        guard !used.isEmpty else { return kinds }
        // Their containers' inits (and detached execs) become our children when the runtime exits.
        do { try Signals.becomeChildSubreaper() } catch { ctx.logger.error("OCI runtimes: \(error); their containers cannot be watched") }
        for (name, r) in config.runtimes.sorted(by: { $0.key < $1.key }) where used.contains(KuasarConfig.ociKindPrefix + name) {
            let base = ctx.registry.root + "/runtimes/" + name
            let runtime = OCIRuntime(name: name, path: r.path, root: r.root ?? base, extraArgs: r.extraArgs, workDir: base + ".calls",
                                     supervisor: ctx.registry.engine.supervisor, reactor: ctx.reactor, logger: ctx.logger)
            runtime.deadlineNS = UInt64(r.timeoutSecs) * 1_000_000_000
            let tasks = OCIRuntimeTasks(runtime: runtime, registry: ctx.registry, logger: ctx.logger)
            kinds.append(NamespaceBackend(kind: KuasarConfig.ociKindPrefix + name, registry: ctx.registry, tasks: tasks, reactor: ctx.reactor, logger: ctx.logger,
                                          unavailableReason: { runtime.unavailableReason }))
        }
        return kinds
    }
}
