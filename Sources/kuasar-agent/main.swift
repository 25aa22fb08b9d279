// The guest's PID 1 (and `kuasar agent` on its own): the agent's layers only, linked
// statically by `make guest`. All of it is in KuasarAgent; this only starts it, with what
// CAgentInit's constructor did before the runtime started.
#if canImport(Glibc)
import Glibc
#endif
import CAgentInit
import KuasarAgent

// The boot breakdown's mark between the Swift runtime's start and ours.
var mainStarted = timespec()
clock_gettime(CLOCK_BOOTTIME, &mainStarted)
// No LoggingSystem.bootstrap: swift-log's own default is the handler this wants
// (StreamLogHandler.standardError at .info), and PID 1 skips the code that replaces it.

let early = EarlyBoot(mounted: ks_agent_early_proc_mounted() != 0, source: EarlyBoot.Source(
    summary: { kind in
        var ns: UInt64 = 0
        let failed = ks_agent_boot_summary(kind.rawValue, &ns)
        return (Double(ns) / 1e6, Int(failed))
    },
    steps: {
        var out: [EarlyBoot.Step] = []
        var i: Int32 = 0, kind: Int32 = 0, result: Int32 = 0, ns: UInt64 = 0
        var what: UnsafePointer<CChar>?
        while ks_agent_boot_step(i, &kind, &what, &result, &ns) == 0, let w = what {
            if let kind = EarlyBoot.Step.Kind(rawValue: kind) {
                out.append(EarlyBoot.Step(kind: kind, what: String(cString: w), result: result, ms: Double(ns) / 1e6))
            }
            i += 1
        }
        return out
    },
    join: {
        var waited: UInt64 = 0, thread: UInt64 = 0
        _ = ks_agent_boot_wait(&waited, &thread)
        return (Double(waited) / 1e6, Double(thread) / 1e6)
    }))
exit(AgentMain.main(Array(CommandLine.arguments.dropFirst()), early: early,
                    processStartBootNS: UInt64(ks_agent_early_boottime_ns()),
                    mainStartBootNS: UInt64(mainStarted.tv_sec) * 1_000_000_000 + UInt64(mainStarted.tv_nsec)))
