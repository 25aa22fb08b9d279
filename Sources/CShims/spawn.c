#include "CShims.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

int ks_pidfd_open(pid_t pid) {
    long fd = syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0) return -errno;
    // pidfd_open has no CLOEXEC flag: a pidfd is always close-on-exec.
    return (int)fd;
}

int ks_pidfd_send_signal(int pidfd, int sig) {
    return syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) < 0 ? -errno : 0;
}

static void decode(const siginfo_t *si, int *code, int *status) {
    *code = si->si_code;
    *status = si->si_status;
}

int ks_pidfd_wait(int pidfd, int nohang, int *code, int *status) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int rc;
    do {
        rc = waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, WEXITED | (nohang ? WNOHANG : 0));
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) return -errno;
    if (si.si_pid == 0) return 0;
    decode(&si, code, status);
    return si.si_pid;
}

int ks_peek_exited_child(void) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int rc;
    do { rc = waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT); } while (rc < 0 && errno == EINTR);
    if (rc < 0) return -errno;
    return si.si_pid;
}

int ks_reap_pid(pid_t pid, int *code, int *status) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int rc;
    do { rc = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG); } while (rc < 0 && errno == EINTR);
    if (rc < 0) return -errno;
    if (si.si_pid == 0) return 0;
    decode(&si, code, status);
    return si.si_pid;
}

int ks_close_range(unsigned first, unsigned last, unsigned flags) {
    return syscall(SYS_close_range, first, last, flags) < 0 ? -errno : 0;
}

long ks_clone3_pidfd(uint64_t flags, int cgroup_fd, int *pidfd) {
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = CLONE_PIDFD | flags;
    args.pidfd = (uint64_t)(uintptr_t)pidfd;
    args.exit_signal = SIGCHLD;
    if (cgroup_fd >= 0) {
        args.flags |= 0x200000000ULL;  // CLONE_INTO_CGROUP (older headers lack it)
        args.cgroup = (uint64_t)cgroup_fd;
    }
    long rc = syscall(SYS_clone3, &args, sizeof args);
    return rc < 0 ? -errno : rc;
}

int ks_child_map_fds(const ks_fd_map *fds, int count, int *keep) {
    // Two passes so a mapping never overwrites the source of a later one: first lift
    // every source (and *keep) above the highest target, then dup2 each down to its
    // number (dup2 clears close-on-exec).
    int top = 2;
    for (int i = 0; i < count; i++)
        if (fds[i].to > top) top = fds[i].to;
    if (keep && *keep >= 0) {
        int lifted_keep = fcntl(*keep, F_DUPFD_CLOEXEC, top + 1);
        if (lifted_keep < 0) return -1;
        *keep = lifted_keep;
    }
    int lifted[count > 0 ? count : 1];
    for (int i = 0; i < count; i++) {
        lifted[i] = fcntl(fds[i].from, F_DUPFD_CLOEXEC, top + 1);
        if (lifted[i] < 0) return -1;
    }
    for (int i = 0; i < count; i++)
        if (dup2(lifted[i], fds[i].to) < 0) return -1;
    // Close every low fd that is not a target; mark every high one close-on-exec (this
    // keeps *keep open until exec). The descriptor table is the child's own even on
    // the vfork path (no CLONE_FILES).
    for (int fd = 0; fd <= top; fd++) {
        int is_target = 0;
        for (int i = 0; i < count; i++) if (fds[i].to == fd) is_target = 1;
        if (!is_target) close(fd);
    }
    return ks_close_range((unsigned)top + 1, ~0U, CLOSE_RANGE_CLOEXEC) < 0 ? -1 : 0;
}

enum { STAGE_EXEC = 0, STAGE_FDS = 1, STAGE_CWD = 2, STAGE_SETSID = 3, STAGE_SIGNALS = 4, STAGE_SETNS = 5 };

// What the child needs, and where it reports a failure before exec: through shared
// memory when it shares our address space (vfork path), else over a pipe.
struct child_ctx {
    const ks_spawn_attr *attr;
    int err_fd;            // -1 on the vfork path
    volatile int err;
    volatile int stage;
};

// Runs in the child between clone and exec. Its memory is either shared with a
// suspended parent (vfork path) or a copy of a possibly multi-threaded one, so only
// async-signal-safe calls are allowed: no malloc, no locks, no stdio.
__attribute__((noreturn))
static void child(struct child_ctx *ctx) {
    const ks_spawn_attr *a = ctx->attr;
    int err_fd = ctx->err_fd;
    int stage = STAGE_SIGNALS;
    // No handler of the parent may run here (it would run on shared memory), and a
    // container must not inherit ignored dispositions nor the parent's mask.
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int s = 1; s < _NSIG; s++) {
        if (s == SIGKILL || s == SIGSTOP) continue;
        sigaction(s, &dfl, NULL);  // fails harmlessly for the libc-reserved signals
    }
    sigset_t none;
    sigemptyset(&none);

    if (a->parent_death_signal && prctl(PR_SET_PDEATHSIG, a->parent_death_signal) < 0) goto fail;

    stage = STAGE_SETSID;
    if (a->new_session && setsid() < 0) goto fail;

    // Join namespaces (net, ipc, uts: what a process sharing our memory may enter)
    // before the fds move: the descriptors are the parent's numbers.
    stage = STAGE_SETNS;
    for (int i = 0; i < a->ns_count; i++) if (setns(a->ns_fds[i], 0) < 0) goto fail;

    stage = STAGE_FDS;
    if (ks_child_map_fds(a->fds, a->fd_count, &err_fd) < 0) goto fail;

    stage = STAGE_CWD;
    if (a->cwd && chdir(a->cwd) < 0) goto fail;

    stage = STAGE_SIGNALS;
    if (sigprocmask(SIG_SETMASK, &none, NULL) < 0) goto fail;

    stage = STAGE_EXEC;
    execve(a->path, (char *const *)a->argv, (char *const *)a->envp);

fail:;
    int e = errno;
    if (err_fd >= 0) {
        int report[2] = { e, stage };
        ssize_t w;
        do { w = write(err_fd, report, sizeof report); } while (w < 0 && errno == EINTR);
    } else {
        ctx->stage = stage;
        ctx->err = e;
    }
    _exit(127);
}

static int child_entry(void *p) { child(p); }

// The vfork path: the child borrows our address space and we sleep until it has
// exec'd or exited, so nothing is copied (a fork of a large daemon copies its page
// tables and takes a copy-on-write fault for every page it touches afterwards).
static int spawn_vfork(const ks_spawn_attr *a, pid_t *pid, int *pidfd, int *stage) {
    enum { STACK = 64 * 1024 };
    void *stack = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) return -errno;

    struct child_ctx ctx = { .attr = a, .err_fd = -1, .err = 0, .stage = 0 };
    int child_pidfd = -1;
    // Block every signal while the child runs on our memory; it unblocks its own.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD | (int)a->clone_flags | SIGCHLD;
    int rc = clone(child_entry, (char *)stack + STACK, flags, &ctx, &child_pidfd);
    int clone_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    munmap(stack, STACK);
    if (rc < 0) return -clone_errno;

    if (ctx.err != 0) {
        int code, status;
        ks_pidfd_wait(child_pidfd, 0, &code, &status);
        close(child_pidfd);
        *stage = ctx.stage;
        return -ctx.err;
    }
    *pid = rc;
    *pidfd = child_pidfd;
    return 0;
}

// The fork path (clone3 without CLONE_VM): for children that must run on their own
// memory, e.g. one that waits in a new user namespace for its id maps.
static int spawn_fork(const ks_spawn_attr *a, pid_t *pid, int *pidfd, int *stage) {
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0) return -errno;

    int child_pidfd = -1;
    long rc = ks_clone3_pidfd(a->clone_flags, -1, &child_pidfd);
    if (rc < 0) {
        int e = (int)-rc;
        close(pipefd[0]);
        close(pipefd[1]);
        return -e;
    }
    if (rc == 0) {
        close(pipefd[0]);
        struct child_ctx ctx = { .attr = a, .err_fd = pipefd[1], .err = 0, .stage = 0 };
        child(&ctx);
    }
    close(pipefd[1]);

    int report[2] = {0, 0};
    ssize_t n;
    do { n = read(pipefd[0], report, sizeof report); } while (n < 0 && errno == EINTR);
    close(pipefd[0]);
    if (n == 0) {  // the pipe closed on exec: the child runs the new image
        *pid = (pid_t)rc;
        *pidfd = child_pidfd;
        return 0;
    }
    // The child failed before exec and has exited 127: reap it so nothing leaks.
    int code, status;
    ks_pidfd_wait(child_pidfd, 0, &code, &status);
    close(child_pidfd);
    *stage = report[1];
    return n == (ssize_t)sizeof report ? -report[0] : -EIO;
}

int ks_spawn(const ks_spawn_attr *a, pid_t *pid, int *pidfd, int *stage) {
    if (a->fork || (a->clone_flags & CLONE_NEWUSER)) return spawn_fork(a, pid, pidfd, stage);
    return spawn_vfork(a, pid, pidfd, stage);
}
