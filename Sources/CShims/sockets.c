#include "CShims.h"
#include <errno.h>
#include <fcntl.h>
#include <pty.h>
#include <seccomp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

int ks_af_vsock(void) { return AF_VSOCK; }

static struct sockaddr_vm vsock_addr(uint32_t cid, uint32_t port) {
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = cid;
    a.svm_port = port;
    return a;
}

int ks_vsock_bind(int fd, uint32_t cid, uint32_t port) {
    struct sockaddr_vm a = vsock_addr(cid, port);
    return bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ? -errno : 0;
}

int ks_vsock_connect(int fd, uint32_t cid, uint32_t port) {
    struct sockaddr_vm a = vsock_addr(cid, port);
    int rc;
    do { rc = connect(fd, (struct sockaddr *)&a, sizeof a); } while (rc < 0 && errno == EINTR);
    return rc < 0 ? -errno : 0;
}

int ks_openpty(int *master, int *slave) {
    int m, s;
    if (openpty(&m, &s, NULL, NULL, NULL) < 0) return -errno;
    fcntl(m, F_SETFD, FD_CLOEXEC);
    fcntl(s, F_SETFD, FD_CLOEXEC);
    fcntl(m, F_SETFL, fcntl(m, F_GETFL) | O_NONBLOCK);
    *master = m;
    *slave = s;
    return 0;
}

void ks_seccomp_version(char *buf, size_t len) {
    const struct scmp_version *v = seccomp_version();
    snprintf(buf, len, "%u.%u.%u", v->major, v->minor, v->micro);
}

int ks_accept(int fd) {
    int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    return c < 0 ? -errno : c;
}

int ks_pipe(int *fds, int nonblocking) {
    return pipe2(fds, O_CLOEXEC | (nonblocking ? O_NONBLOCK : 0)) < 0 ? -errno : 0;
}

ssize_t ks_send_with_fd(int sock, const void *buf, size_t len, int fd) {
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    char control[CMSG_SPACE(sizeof(int))];
    memset(control, 0, sizeof control);
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0) {
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t n;
    do { n = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

// struct ucred needs _GNU_SOURCE, which the Glibc module does not see.
pid_t ks_peer_pid(int fd) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return 0;
    return cred.pid;
}

int ks_finit_module(int fd) {
    long r = syscall(SYS_finit_module, fd, "", 0);
    return r < 0 ? -errno : 0;
}
