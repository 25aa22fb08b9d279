#include "CAgentInit.h"
#include "CShims.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static int proc_mounted;
static unsigned long long early_boottime_ns;

static unsigned long long monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

// ---- the steps, for the agent's log and Check's boot breakdown ----------------------
// Written by the constructor (mounts), then by the boot thread alone; read once joined.
enum { MAX_STEPS = 64 };
static struct step {
    int kind;
    char what[112];
    int result;
    unsigned long long ns;
} steps[MAX_STEPS];
static int step_count, mount_steps;

static void record(int kind, const char *what, int result, unsigned long long started_ns) {
    if (step_count == MAX_STEPS) return;
    struct step *s = &steps[step_count++];
    s->kind = kind;
    snprintf(s->what, sizeof s->what, "%s", what);
    s->result = result;
    s->ns = monotonic_ns() - started_ns;
}

// ---- the mounts every guest needs (in the constructor: all that follows sees them) ----
static int mount_at(const char *source, const char *target, const char *type, unsigned long flags, const char *data) {
    if (mkdir(target, 0755) != 0 && errno != EEXIST) return -errno;
    return mount(source, target, type, flags, data) == 0 ? 0 : -errno;
}

static void guest_mounts(void) {
    static const struct { const char *source, *target, *type; unsigned long flags; const char *data; } mounts[] = {
        {"sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL},
        {"devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"},
        {"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
        {"tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
        {"tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"},
        {"tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
    };
    static const char *links[][2] = {
        {"/dev/ptmx", "pts/ptmx"}, {"/dev/fd", "/proc/self/fd"}, {"/dev/stdin", "/proc/self/fd/0"},
        {"/dev/stdout", "/proc/self/fd/1"}, {"/dev/stderr", "/proc/self/fd/2"},
    };
    umask(022);
    for (size_t i = 0; i < sizeof mounts / sizeof mounts[0]; i++) {
        unsigned long long t = monotonic_ns();
        record(KS_BOOT_MOUNT, mounts[i].target, mount_at(mounts[i].source, mounts[i].target, mounts[i].type, mounts[i].flags, mounts[i].data), t);
    }
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
        unsigned long long t = monotonic_ns();
        unlink(links[i][0]);
        record(KS_BOOT_LINK, links[i][0], symlink(links[i][1], links[i][0]) == 0 ? 0 : -errno, t);
    }
}

// ---- the boot thread: only syscalls, no Swift, nothing that could unwind -----------
static struct {
    pthread_t thread;
    int running;
    int flags;
    char module_dir[256];
    char list[320];
    unsigned long long thread_ns;
} boot;

static void load_modules(void) {
    unsigned long long t = monotonic_ns();
    char text[8192];
    int fd = open(boot.list, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { record(KS_BOOT_MODULE, boot.list, -errno, t); return; }
    ssize_t n = read(fd, text, sizeof text - 1);
    int e = errno;
    close(fd);
    if (n < 0) { record(KS_BOOT_MODULE, boot.list, -e, t); return; }
    if (n == (ssize_t)sizeof text - 1) { record(KS_BOOT_MODULE, boot.list, -EFBIG, t); return; }
    text[n] = 0;
    for (char *save = NULL, *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (!*line || *line == '#') continue;
        char path[512];
        t = monotonic_ns();
        if (snprintf(path, sizeof path, "%s/%s", boot.module_dir, line) >= (int)sizeof path) { record(KS_BOOT_MODULE, line, -ENAMETOOLONG, t); continue; }
        int mfd = open(path, O_RDONLY | O_CLOEXEC);
        int rc = mfd < 0 ? -errno : ks_finit_module(mfd);
        if (mfd >= 0) close(mfd);
        record(KS_BOOT_MODULE, line, rc == -EEXIST ? 0 : rc, t);
    }
}

// cgroup2 with every controller the kernel offers enabled for the containers below.
// A kernel without cgroup2 answers -ENODEV: the agent mounts v1's controllers instead.
static void cgroup2(void) {
    unsigned long long t = monotonic_ns();
    int rc = mount_at("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, "nsdelegate");
    record(KS_BOOT_CGROUP, "cgroup2", rc, t);
    if (rc != 0) return;
    t = monotonic_ns();
    char controllers[512], enable[1024];
    int fd = open("/sys/fs/cgroup/cgroup.controllers", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, controllers, sizeof controllers - 1);
    rc = n < 0 ? -errno : 0;
    if (fd >= 0) close(fd);
    if (rc == 0) {
        controllers[n] = 0;
        size_t len = 0;
        for (char *save = NULL, *c = strtok_r(controllers, " \n", &save); c; c = strtok_r(NULL, " \n", &save))
            len += (size_t)snprintf(enable + len, sizeof enable - len, "%s+%s", len ? " " : "", c);
        if (len > 0 && len < sizeof enable) {
            fd = open("/sys/fs/cgroup/cgroup.subtree_control", O_WRONLY | O_CLOEXEC);
            rc = fd < 0 ? -errno : (write(fd, enable, len) == (ssize_t)len ? 0 : -errno);
            if (fd >= 0) close(fd);
        }
    }
    record(KS_BOOT_CGROUP, "cgroup.subtree_control", rc, t);
}

static void *boot_main(void *arg) {
    (void)arg;
    unsigned long long t = monotonic_ns();
    load_modules();
    if (boot.flags & KS_BOOT_DO_CGROUP2) cgroup2();
    if (boot.flags & KS_BOOT_DO_LOOPBACK) {
        unsigned long long l = monotonic_ns();
        record(KS_BOOT_NET, "lo", ks_if_set_up("lo", 1), l);
    }
    boot.thread_ns = monotonic_ns() - t;
    return NULL;
}

int ks_agent_boot_start(const char *module_dir, const char *list, int flags) {
    if (boot.running) return -EBUSY;
    if (snprintf(boot.module_dir, sizeof boot.module_dir, "%s", module_dir) >= (int)sizeof boot.module_dir ||
        snprintf(boot.list, sizeof boot.list, "%s", list) >= (int)sizeof boot.list) return -ENAMETOOLONG;
    boot.flags = flags;
    boot.thread_ns = 0;
    step_count = mount_steps;  // a new boot keeps the constructor's mounts only
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    int rc = pthread_create(&boot.thread, NULL, boot_main, NULL);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    if (rc != 0) return -rc;
    boot.running = 1;
    return 0;
}

int ks_agent_boot_running(void) { return boot.running; }

int ks_agent_boot_wait(unsigned long long *waited_ns, unsigned long long *thread_ns) {
    unsigned long long t = monotonic_ns();
    if (boot.running) {
        pthread_join(boot.thread, NULL);
        boot.running = 0;
    }
    *waited_ns = monotonic_ns() - t;
    *thread_ns = boot.thread_ns;
    return step_count;
}

int ks_agent_boot_mounts(void) { return mount_steps; }

int ks_agent_boot_summary(int kind, unsigned long long *ns) {
    int count = boot.running ? mount_steps : step_count, failed = 0;
    *ns = 0;
    for (int i = 0; i < count; i++) {
        if (steps[i].kind != kind) continue;
        *ns += steps[i].ns;
        if (steps[i].result != 0) failed++;
    }
    return failed;
}

int ks_agent_boot_step(int i, int *kind, const char *_Nullable *_Nonnull what, int *result, unsigned long long *ns) {
    if (i < 0 || i >= (boot.running ? mount_steps : step_count)) return -EINVAL;
    *kind = steps[i].kind;
    *what = steps[i].what;
    *result = steps[i].result;
    *ns = steps[i].ns;
    return 0;
}

// ---- the constructor --------------------------------------------------------------
// Runs before any Swift code: as PID 1 of a fresh initramfs nothing is mounted, and the
// Swift runtime needs /proc/self/exe. Elsewhere (a process with /proc) it does nothing.
__attribute__((constructor(101))) static void ks_agent_early(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_BOOTTIME, &ts) == 0) early_boottime_ns = (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
    if (getpid() != 1 || access("/proc/self/exe", F_OK) == 0) return;
    mkdir("/proc", 0555);
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) return;
    proc_mounted = 1;
    guest_mounts();
    mount_steps = step_count;
    // The modules the image build listed for the boot (the serial channel's: what the
    // hosts' VM drivers configure); GuestInit loads any other its settings need after.
    struct utsname u;
    if (uname(&u) != 0) return;
    char dir[256], list[320];
    snprintf(dir, sizeof dir, "/lib/modules/%s", u.release);
    snprintf(list, sizeof list, "%s/kuasar.boot", dir);
    ks_agent_boot_start(dir, list, KS_BOOT_DO_CGROUP2 | KS_BOOT_DO_LOOPBACK);
}

int ks_agent_early_proc_mounted(void) { return proc_mounted; }

unsigned long long ks_agent_early_boottime_ns(void) { return early_boottime_ns; }
