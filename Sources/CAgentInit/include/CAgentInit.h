// CAgentInit: what the guest agent must do before Swift's runtime starts. Linked only
// into `kuasar-agent` (its constructor must not run in the daemon).
#ifndef KS_CAGENTINIT_H
#define KS_CAGENTINIT_H

/// Whether the early constructor mounted /proc (PID 1 with no /proc: the Swift
/// runtime reads /proc/self/exe before main and aborts without it).
int ks_agent_early_proc_mounted(void);
/// CLOCK_BOOTTIME when the process's first constructor ran (ns since the kernel started):
/// where the kernel's part of a boot ends and the agent's begins.
unsigned long long ks_agent_early_boottime_ns(void);

#endif
