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
#include <poll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
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

// ---- the descriptor store ----
//
// What must outlive the daemon besides the processes: a terminal's master (closing it
// hangs the container's tty up) and the write end of a stdin pipe (closing it ends the
// container's input). The daemon hands them to us over KUASAR_KEEPER_FD, a seqpacket
// socket: "+key" with the fd attached stores (replacing the key), "-key" drops. A new
// daemon takes them over through <root>/keepers/<pid>.sock: it sends "take", gets one
// message per key with its fd and a final ".", and we close our copies.

#define MAX_KEPT 4096

struct kept { char *key; int fd; };
static struct kept kept[MAX_KEPT];
static int kept_count;

static void drop_key(const char *key) {
    for (int i = 0; i < kept_count; i++) {
        if (strcmp(kept[i].key, key) == 0) {
            close(kept[i].fd);
            free(kept[i].key);
            kept[i] = kept[--kept_count];
            return;
        }
    }
}

static void store_key(const char *key, int fd) {
    drop_key(key);
    if (kept_count == MAX_KEPT) { close(fd); return; }
    kept[kept_count].key = strdup(key);
    kept[kept_count].fd = fd;
    kept_count++;
}

static void handle_daemon_message(int chan, int *open_chan) {
    char buf[1024];
    int fd = -1;
    ssize_t n = ks_recv_with_fd(chan, buf, sizeof buf - 1, &fd);
    if (n == -EAGAIN || n == -EINTR) return;
    if (n <= 0) {  // the daemon is gone: keep what we hold for the next one
        close(chan);
        *open_chan = -1;
        if (fd >= 0) close(fd);
        return;
    }
    buf[n] = 0;
    if (buf[0] == '+' && fd >= 0) { store_key(buf + 1, fd); return; }
    if (fd >= 0) close(fd);
    if (buf[0] == '-') drop_key(buf + 1);
}

static void hand_over(int listener) {
    int c = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0) return;
    struct timeval tv = { .tv_sec = 2, .tv_usec = 0 };
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    char req[16];
    ssize_t n = recv(c, req, sizeof req, 0);
    if (n == 4 && memcmp(req, "take", 4) == 0) {
        int sent = 0;
        for (; sent < kept_count; sent++)
            if (ks_send_with_fd(c, kept[sent].key, strlen(kept[sent].key), kept[sent].fd) < 0) break;
        if (sent == kept_count && send(c, ".", 1, MSG_NOSIGNAL) == 1) {
            while (kept_count > 0) { close(kept[kept_count - 1].fd); free(kept[kept_count - 1].key); kept_count--; }
        }
    }
    close(c);
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
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    int pair[2];
    if (sfd < 0 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
        int e = errno; sigprocmask(SIG_SETMASK, &old, NULL); return -e;
    }
    // <root>/keepers/<pid>.sock, <root> being the exits directory's parent.
    char sock_path[4096], dir[4096];
    snprintf(dir, sizeof dir, "%s/../keepers", exits_dir);
    mkdir(dir, 0700);
    snprintf(sock_path, sizeof sock_path, "%s/%d.sock", dir, (int)getpid());
    int listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (listener >= 0 && strlen(sock_path) < sizeof addr.sun_path) {
        strcpy(addr.sun_path, sock_path);
        unlink(sock_path);
        mode_t um = umask(077);
        if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(listener, 4) != 0) { close(listener); listener = -1; }
        umask(um);
    } else if (listener >= 0) {
        close(listener);
        listener = -1;
    }
    char keeper[32], chan[32];
    snprintf(keeper, sizeof keeper, "%d", (int)getpid());
    pid_t daemon = fork();
    if (daemon < 0) { int e = errno; sigprocmask(SIG_SETMASK, &old, NULL); return -e; }
    if (daemon == 0) {
        prctl(PR_SET_CHILD_SUBREAPER, 0);
        sigprocmask(SIG_SETMASK, &old, NULL);
        // The daemon's end of the store channel, kept across the exec.
        int d = dup(pair[1]);
        snprintf(chan, sizeof chan, "%d", d);
        setenv("KUASAR_KEEPER", keeper, 1);
        setenv("KUASAR_KEEPER_FD", chan, 1);
        execv(program, argv);
        fprintf(stderr, "kuasar-keeper: exec %s: %s\n", program, strerror(errno));
        _exit(127);
    }
    close(pair[1]);
    int channel = pair[0];
    fcntl(channel, F_SETFL, O_NONBLOCK);
    prctl(PR_SET_NAME, "kuasar-keeper");
    int daemon_code = 0, daemon_alive = 1;
    for (;;) {
        struct pollfd p[3] = {
            { .fd = sfd, .events = POLLIN },
            { .fd = channel, .events = POLLIN },
            { .fd = listener, .events = POLLIN },
        };
        if (poll(p, 3, -1) < 0) continue;
        if (channel >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR))) handle_daemon_message(channel, &channel);
        if (listener >= 0 && (p[2].revents & POLLIN)) hand_over(listener);
        if (!(p[0].revents & POLLIN)) continue;
        struct signalfd_siginfo ssi;
        if (read(sfd, &ssi, sizeof ssi) != sizeof ssi) continue;
        if (ssi.ssi_signo != SIGCHLD) {
            if (daemon_alive) kill(daemon, (int)ssi.ssi_signo);
            continue;
        }
        siginfo_t si;
        for (;;) {
            memset(&si, 0, sizeof si);
            if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) != 0) {
                if (errno == EINTR) continue;
                // ECHILD: nobody left.
                if (!daemon_alive) {
                    if (listener >= 0) unlink(sock_path);
                    _exit(daemon_code);
                }
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
    int rc = ks_keeper_run(argv[1], argv[2], argv + 3);
    fprintf(stderr, "kuasar-keeper: %s\n", strerror(-rc));
    return 1;
}
