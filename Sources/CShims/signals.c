#include "CShims.h"
#include <sys/prctl.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>

_Static_assert(KS_SIG_BLOCK == SIG_BLOCK && KS_SIG_UNBLOCK == SIG_UNBLOCK, "sigmask how");

int ks_eventfd(unsigned initial) {
    int fd = eventfd(initial, EFD_NONBLOCK | EFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ks_timerfd_create(void) {
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ks_timerfd_arm(int fd, uint64_t deadline_ns) {
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = (time_t)(deadline_ns / 1000000000ull);
    its.it_value.tv_nsec = (long)(deadline_ns % 1000000000ull);
    return timerfd_settime(fd, TFD_TIMER_ABSTIME, &its, NULL) < 0 ? -errno : 0;
}

uint64_t ks_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void fill(sigset_t *set, const int *signals, int count) {
    sigemptyset(set);
    for (int i = 0; i < count; i++) sigaddset(set, signals[i]);
}

int ks_signalfd(int fd, const int *signals, int count) {
    sigset_t set;
    fill(&set, signals, count);
    int rc = signalfd(fd, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    return rc < 0 ? -errno : rc;
}

int ks_sigmask(int how, const int *signals, int count) {
    sigset_t set;
    if (signals) fill(&set, signals, count); else sigfillset(&set);
    int rc = pthread_sigmask(how, &set, NULL);
    return -rc;
}

int ks_signalfd_read(int fd, int32_t *pid) {
    struct signalfd_siginfo si;
    ssize_t n;
    do { n = read(fd, &si, sizeof si); } while (n < 0 && errno == EINTR);
    if (n < 0) return errno == EAGAIN ? 0 : -errno;
    if (n != (ssize_t)sizeof si) return -EIO;
    *pid = (int32_t)si.ssi_pid;
    return (int)si.ssi_signo;
}

int ks_ignore_signal(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    return sigaction(sig, &sa, NULL) < 0 ? -errno : 0;
}

pid_t ks_gettid(void) { return (pid_t)syscall(SYS_gettid); }

int ks_tgkill(pid_t tgid, pid_t tid, int sig) {
    return syscall(SYS_tgkill, tgid, tid, sig) < 0 ? -errno : 0;
}

int ks_set_child_subreaper(void) {
    return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0 ? 0 : -errno;
}
