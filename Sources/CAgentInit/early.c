#define _GNU_SOURCE
#include "CAgentInit.h"
#include <errno.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <time.h>

static int proc_mounted;
static unsigned long long early_boottime_ns;

// Runs before any Swift code: as PID 1 of a fresh initramfs nothing is mounted, and the
// Swift runtime needs /proc/self/exe. Elsewhere (a process with /proc) it does nothing.
__attribute__((constructor(101))) static void ks_agent_early(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_BOOTTIME, &ts) == 0) early_boottime_ns = (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
    if (getpid() != 1 || access("/proc/self/exe", F_OK) == 0) return;
    mkdir("/proc", 0555);
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) == 0) proc_mounted = 1;
}

int ks_agent_early_proc_mounted(void) { return proc_mounted; }


unsigned long long ks_agent_early_boottime_ns(void) { return early_boottime_ns; }
