// rtnetlink for a VM pod's network: the links, IPv4 addresses and routes CNI left in a
// pod's network namespace, a tap device beside each link, and the tc ingress redirects
// (u32 match-all + mirred) that join a link and its tap both ways. Every call works on
// the netlink socket it is given: opened inside a namespace, it acts there.
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <net/if.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_link.h>
#include <linux/if_tun.h>
#include <linux/if_ether.h>
#include <linux/pkt_sched.h>
#include <linux/pkt_cls.h>
#include <linux/tc_act/tc_mirred.h>
#include "CShims.h"

typedef struct nl_req {
    char data[2048];
    size_t len;
    int overflow;
} nl_req;

static unsigned nl_seq;

static void *nl_begin(nl_req *b, int type, int flags, const void *header, size_t size) {
    memset(b, 0, sizeof *b);
    struct nlmsghdr *h = (struct nlmsghdr *)b->data;
    h->nlmsg_type = (unsigned short)type;
    h->nlmsg_flags = (unsigned short)(NLM_F_REQUEST | flags);
    h->nlmsg_seq = ++nl_seq;
    memcpy(NLMSG_DATA(h), header, size);
    b->len = NLMSG_ALIGN(NLMSG_LENGTH(size));
    return NLMSG_DATA(h);
}

static struct rtattr *nl_attr(nl_req *b, int type, const void *data, size_t size) {
    if (b->len + RTA_SPACE(size) > sizeof b->data) {
        b->overflow = 1;
        return NULL;
    }
    struct rtattr *a = (struct rtattr *)(b->data + b->len);
    a->rta_type = (unsigned short)type;
    a->rta_len = (unsigned short)RTA_LENGTH(size);
    if (size) memcpy(RTA_DATA(a), data, size);
    b->len += RTA_SPACE(size);
    return a;
}

static void nl_end(nl_req *b, struct rtattr *nest) {
    if (nest) nest->rta_len = (unsigned short)(b->data + b->len - (char *)nest);
}

static int nl_send(int nl, nl_req *b) {
    if (b->overflow) return -EMSGSIZE;
    struct nlmsghdr *h = (struct nlmsghdr *)b->data;
    h->nlmsg_len = (unsigned)b->len;
    struct sockaddr_nl to = {.nl_family = AF_NETLINK};
    if (sendto(nl, b->data, b->len, 0, (struct sockaddr *)&to, sizeof to) < 0) return -errno;
    return 0;
}

// Reads the answers to request `seq` until its ack (or, for a dump, its end), handing each
// data message to `each`; returns 0 or -errno (the kernel's error).
static int nl_answers(int nl, unsigned seq, void (*each)(struct nlmsghdr *, void *), void *ctx) {
    static char buf[32768];
    for (;;) {
        ssize_t n = recv(nl, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        int len = (int)n;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_seq != seq) continue;
            if (h->nlmsg_type == NLMSG_DONE) return 0;
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = (struct nlmsgerr *)NLMSG_DATA(h);
                return e->error;
            }
            if (each) each(h, ctx);
        }
    }
}

static int nl_call(int nl, nl_req *b) {
    int r = nl_send(nl, b);
    if (r < 0) return r;
    return nl_answers(nl, ((struct nlmsghdr *)b->data)->nlmsg_seq, NULL, NULL);
}

int ks_nl_open(void) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) return -errno;
    struct sockaddr_nl me = {.nl_family = AF_NETLINK};
    if (bind(fd, (struct sockaddr *)&me, sizeof me) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    // The answers of one call fit; a dump comes in several reads.
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

typedef struct dump_ctx {
    void *out;
    int max, count;
} dump_ctx;

// A dump request of `type` with its family header; each answer goes to `each`, which
// fills `out` up to `max`. Returns how many it kept, or -errno.
static int nl_dump(int nl, int type, const void *header, size_t size, void (*each)(struct nlmsghdr *, void *), void *out, int max) {
    nl_req b;
    nl_begin(&b, type, NLM_F_DUMP, header, size);
    int r = nl_send(nl, &b);
    if (r < 0) return r;
    dump_ctx c = {out, max, 0};
    r = nl_answers(nl, ((struct nlmsghdr *)b.data)->nlmsg_seq, each, &c);
    return r < 0 ? r : c.count;
}

static void each_link(struct nlmsghdr *h, void *p) {
    dump_ctx *c = p;
    if (h->nlmsg_type != RTM_NEWLINK || c->count >= c->max) return;
    struct ifinfomsg *ifi = NLMSG_DATA(h);
    ks_link *l = (ks_link *)c->out + c->count;
    memset(l, 0, sizeof *l);
    l->ifindex = ifi->ifi_index;
    l->flags = ifi->ifi_flags;
    int len = (int)IFLA_PAYLOAD(h);
    for (struct rtattr *a = IFLA_RTA(ifi); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
        switch (a->rta_type) {
        case IFLA_IFNAME: strncpy(l->name, RTA_DATA(a), sizeof l->name - 1); break;
        case IFLA_MTU: memcpy(&l->mtu, RTA_DATA(a), 4); break;
        case IFLA_ADDRESS:
            if (RTA_PAYLOAD(a) == 6) { memcpy(l->mac, RTA_DATA(a), 6); l->has_mac = 1; }
            break;
        case IFLA_LINKINFO: {
            int ilen = (int)RTA_PAYLOAD(a);
            for (struct rtattr *i = RTA_DATA(a); RTA_OK(i, ilen); i = RTA_NEXT(i, ilen)) {
                if (i->rta_type == IFLA_INFO_KIND) strncpy(l->kind, RTA_DATA(i), sizeof l->kind - 1);
            }
            break;
        }
        }
    }
    c->count++;
}

int ks_nl_links(int nl, ks_link *out, int max) {
    struct ifinfomsg h = {.ifi_family = AF_UNSPEC};
    return nl_dump(nl, RTM_GETLINK, &h, sizeof h, each_link, out, max);
}

static void each_addr(struct nlmsghdr *h, void *p) {
    dump_ctx *c = p;
    if (h->nlmsg_type != RTM_NEWADDR || c->count >= c->max) return;
    struct ifaddrmsg *ifa = NLMSG_DATA(h);
    // IPv4, and IPv6's global addresses (the guest makes its own link-local one).
    if (ifa->ifa_family != AF_INET && (ifa->ifa_family != AF_INET6 || ifa->ifa_scope != RT_SCOPE_UNIVERSE)) return;
    ks_addr *out = (ks_addr *)c->out + c->count;
    memset(out, 0, sizeof *out);
    out->ifindex = (int)ifa->ifa_index;
    out->prefix = ifa->ifa_prefixlen;
    int len = (int)IFA_PAYLOAD(h), found = 0;
    for (struct rtattr *a = IFA_RTA(ifa); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS the peer's on point-to-point).
        if (a->rta_type == IFA_LOCAL || (a->rta_type == IFA_ADDRESS && !found)) {
            found = inet_ntop(ifa->ifa_family, RTA_DATA(a), out->addr, sizeof out->addr) != NULL;
        }
    }
    if (found) c->count++;
}

int ks_nl_addrs(int nl, ks_addr *out, int max) {
    struct ifaddrmsg h = {.ifa_family = AF_UNSPEC};
    return nl_dump(nl, RTM_GETADDR, &h, sizeof h, each_addr, out, max);
}

static void each_route(struct nlmsghdr *h, void *p) {
    dump_ctx *c = p;
    if (h->nlmsg_type != RTM_NEWROUTE || c->count >= c->max) return;
    struct rtmsg *rt = NLMSG_DATA(h);
    // The main table's unicast routes that someone added: the kernel's own (from an
    // address's prefix) come back by themselves where the address is set again.
    if ((rt->rtm_family != AF_INET && rt->rtm_family != AF_INET6) || rt->rtm_table != RT_TABLE_MAIN
        || rt->rtm_type != RTN_UNICAST || rt->rtm_protocol == RTPROT_KERNEL) return;
    ks_route *out = (ks_route *)c->out + c->count;
    memset(out, 0, sizeof *out);
    out->prefix = rt->rtm_dst_len;
    strcpy(out->dst, rt->rtm_family == AF_INET ? "0.0.0.0" : "::");
    int len = (int)RTM_PAYLOAD(h);
    for (struct rtattr *a = RTM_RTA(rt); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
        switch (a->rta_type) {
        case RTA_DST: inet_ntop(rt->rtm_family, RTA_DATA(a), out->dst, sizeof out->dst); break;
        case RTA_GATEWAY: inet_ntop(rt->rtm_family, RTA_DATA(a), out->gateway, sizeof out->gateway); break;
        case RTA_OIF: memcpy(&out->oif, RTA_DATA(a), 4); break;
        }
    }
    c->count++;
}

int ks_nl_routes(int nl, ks_route *out, int max) {
    struct rtmsg h = {.rtm_family = AF_UNSPEC};
    return nl_dump(nl, RTM_GETROUTE, &h, sizeof h, each_route, out, max);
}

/* The kernel's in6_ifreq and in6_rtmsg (linux/ipv6.h, linux/ipv6_route.h clash with glibc's headers). */
struct ks_in6_ifreq { struct in6_addr addr; uint32_t prefixlen; int ifindex; };
struct ks_in6_rtmsg {
    struct in6_addr dst, src, gateway;
    uint32_t type;
    uint16_t dst_len, src_len;
    uint32_t metric;
    unsigned long info;
    uint32_t flags;
    int ifindex;
};

static int inet6_ioctl(unsigned long request, void *arg) {
    int fd = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int e = ioctl(fd, request, arg) < 0 ? -errno : 0;
    close(fd);
    return e;
}

int ks_if_add_ipv6(const char *ifname, const char *addr, int prefix) {
    struct ks_in6_ifreq r;
    memset(&r, 0, sizeof r);
    if (inet_pton(AF_INET6, addr, &r.addr) != 1) return -EINVAL;
    r.prefixlen = (uint32_t)prefix;
    r.ifindex = (int)if_nametoindex(ifname);
    if (r.ifindex == 0) return -errno;
    return inet6_ioctl(SIOCSIFADDR, &r);
}

int ks_route_add_ipv6(const char *dst, int prefix, const char *_Nullable gateway, const char *_Nullable dev) {
    struct ks_in6_rtmsg r;
    memset(&r, 0, sizeof r);
    if (inet_pton(AF_INET6, dst, &r.dst) != 1) return -EINVAL;
    if (gateway && inet_pton(AF_INET6, gateway, &r.gateway) != 1) return -EINVAL;
    r.dst_len = (uint16_t)prefix;
    r.metric = 1024;
    r.flags = 0x1 /* RTF_UP */ | (gateway ? 0x2 /* RTF_GATEWAY */ : 0);
    if (dev) {
        r.ifindex = (int)if_nametoindex(dev);
        if (r.ifindex == 0) return -errno;
    }
    return inet6_ioctl(SIOCADDRT, &r);
}

int ks_nl_link_up(int nl, int ifindex, unsigned mtu) {
    nl_req b;
    struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC, .ifi_index = ifindex, .ifi_flags = IFF_UP, .ifi_change = IFF_UP};
    nl_begin(&b, RTM_NEWLINK, NLM_F_ACK, &ifi, sizeof ifi);
    if (mtu) nl_attr(&b, IFLA_MTU, &mtu, 4);
    return nl_call(nl, &b);
}

int ks_nl_qdisc_ingress(int nl, int ifindex, int add) {
    nl_req b;
    struct tcmsg tc = {.tcm_family = AF_UNSPEC, .tcm_ifindex = ifindex, .tcm_handle = TC_H_MAKE(TC_H_INGRESS, 0), .tcm_parent = TC_H_INGRESS};
    nl_begin(&b, add ? RTM_NEWQDISC : RTM_DELQDISC, NLM_F_ACK | (add ? NLM_F_CREATE | NLM_F_EXCL : 0), &tc, sizeof tc);
    nl_attr(&b, TCA_KIND, "ingress", sizeof "ingress");
    return nl_call(nl, &b);
}

int ks_nl_redirect(int nl, int from, int to) {
    nl_req b;
    // Priority 1, every protocol, on `from`'s ingress qdisc (ffff:).
    struct tcmsg tc = {.tcm_family = AF_UNSPEC, .tcm_ifindex = from, .tcm_parent = TC_H_MAKE(TC_H_INGRESS, 0),
                       .tcm_info = TC_H_MAKE(1u << 16, htons(ETH_P_ALL))};
    nl_begin(&b, RTM_NEWTFILTER, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &tc, sizeof tc);
    nl_attr(&b, TCA_KIND, "u32", sizeof "u32");
    struct rtattr *options = nl_attr(&b, TCA_OPTIONS, NULL, 0);
    // One key that matches every packet (mask 0 at offset 0), terminal: its action decides.
    unsigned char selbuf[sizeof(struct tc_u32_sel) + sizeof(struct tc_u32_key)];
    memset(selbuf, 0, sizeof selbuf);
    struct tc_u32_sel *sel = (struct tc_u32_sel *)selbuf;
    sel->flags = TC_U32_TERMINAL;
    sel->nkeys = 1;
    nl_attr(&b, TCA_U32_SEL, selbuf, sizeof selbuf);
    struct rtattr *actions = nl_attr(&b, TCA_U32_ACT, NULL, 0);
    struct rtattr *first = nl_attr(&b, 1, NULL, 0);
    nl_attr(&b, TCA_ACT_KIND, "mirred", sizeof "mirred");
    struct rtattr *act = nl_attr(&b, TCA_ACT_OPTIONS, NULL, 0);
    struct tc_mirred m;
    memset(&m, 0, sizeof m);
    m.action = TC_ACT_STOLEN;
    m.eaction = TCA_EGRESS_REDIR;
    m.ifindex = (unsigned)to;
    nl_attr(&b, TCA_MIRRED_PARMS, &m, sizeof m);
    nl_end(&b, act);
    nl_end(&b, first);
    nl_end(&b, actions);
    nl_end(&b, options);
    return nl_call(nl, &b);
}

int ks_tap_open(const char *name, int *ifindex) {
    // The tap is made in the network namespace of the thread that opens /dev/net/tun.
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    // Its index, asked of the same namespace through a socket made now.
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0 || ioctl(s, SIOCGIFINDEX, &ifr) < 0) {
        int e = errno;
        if (s >= 0) close(s);
        close(fd);
        return -e;
    }
    close(s);
    *ifindex = ifr.ifr_ifindex;
    return fd;
}
