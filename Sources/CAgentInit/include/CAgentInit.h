// CAgentInit: what the guest agent does before Swift's runtime starts. Linked only into
// `kuasar-agent` (and the tests, which call the boot thread directly); its constructor
// acts only as PID 1 of a fresh initramfs, so elsewhere it does nothing.
//
// Why C: a constructor runs before the Swift runtime, and under TCG the runtime's start
// and the agent's first Swift code take ~60 ms of a guest's boot. The kernel's part of
// the init — mounts, the channel's modules, cgroup2, loopback — is syscalls only, so it
// runs from here, the modules, cgroups and loopback on a thread of their own, while the
// runtime and the agent start on the main thread (GuestInit waits for it before the
// container engine looks at cgroups and before the channels open).
#ifndef KS_CAGENTINIT_H
#define KS_CAGENTINIT_H

#pragma clang assume_nonnull begin

/// Whether the early constructor mounted /proc (PID 1 with no /proc: the Swift
/// runtime reads /proc/self/exe before main and aborts without it).
int ks_agent_early_proc_mounted(void);
/// CLOCK_BOOTTIME when the process's first constructor ran (ns since the kernel started):
/// where the kernel's part of a boot ends and the agent's begins.
unsigned long long ks_agent_early_boottime_ns(void);

/// What a step of the early boot was.
enum {
    KS_BOOT_MOUNT = 1,   // a mount, in the constructor (done before main)
    KS_BOOT_MODULE = 2,  // finit_module of a module the image lists for the boot
    KS_BOOT_CGROUP = 3,  // cgroup2 on /sys/fs/cgroup, its controllers enabled below
    KS_BOOT_NET = 4,     // loopback up
    KS_BOOT_LINK = 5,    // a /dev link (ptmx, fd, stdin...), in the constructor
};
/// What the boot thread does besides the modules (flags of ks_agent_boot_start).
enum { KS_BOOT_DO_CGROUP2 = 1, KS_BOOT_DO_LOOPBACK = 2 };

/// Starts the boot thread (all signals blocked: PID 1's signalfd sees every SIGCHLD): it
/// loads, in order, each module `list` names (a path relative to `module_dir` a line,
/// dependencies first, as the image build wrote it), then does what `flags` ask. 0, or
/// -errno when no thread could start (-EBUSY: one runs and was not waited for).
int ks_agent_boot_start(const char *module_dir, const char *list, int flags);
/// Whether a boot thread was started and not yet waited for (the constructor's, as PID 1).
int ks_agent_boot_running(void);
/// Joins the boot thread: how long this waited and the thread's own time (ns). Its steps
/// stay readable through ks_agent_boot_step until the next start. Returns the number of
/// steps, the constructor's mounts first (at once when no thread runs: those alone).
int ks_agent_boot_wait(unsigned long long *waited_ns, unsigned long long *thread_ns);
/// How many of the steps are the constructor's mounts (readable at once, the thread's
/// only once it was waited for).
int ks_agent_boot_mounts(void);
/// The steps of `kind` readable now (the mounts at once, the others once waited for):
/// their time together (ns); returns how many failed.
int ks_agent_boot_summary(int kind, unsigned long long *ns);
/// Step `i` (0 ≤ i < the count ks_agent_boot_wait returned): its kind, what it did (a
/// mount point or link, a module's path, "cgroup2", "lo"), 0 or -errno, and its time (ns).
/// Returns 0, or -EINVAL for an index out of range (or a thread's step before the wait).
int ks_agent_boot_step(int i, int *kind, const char *_Nullable *_Nonnull what, int *result, unsigned long long *ns);

#pragma clang assume_nonnull end

#endif
