#include "CShims.h"
#include <errno.h>
#include <fcntl.h>
#include <pty.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
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

// ---- network interfaces (the guest agent: ioctl, no netlink needed) -------------
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <sys/ioctl.h>

static int ks_inet_dgram(void) { return socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0); }

int ks_if_set_up(const char *name, int up) {
    int fd = ks_inet_dgram();
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    int rc = ioctl(fd, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        if (up) ifr.ifr_flags |= IFF_UP; else ifr.ifr_flags &= ~IFF_UP;
        rc = ioctl(fd, SIOCSIFFLAGS, &ifr);
    }
    int e = rc < 0 ? -errno : 0;
    close(fd);
    return e;
}

int ks_if_set_ipv4(const char *name, uint32_t addr_be, int prefix) {
    int fd = ks_inet_dgram();
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = addr_be;
    int rc = ioctl(fd, SIOCSIFADDR, &ifr);
    if (rc == 0) {
        sin->sin_addr.s_addr = prefix == 0 ? 0 : htonl(0xFFFFFFFFu << (32 - prefix));
        rc = ioctl(fd, SIOCSIFNETMASK, &ifr);
    }
    int e = rc < 0 ? -errno : 0;
    close(fd);
    return e;
}

int ks_if_rename(const char *name, const char *new_name) {
    int fd = ks_inet_dgram();
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    strncpy(ifr.ifr_newname, new_name, IFNAMSIZ - 1);
    int e = ioctl(fd, SIOCSIFNAME, &ifr) < 0 ? -errno : 0;
    close(fd);
    return e;
}

int ks_if_by_mac(const unsigned char *mac, char *name_out) {
    struct if_nameindex *all = if_nameindex();
    if (!all) return -errno;
    int fd = ks_inet_dgram(), found = -ENODEV;
    for (struct if_nameindex *i = all; fd >= 0 && i->if_index != 0; i++) {
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        strncpy(ifr.ifr_name, i->if_name, IFNAMSIZ - 1);
        if (ioctl(fd, SIOCGIFHWADDR, &ifr) == 0 && memcmp(ifr.ifr_hwaddr.sa_data, mac, 6) == 0) {
            strncpy(name_out, i->if_name, IFNAMSIZ - 1);
            name_out[IFNAMSIZ - 1] = 0;
            found = 0;
            break;
        }
    }
    if (fd >= 0) close(fd);
    if_freenameindex(all);
    return found;
}

int ks_if_set_mtu(const char *name, int mtu) {
    int fd = ks_inet_dgram();
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    ifr.ifr_mtu = mtu;
    int e = ioctl(fd, SIOCSIFMTU, &ifr) < 0 ? -errno : 0;
    close(fd);
    return e;
}

int ks_route_add_ipv4(uint32_t dest_be, int prefix, uint32_t gateway_be, const char *_Nullable dev) {
    int fd = ks_inet_dgram();
    if (fd < 0) return -errno;
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    struct sockaddr_in *d = (struct sockaddr_in *)&rt.rt_dst, *g = (struct sockaddr_in *)&rt.rt_gateway, *m = (struct sockaddr_in *)&rt.rt_genmask;
    d->sin_family = g->sin_family = m->sin_family = AF_INET;
    d->sin_addr.s_addr = dest_be;
    m->sin_addr.s_addr = prefix == 0 ? 0 : htonl(0xFFFFFFFFu << (32 - prefix));
    g->sin_addr.s_addr = gateway_be;
    rt.rt_flags = RTF_UP | (gateway_be ? RTF_GATEWAY : 0) | (prefix == 32 ? RTF_HOST : 0);
    char devname[IFNAMSIZ];
    if (dev) { strncpy(devname, dev, IFNAMSIZ - 1); devname[IFNAMSIZ - 1] = 0; rt.rt_dev = devname; }
    int e = ioctl(fd, SIOCADDRT, &rt) < 0 ? -errno : 0;
    close(fd);
    return e;
}

int ks_if_set_mac(const char *name, const unsigned char *mac) {
    int fd = ks_inet_dgram();
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    ifr.ifr_hwaddr.sa_family = 1; // ARPHRD_ETHER
    memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
    int e = ioctl(fd, SIOCSIFHWADDR, &ifr) < 0 ? -errno : 0;
    close(fd);
    return e;
}
