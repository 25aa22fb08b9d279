import ArgumentParser
import Logging
import Runtime

#if canImport(Glibc)
import Glibc
#endif

/// The `kuasar` command: argument parsing and wiring only; all behaviour is in Runtime.
struct Kuasar: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kuasar",
        abstract: "A multi-sandbox container runtime: one daemon per node, no shim per pod.",
        version: KuasarVersion.string,
        subcommands: [DaemonCommand.self, HealthCommand.self, InfoCommand.self])
}

struct DaemonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "daemon", abstract: "Run the daemon in the foreground.")

    @Option(help: "The API socket (created 0600, parent directory created).")
    var socket = DaemonOptions().socketPath

    @Option(help: "State directory (sandbox task sockets, admin.sock); default: the socket's directory.")
    var root: String?

    @Option(help: "Reactor backend: io_uring or epoll (default: io_uring when the kernel allows it; KUASAR_REACTOR overrides).")
    var reactor: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    func run() throws {
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw ValidationError("unknown log level \"\(logLevel)\"")
        }
        var options = DaemonOptions()
        options.socketPath = socket
        options.root = root
        if let reactor {
            guard let kind = BackendKind(rawValue: reactor) else {
                throw ValidationError("--reactor must be io_uring or epoll, not \"\(reactor)\"")
            }
            options.backend = kind
        }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let daemon = Daemon(options: options, logger: Logger(label: "kuasar.daemon"))
        do {
            try daemon.run()
        } catch {
            // The error names the call and its subject, e.g. bind("/run/kuasar/kuasar.sock").
            FileHandleStderr.write("kuasar daemon: \(error)\n")
            throw ExitCode(1)
        }
    }
}

struct HealthCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "health", abstract: "Ask a running daemon whether it is healthy.")

    @Option(help: "The daemon's API socket.")
    var socket = DaemonOptions().socketPath

    func run() throws {
        do {
            let answer = try HealthProtocol.query(socketPath: socket)
            print(answer)
            if !answer.hasPrefix("ok") { throw ExitCode(1) }
        } catch let e as SystemError {
            FileHandleStderr.write("kuasar health: \(e)\n")
            throw ExitCode(1)
        }
    }
}

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "What this host gives the runtime.")

    func run() throws {
        print("version: \(KuasarVersion.string)")
        let env = currentEnvironmentDictionary()
        let chosen = BackendKind.preferred(environment: env)
        let why = env["KUASAR_REACTOR"] != nil ? "forced by KUASAR_REACTOR"
            : BackendKind.uring.isAvailable ? "io_uring is available" : "the kernel refuses io_uring"
        print("reactor: \(chosen.rawValue) (\(why))")
        print("libseccomp: \(HostInfo.seccompVersion)")
    }
}

enum FileHandleStderr {
    static func write(_ s: String) {
        var s = s
        s.withUTF8 { _ = Glibc.write(2, $0.baseAddress, $0.count) }
    }
}

/// containerd runs the runtime as `containerd-shim-kuasar-v2` (a link to this binary).
func runShim(_ args: [String]) -> Int32 {
    let flags: ShimProtocol.Flags
    do { flags = try ShimProtocol.parse(args) } catch {
        FileHandleStderr.write("containerd-shim-kuasar-v2: \(error)\n")
        return 2
    }
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    let exe = n > 0 ? String(decoding: buf[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    return ShimProtocol.run(flags, environment: currentEnvironmentDictionary(), executable: exe,
                            stdout: { bytes in bytes.withUnsafeBytes { _ = Glibc.write(1, $0.baseAddress, $0.count) } },
                            stderr: { FileHandleStderr.write($0) })
}

let invokedAs = CommandLine.arguments.first.map { String($0.split(separator: "/").last ?? "") } ?? ""
if invokedAs.hasPrefix("containerd-shim-kuasar") {
    exit(runShim(Array(CommandLine.arguments.dropFirst())))
}
if CommandLine.arguments.count > 1 && CommandLine.arguments[1] == "shim" {
    exit(runShim(Array(CommandLine.arguments.dropFirst(2))))
}
Kuasar.main()
