#if canImport(Glibc)
import Glibc
#endif
import Logging
import KuasarSystem

private func printError(_ s: String) {
    var s = s
    s.withUTF8 { _ = Glibc.write(2, $0.baseAddress, $0.count) }
}

/// `kuasar agent` and the static `kuasar-agent`: one entry, parsed by hand so the guest
/// binary needs no argument parser.
///
///     kuasar agent [--listen ADDR]... [--root DIR] [--sandbox-id ID] [--namespace NS]
///                  [--events-address ADDR] [--bundle-root DIR] [--cgroup-parent P]
///                  [--log-level L]
///
/// As PID 1 (the guest's init) with no `--listen`, it mounts what a guest needs, loads
/// the modules, mounts the host's share, takes its channels from the kernel command
/// line and confines bundles to the share; it never returns.
public enum AgentMain {
    public static let usage = """
        usage: kuasar agent [--listen unix:///PATH | vsock://PORT | serial://NAME]... [--root DIR]
                            [--sandbox-id ID] [--namespace NS] [--events-address ADDR]
                            [--bundle-root DIR] [--cgroup-parent PATH] [--log-level LEVEL]
          As PID 1 with no --listen: a guest's init, configured by kuasar.* kernel parameters.
        """

    public static func parse(_ args: [String]) throws(AgentError) -> (AgentOptions, Logger.Level) {
        var o = AgentOptions()
        var level = Logger.Level.info
        var i = 0
        func value(_ flag: String) throws(AgentError) -> String {
            i += 1
            guard i < args.count else { throw AgentError("\(flag) needs a value\n\(usage)") }
            return args[i]
        }
        while i < args.count {
            let a = args[i]
            switch a {
            case "--listen": o.channels.append(try AgentChannel(try value(a)))
            case "--root": o.root = try value(a)
            case "--sandbox-id": o.sandboxID = try value(a)
            case "--namespace": o.namespace = try value(a)
            case "--events-address": o.eventsAddress = try value(a)
            case "--bundle-root": o.bundleRoot = try value(a)
            case "--cgroup-parent": o.cgroupParent = try value(a)
            case "--log-level":
                let v = try value(a)
                guard let l = Logger.Level(rawValue: v) else { throw AgentError("--log-level \(v): one of trace, debug, info, notice, warning, error, critical") }
                level = l
            case "-h", "--help": throw AgentError(usage)
            default: throw AgentError("unknown argument \(a)\n\(usage)")
            }
            i += 1
        }
        guard o.root.hasPrefix("/") else { throw AgentError("--root \(o.root) must be an absolute path") }
        return (o, level)
    }

    /// Runs the agent; returns the exit code (never returns as a guest's init).
    /// `processStartBootNS`: CLOCK_BOOTTIME at the process's first C constructor (0: unknown).
    /// `early`: what the executable's C constructor did before the runtime started.
    public static func main(_ args: [String], early: EarlyBoot? = nil, processStartBootNS: UInt64 = 0, mainStartBootNS: UInt64 = 0) -> Int32 {
        let pid1 = getpid() == 1
        var parsed: (AgentOptions, Logger.Level)
        do {
            // As a guest's init the arguments are the kernel's (its command line words
            // without '='): the settings are the kuasar.* parameters instead.
            parsed = pid1 && !args.contains("--listen") ? (AgentOptions(), .info) : try parse(args)
        } catch {
            printError("kuasar agent: \(error)\n")
            if !pid1 { return 2 }
            parsed = (AgentOptions(), .info)
        }
        var (options, level) = parsed
        var logger = Logger(label: "kuasar.agent")
        logger.logLevel = level
        if pid1 && options.channels.isEmpty {
            let (settings, timings, boot) = GuestInit.run(logger: logger, processStartBootNS: processStartBootNS, mainStartBootNS: mainStartBootNS, early: early)
            if let l = Logger.Level(rawValue: settings.logLevel) { logger.logLevel = l }
            for c in settings.channels {
                do { options.channels.append(try AgentChannel(c)) } catch { logger.error("init: kuasar.channel: \(error)") }
            }
            options.bundleRoot = GuestInit.sharePath
            options.root = "/run/kuasar-agent"
            options.bootMS = timings
            options.debug = settings.debug
            options.guest = settings
            options.boot = boot
        }
        guard !options.channels.isEmpty else {
            printError("kuasar agent: no channel to serve: give --listen (or run as a guest's PID 1)\n\(usage)\n")
            return 2
        }
        while true {
            do {
                try Agent(options: options, logger: logger).run()
                if !pid1 { return 0 }
                logger.error("agent: the loop ended; PID 1 serves again")
            } catch {
                logger.error("agent: \(error)")
                if !pid1 { return 1 }
            }
            // PID 1 must not exit: the kernel would panic and take every container along.
            usleep(200_000)
        }
    }
}
