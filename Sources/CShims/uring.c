#include <features.h>
#include <liburing.h>
#include <errno.h>
#include <stdlib.h>
#include <poll.h>
#include "CShims.h"

struct ks_uring {
    struct io_uring ring;
};

ks_uring *ks_uring_create(unsigned entries, int *err) {
    ks_uring *r = calloc(1, sizeof *r);
    if (!r) { *err = -ENOMEM; return NULL; }
    struct io_uring_params p = {0};
    // One thread submits and reaps: let the kernel skip cross-thread wake-ups.
    p.flags = IORING_SETUP_CLAMP | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER;
    int rc = io_uring_queue_init_params(entries, &r->ring, &p);
    if (rc == -EINVAL) {
        // Kernels before 6.0 refuse SINGLE_ISSUER / COOP_TASKRUN: plain ring.
        struct io_uring_params q = {0};
        q.flags = IORING_SETUP_CLAMP;
        rc = io_uring_queue_init_params(entries, &r->ring, &q);
    }
    if (rc < 0) { free(r); *err = rc; return NULL; }
    // The opcodes the reactor arms, asked of this ring (io_uring_get_probe would set up
    // and tear down a ring of its own: ~5 ms of a guest agent's start under TCG).
    struct io_uring_probe *probe = io_uring_get_probe_ring(&r->ring);
    int ok = probe && io_uring_opcode_supported(probe, IORING_OP_POLL_ADD) &&
             io_uring_opcode_supported(probe, IORING_OP_POLL_REMOVE);
    if (probe) io_uring_free_probe(probe);
    if (!ok) { io_uring_queue_exit(&r->ring); free(r); *err = -EOPNOTSUPP; return NULL; }
    *err = 0;
    return r;
}

void ks_uring_destroy(ks_uring *r) {
    io_uring_queue_exit(&r->ring);
    free(r);
}

int ks_uring_fd(const ks_uring *r) { return r->ring.ring_fd; }

// The submission queue is bounded: when it is full, hand what is queued to the
// kernel (without waiting) and take a fresh entry.
static struct io_uring_sqe *next_sqe(ks_uring *r) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) {
        io_uring_submit(&r->ring);
        sqe = io_uring_get_sqe(&r->ring);
    }
    return sqe;
}

int ks_uring_poll_add(ks_uring *r, int fd, uint32_t mask, uint64_t token) {
    struct io_uring_sqe *sqe = next_sqe(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_poll_add(sqe, fd, mask);
    io_uring_sqe_set_data64(sqe, token);
    return 0;
}

int ks_uring_poll_remove(ks_uring *r, uint64_t target, uint64_t token) {
    struct io_uring_sqe *sqe = next_sqe(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_poll_remove(sqe, target);
    io_uring_sqe_set_data64(sqe, token);
    return 0;
}

int ks_uring_submit_and_wait(ks_uring *r, unsigned wait_nr) {
    int rc = io_uring_submit_and_wait(&r->ring, wait_nr);
    return rc < 0 ? rc : 0;
}

int ks_uring_reap(ks_uring *r, ks_event *out, int max) {
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if ((int)n == max) break;
        out[n].token = cqe->user_data;
        out[n].result = cqe->res;
        out[n].events = cqe->res > 0 ? (uint32_t)cqe->res : 0;
        n++;
    }
    io_uring_cq_advance(&r->ring, n);
    return (int)n;
}

