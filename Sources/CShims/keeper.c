// The keeper: the daemon's parent and a child subreaper, so that the exit status of a
// container that ends while the daemon is down (crash, kill -9, upgrade) is not lost.
//
// `kuasar daemon` execs the small `kuasar-keeper` program first thing (so the keeper
// carries no Swift runtime: ~100 kB). It forks; the child execs kuasar's daemon command
// again (KUASAR_KEEPER set) and becomes the daemon. The parent stays behind and sleeps
// in sigwaitinfo. While the daemon lives
// it reaps nothing but the daemon: containers are the daemon's children and the daemon
// reaps them. When the daemon dies, the kernel re-parents its children to us (we are
// the nearest subreaper); we reap each one and record its status in
// <exits>/<pid>-<starttime> ("<si_code> <si_status>\n", written to a temporary name and
// renamed), where the next daemon finds it. We exit once the daemon is gone and no
// child is left, with the daemon's exit code.
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "CShims.h"

// Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); 0 if unreadable.
// Still readable for a zombie, which is why we peek with WNOWAIT before reaping.
unsigned long long ks_proc_starttime(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    char *p = strrchr(buf, ')');
    if (!p) return 0;
    p++;
    // After ')' come fields 3.. ; starttime is field 22, i.e. the 20th after ')'.
    for (int field = 3; field < 22; field++) {
        p = strchr(p + 1, ' ');
        if (!p) return 0;
    }
    return strtoull(p + 1, NULL, 10);
}

static void record(const char *dir, pid_t pid, unsigned long long start, int code, int status) {
    char path[4096], tmp[4096], line[64];
    snprintf(path, sizeof path, "%s/%d-%llu", dir, (int)pid, start);
    snprintf(tmp, sizeof tmp, "%s/.%d-%llu.tmp", dir, (int)pid, start);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return;
    int len = snprintf(line, sizeof line, "%d %d\n", code, status);
    ssize_t w = write(fd, line, (size_t)len);
    fsync(fd);
    close(fd);
    if (w == len) rename(tmp, path); else unlink(tmp);
}

int ks_keeper_run(const char *exits_dir, const char *program, char *const argv[]) {
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGQUIT);
    // Blocked before the fork, so no SIGCHLD or forwarded signal can slip by.
    if (sigprocmask(SIG_BLOCK, &set, &old) != 0) return -errno;
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) { int e = errno; sigprocmask(SIG_SETMASK, &old, NULL); return -e; }
    char keeper[32];
    snprintf(keeper, sizeof keeper, "%d", (int)getpid());
    pid_t daemon = fork();
    if (daemon < 0) { int e = errno; sigprocmask(SIG_SETMASK, &old, NULL); return -e; }
    if (daemon == 0) {
        prctl(PR_SET_CHILD_SUBREAPER, 0);
        sigprocmask(SIG_SETMASK, &old, NULL);
        setenv("KUASAR_KEEPER", keeper, 1);
        execv(program, argv);
        fprintf(stderr, "kuasar-keeper: exec %s: %s\n", program, strerror(errno));
        _exit(127);
    }
    prctl(PR_SET_NAME, "kuasar-keeper");
    int daemon_code = 0, daemon_alive = 1;
    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&set, &si);
        if (sig < 0) continue;
        if (sig != SIGCHLD) {
            if (daemon_alive) kill(daemon, sig);
            continue;
        }
        for (;;) {
            memset(&si, 0, sizeof si);
            if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) != 0) {
                if (errno == EINTR) continue;
                // ECHILD: nobody left.
                if (!daemon_alive) _exit(daemon_code);
                break;
            }
            if (si.si_pid == 0) break;
            pid_t pid = si.si_pid;
            unsigned long long start = pid == daemon ? 0 : ks_proc_starttime(pid);
            memset(&si, 0, sizeof si);
            if (waitid(P_PID, (id_t)pid, &si, WEXITED) != 0) continue;
            if (pid == daemon) {
                daemon_alive = 0;
                daemon_code = si.si_code == CLD_EXITED ? si.si_status : 128 + si.si_status;
            } else {
                record(exits_dir, pid, start, si.si_code, si.si_status);
            }
        }
    }
}

int ks_keeper_main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: kuasar-keeper EXITS_DIR PROGRAM ARGV0 [ARG...]\n"
                        "(started by `kuasar daemon`: it stays the daemon's parent and records the exits of\n"
                        "containers that end while no daemon runs)\n");
        return 2;
    }
    mkdir(argv[1], 0700);
    int rc = ks_keeper_run(argv[1], argv[2], argv + 3);
    fprintf(stderr, "kuasar-keeper: %s\n", strerror(-rc));
    return 1;
}
