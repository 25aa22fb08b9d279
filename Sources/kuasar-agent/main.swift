// The guest's PID 1 (and `kuasar agent` on its own): the agent's layers only, linked
// statically by `make guest`. All of it is in KuasarAgent; this only starts it.
#if canImport(Glibc)
import Glibc
#endif
import CAgentInit
import Logging
import KuasarAgent

// The boot breakdown's mark between the Swift runtime's start and ours.
var mainStarted = timespec()
clock_gettime(CLOCK_BOOTTIME, &mainStarted)
LoggingSystem.bootstrap { label in
    var h = StreamLogHandler.standardError(label: label)
    h.logLevel = .info
    return h
}
exit(AgentMain.main(Array(CommandLine.arguments.dropFirst()), procMountedEarly: ks_agent_early_proc_mounted() != 0,
                    processStartBootNS: UInt64(ks_agent_early_boottime_ns()),
                    mainStartBootNS: UInt64(mainStarted.tv_sec) * 1_000_000_000 + UInt64(mainStarted.tv_nsec)))
