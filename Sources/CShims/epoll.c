#include "CShims.h"
#include <errno.h>
#include <sys/epoll.h>

_Static_assert(KS_EPOLL_ADD == EPOLL_CTL_ADD, "epoll op values");
_Static_assert(KS_EPOLL_DEL == EPOLL_CTL_DEL, "epoll op values");
_Static_assert(KS_EPOLL_MOD == EPOLL_CTL_MOD, "epoll op values");
// The reactor passes poll(2) bits straight through: they equal the epoll bits.
_Static_assert(EPOLLIN == 0x001 && EPOLLOUT == 0x004 && EPOLLERR == 0x008 &&
               EPOLLHUP == 0x010 && EPOLLRDHUP == 0x2000, "poll and epoll bits agree");

int ks_epoll_create(void) {
    int fd = epoll_create1(EPOLL_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ks_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token) {
    struct epoll_event ev = { .events = events, .data.u64 = token };
    return epoll_ctl(epfd, op, fd, &ev) < 0 ? -errno : 0;
}

int ks_epoll_wait(int epfd, ks_event *out, int max, int timeout_ms) {
    enum { BATCH = 256 };
    struct epoll_event evs[BATCH];
    if (max > BATCH) max = BATCH;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    if (n < 0) return -errno;
    for (int i = 0; i < n; i++) {
        out[i].token = evs[i].data.u64;
        out[i].events = evs[i].events;
        out[i].result = 0;
    }
    return n;
}
