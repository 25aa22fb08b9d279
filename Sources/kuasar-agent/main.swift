// The guest's PID 1 (and `kuasar agent` on its own): the agent's layers only, linked
// statically by `make guest`. All of it is in KuasarAgent; this only starts it.
#if canImport(Glibc)
import Glibc
#endif
import CAgentInit
import Logging
import KuasarAgent

LoggingSystem.bootstrap { label in
    var h = StreamLogHandler.standardError(label: label)
    h.logLevel = .info
    return h
}
exit(AgentMain.main(Array(CommandLine.arguments.dropFirst()), procMountedEarly: ks_agent_early_proc_mounted() != 0))
