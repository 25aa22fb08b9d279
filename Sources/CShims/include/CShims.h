// CShims: the only C in the runtime. It holds exactly what Swift cannot call
// directly — variadic or raw syscalls (clone3, pidfd_*, close_range), macros and
// sigset_t juggling (signalfd, sigprocmask), liburing's static inline helpers, and
// the code that runs between clone and exec (where only async-signal-safe C may run).
// Everything else lives in Swift under Sources/Runtime/System.
//
// Conventions: every symbol starts with `ks_`; every pointer says whether it may be
// null; functions return -errno on failure (never set errno for the caller to read
// later), so the Swift side has one way to turn a failure into a typed error.
#ifndef KS_CSHIMS_H
#define KS_CSHIMS_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

#pragma clang assume_nonnull begin

// ---- epoll -------------------------------------------------------------------
typedef struct ks_event {
    uint64_t token;   // epoll data.u64 / io_uring user_data
    uint32_t events;  // poll(2) bits: POLLIN, POLLOUT, POLLERR, POLLHUP, POLLRDHUP
    int32_t  result;  // io_uring: cqe->res; epoll: 0
} ks_event;

int ks_epoll_create(void);
int ks_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token);
/// Waits up to `timeout_ms` (-1 forever). Returns the number of events or -errno.
int ks_epoll_wait(int epfd, ks_event *out, int max, int timeout_ms);
enum { KS_EPOLL_ADD = 1, KS_EPOLL_DEL = 2, KS_EPOLL_MOD = 3 };

// ---- io_uring (readiness through one-shot POLL_ADD) ---------------------------
typedef struct ks_uring ks_uring;
/// Creates a ring; returns NULL and sets *err to -errno when the kernel refuses it, or
/// -EOPNOTSUPP when the ring lacks an opcode this backend needs (POLL_ADD, POLL_REMOVE).
ks_uring *_Nullable ks_uring_create(unsigned entries, int *err);
void ks_uring_destroy(ks_uring *ring);
int ks_uring_fd(const ks_uring *ring);
/// Queue a one-shot poll of `fd` for `mask`; completions carry `token`.
int ks_uring_poll_add(ks_uring *ring, int fd, uint32_t mask, uint64_t token);
/// Queue removal of the poll whose user_data is `target`; its own completion carries `token`.
int ks_uring_poll_remove(ks_uring *ring, uint64_t target, uint64_t token);
/// Submits what is queued; waits for at least `wait_nr` completions.
int ks_uring_submit_and_wait(ks_uring *ring, unsigned wait_nr);
/// Copies up to `max` completions out (token=user_data, result=res, events=res when
/// positive) and marks them seen. Returns how many.
int ks_uring_reap(ks_uring *ring, ks_event *out, int max);

// ---- eventfd, timerfd, signalfd ---------------------------------------------
int ks_eventfd(unsigned initial);
/// Creates a CLOCK_MONOTONIC timerfd (non-blocking, close-on-exec).
int ks_timerfd_create(void);
/// Arms the timer for an absolute CLOCK_MONOTONIC deadline in ns; 0 disarms.
int ks_timerfd_arm(int fd, uint64_t deadline_ns);
uint64_t ks_monotonic_ns(void);
/// A signalfd for `signals[0..<count]`; fd = -1 makes a new one.
int ks_signalfd(int fd, const int *signals, int count);
/// SIG_BLOCK / SIG_UNBLOCK / SIG_SETMASK of this thread for the given signals.
int ks_sigmask(int how, const int *_Nullable signals, int count);
enum { KS_SIG_BLOCK = 0, KS_SIG_UNBLOCK = 1 };
/// Reads one siginfo from a signalfd: returns the signal number, 0 when none is
/// pending (EAGAIN), or -errno. *pid gets the sender.
int ks_signalfd_read(int fd, int32_t *pid);
int ks_ignore_signal(int sig);
pid_t ks_gettid(void);
int ks_tgkill(pid_t tgid, pid_t tid, int sig);

// ---- processes -----------------------------------------------------------------
int ks_pidfd_open(pid_t pid);
int ks_pidfd_send_signal(int pidfd, int sig);
/// waitid(P_PIDFD). Returns the pid reaped (>0), 0 when still running with WNOHANG,
/// or -errno. *code is CLD_EXITED/CLD_KILLED/CLD_DUMPED; *status the exit code or signal.
int ks_pidfd_wait(int pidfd, int nohang, int *code, int *status);
/// waitid(P_ALL, WNOWAIT) peek: the pid of any exited child without reaping it,
/// 0 when none, -errno (ECHILD when there are no children).
int ks_peek_exited_child(void);
/// Reaps `pid` (waitpid). Returns pid or -errno; fills code/status like ks_pidfd_wait.
int ks_reap_pid(pid_t pid, int *code, int *status);

typedef struct ks_fd_map {
    int from;   // fd in the parent
    int to;     // fd number it becomes in the child
} ks_fd_map;

typedef struct ks_spawn_attr {
    const char *path;
    char *_Nullable const *_Nonnull argv;
    char *_Nullable const *_Nonnull envp;
    const char *_Nullable cwd;
    const ks_fd_map *_Nullable fds;
    int fd_count;
    uint64_t clone_flags;      // extra CLONE_NEW* flags
    int new_session;           // setsid() in the child
    int parent_death_signal;   // PR_SET_PDEATHSIG, 0 for none
    int fork;                  // 1: clone3 on a copy of our memory instead of vfork-style
    const int *_Nullable ns_fds;  // namespace files to setns(2) into before exec
    int ns_count;
} ks_spawn_attr;

/// Starts a child with a pidfd and execs it. By default clone(CLONE_VM | CLONE_VFORK |
/// CLONE_PIDFD): nothing is copied and the child's exec error comes back through
/// shared memory. With `fork` (or CLONE_NEWUSER) it is clone3(CLONE_PIDFD) on a copy
/// of our memory, reporting over a close-on-exec pipe. On success returns 0 with *pid
/// and *pidfd set; on failure -errno with *stage naming the step that failed (0 exec,
/// 1 fds, 2 cwd, 3 setsid, 4 signals, 5 setns), the child already reaped.
int ks_spawn(const ks_spawn_attr *attr, pid_t *pid, int *pidfd, int *stage);

int ks_close_range(unsigned first, unsigned last, unsigned flags);
/// clone3(CLONE_PIDFD | flags [| CLONE_INTO_CGROUP when cgroup_fd >= 0]) without CLONE_VM:
/// returns like fork() — 0 in the child, the pid in the parent (*pidfd set), or -errno.
long ks_clone3_pidfd(uint64_t flags, int cgroup_fd, int *pidfd);
/// In a child between clone and exec: dup2 each fds[i].from to fds[i].to, close every
/// other fd up to the highest target and mark the rest close-on-exec; *keep (if >= 0)
/// is moved above the targets and stays open. -1 with errno set on failure.
int ks_child_map_fds(const ks_fd_map *_Nullable fds, int count, int *_Nullable keep);

// ---- containers ------------------------------------------------------------------
/// One mount into a container's root, done in the child before pivot_root. The
/// target is resolved inside the rootfs (openat2 RESOLVE_IN_ROOT): a symlink in the
/// image can never point a mount outside it.
typedef struct ks_mount_op {
    const char *_Nullable source;
    const char *_Nullable target;  // absolute path inside the container (required)
    const char *_Nullable fstype;  // NULL for a bind mount
    unsigned long flags;           // MS_* for mount(2); MS_BIND marks a bind
    unsigned long remount_flags;   // bind mounts: MS_RDONLY/MS_NOSUID/... applied by a remount
    unsigned long propagation;     // MS_SHARED/MS_SLAVE/MS_PRIVATE/MS_UNBINDABLE [|MS_REC]; 0 leaves it
    const char *_Nullable data;
    int target_is_file;            // create the mount point as an empty file (bind of a file)
    int recursive_ro;              // "rro": read-only down the whole tree (mount_setattr AT_RECURSIVE)
} ks_mount_op;

/// Whether this kernel has mount_setattr(2) (recursive read-only mounts): 1, or 0.
int ks_have_mount_setattr(void);

typedef struct ks_device {
    const char *path;              // inside the container
    uint32_t mode;                 // S_IFCHR / S_IFBLK / S_IFIFO | permissions
    uint32_t major, minor;
    uint32_t uid, gid;
} ks_device;

typedef struct ks_rlimit { int resource; uint64_t soft, hard; } ks_rlimit;
typedef struct ks_sysctl { const char *key; const char *value; } ks_sysctl;

/// Everything the child of a container (init or exec) does between clone and exec.
typedef struct ks_container_attr {
    // path, argv and envp are required; nullable only so Swift can zero-initialize.
    const char *_Nullable path;              // bare names are looked up in envp's PATH inside the container
    char *_Nullable const *_Nullable argv;
    char *_Nullable const *_Nullable envp;
    const char *_Nullable cwd;
    const ks_fd_map *_Nullable fds;
    int fd_count;
    int create_console;                      // open a pty in the container's devpts, send the master back (kind 2)
    uint32_t uid, gid;
    const uint32_t *_Nullable gids;
    int gid_count;
    int umask;                               // -1 leaves it
    int has_caps;
    uint64_t cap_bounding, cap_effective, cap_permitted, cap_inheritable, cap_ambient;
    const ks_rlimit *_Nullable rlimits;
    int rlimit_count;
    int has_oom_score_adj, oom_score_adj;
    int no_new_privs;
    const void *_Nullable seccomp_filter;    // struct sock_filter[], exported by libseccomp in the parent
    unsigned short seccomp_len;
    uint64_t clone_flags;                    // CLONE_NEW* to create
    int cgroup_fd;                           // cgroup v2 directory for CLONE_INTO_CGROUP, -1 none
    int late_cgroupns;                       // v1: create the cgroup namespace once in the cgroups (its root is where we are)
    const int *_Nullable join_fds;           // namespaces joined with setns (user ns first)
    const int *_Nullable join_types;
    int join_count;
    int setns_pidfd;                         // exec: join these namespaces of that process, -1 none
    int setns_pidfd_flags;
    const char *_Nullable rootfs;            // set up a root filesystem and pivot into it
    int rootfs_readonly;
    unsigned long rootfs_propagation;
    int no_pivot;
    int setup_dev;                           // /dev symlinks (fd, stdin, ptmx, ...) after the devices
    const ks_mount_op *_Nullable mounts;
    int mount_count;
    const ks_device *_Nullable devices;
    int device_count;
    const char *_Nullable const *_Nullable masked;
    int masked_count;
    const char *_Nullable const *_Nullable readonly;
    int readonly_count;
    const ks_sysctl *_Nullable sysctls;
    int sysctl_count;
    const char *_Nullable hostname;
    const char *_Nullable domainname;
    int sync_fd;                             // child's end of the sync socket
    int parent_sync_fd;                      // the parent's end: closed in the child at once, so closing it means EOF
    int wait_for_start;                      // report ready, then wait for 'S' before exec
    // A program the parent opened on the host (a wasm container's runner, through the
    // host's dynamic loader): executed from this fd with execveat(AT_EMPTY_PATH) instead
    // of `path`, so nothing in the container's root can stand in for it. -1: `path`.
    int exec_fd;
} ks_container_attr;

/// What the child writes on its sync socket: ready (kind 0), an error (kind 1) naming
/// the step, e.g. `mount proc on /proc`, with its errno, or its console's master (kind
/// 2, the fd in SCM_RIGHTS). End of file after 'S' means the exec succeeded.
typedef struct ks_child_report {
    int32_t kind;
    int32_t err;
    char what[248];
} ks_child_report;

/// clone3(CLONE_PIDFD | clone_flags) a container child running `attr`. The child first
/// waits for one byte 'G' on its sync socket (the parent moves it into cgroups and
/// writes its id maps meanwhile). Returns 0 with *pid/*pidfd or -errno.
int ks_container_clone(const ks_container_attr *attr, pid_t *pid, int *pidfd);

/// recvmsg of up to `len` bytes; a passed descriptor (SCM_RIGHTS, close-on-exec) lands
/// in *fd, else *fd = -1. Returns bytes read, 0 at end of file, or -errno.
ssize_t ks_recv_with_fd(int sock, void *buf, size_t len, int *fd);
/// sendmsg of `len` bytes with `fd` attached (SCM_RIGHTS; none when fd < 0): bytes or -errno.
ssize_t ks_send_with_fd(int sock, const void *buf, size_t len, int fd);
int ks_setns(int fd, int nstype);
int ks_mount(const char *_Nullable source, const char *target, const char *_Nullable fstype,
             unsigned long flags, const char *_Nullable data);
int ks_umount(const char *target, int flags);
/// openat2(dirfd, path, flags, RESOLVE_* `resolve`): fd or -errno.
int ks_openat2(int dirfd, const char *path, int flags, uint64_t resolve);
/// Builds a seccomp filter and exports it as BPF into a memfd; returns the fd or -errno.
/// `default_action`/`actions` are SCMP_ACT_* values; each rule has up to 6 argument
/// comparisons (arg index, op SCMP_CMP_*, value, value2).
typedef struct ks_seccomp_arg { unsigned index; int op; uint64_t value, value2; } ks_seccomp_arg;
typedef struct ks_seccomp_rule {
    const char *name;
    uint32_t action;
    const ks_seccomp_arg *_Nullable args;
    int arg_count;
} ks_seccomp_rule;
int ks_seccomp_export(uint32_t default_action, const uint32_t *_Nullable arches, int arch_count,
                      const ks_seccomp_rule *_Nullable rules, int rule_count, char *errbuf, size_t errlen);
/// fcntl(F_ADD_SEALS) of shrink, grow, write and seal: no one can change the contents again.
int ks_seal_contents(int fd);
/// For a helper that handles untrusted input: no supplementary groups, gid and uid `id`
/// (when root), no_new_privs, and a lower CPU priority. 0 or -errno.
int ks_become_unprivileged(unsigned id, int nice_level);
/// memfd_create(MFD_CLOEXEC), with MFD_ALLOW_SEALING when `sealable` (contents that can be
/// sealed read-only later). The fd or -errno.
int ks_memfd(const char *name, int sealable);

// ---- sockets and terminals ------------------------------------------------------
/// A vsock address family socket bound or connected to (cid, port).
int ks_vsock_bind(int fd, uint32_t cid, uint32_t port);

// ---- kernel modules (the guest agent) -----------------------------------------
/// finit_module(2) of an open .ko with no parameters; 0 or -errno (-EEXIST: loaded).
int ks_finit_module(int fd);
/// Forks a child that runs a tiny real-mode guest under KVM and exits 0 when it reached
/// its marker, else with the step that failed; -1 (errno) when fork fails.
pid_t ks_kvm_probe_fork(void);
/// 1 for a probe child's exit code 0; `why` says what passed or which step failed.
int ks_kvm_probe_describe(int exit_code, char *_Nonnull why, size_t why_len);

// ---- network interfaces and IPv4 routes (the guest agent), by ioctl; 0 or -errno --
int ks_if_set_up(const char *name, int up);
int ks_if_set_ipv4(const char *name, uint32_t addr_be, int prefix);
int ks_if_set_mtu(const char *name, int mtu);
// Renames a (down) interface: the guest names its NICs after the MAC the host gave each.
int ks_if_rename(const char *name, const char *new_name);
/// The name of the interface whose MAC is `mac` (6 bytes) in `name_out` (16 bytes); 0 or -ENODEV.
int ks_if_by_mac(const unsigned char *mac, char *name_out);
/// SIOCSIFHWADDR: a (down) NIC takes `mac` (6 bytes).
int ks_if_set_mac(const char *name, const unsigned char *mac);

// ---- digests and random state (digest.c) -----------------------------------------
/// A 128-bit content digest (not cryptographic: it detects changed or corrupt files) of
/// everything `fd` holds from offset 0, and its size; 0 or -errno.
int ks_digest_fd(int fd, uint64_t out[_Nonnull 2], uint64_t *_Nullable size_out);
/// The same digest of `len` bytes in memory.
void ks_digest_bytes(const void *bytes, size_t len, uint64_t out[_Nonnull 2]);
/// Mixes `seed` (at most 512 bytes) into the kernel's pool, credited (RNDADDENTROPY), then
/// reseeds its CRNG at once (RNDRESEEDCRNG); 0 or -errno.
int ks_reseed_random(const void *seed, size_t len);

// ---- rtnetlink (a VM pod's network namespace, netlink.c); counts, 0 or -errno ----
typedef struct ks_link {
    int ifindex;
    unsigned flags;
    unsigned mtu;
    int has_mac;
    unsigned char mac[6];
    char name[16];
    /// IFLA_INFO_KIND: "veth", "tun", ... ("" for a device without one).
    char kind[16];
} ks_link;
/// Addresses and routes in network byte order.
/// Addresses as text (inet_ntop); an empty gateway is on-link.
typedef struct ks_addr { int ifindex; int prefix; char addr[46]; } ks_addr;
typedef struct ks_route { int oif; int prefix; char dst[46]; char gateway[46]; } ks_route;
/// A NETLINK_ROUTE socket of the calling thread's network namespace.
int ks_nl_open(void);
int ks_nl_links(int nl, ks_link *out, int max);
/// IPv4 addresses, and IPv6 ones of global scope (link-local left out).
int ks_nl_addrs(int nl, ks_addr *out, int max);
/// The main table's IPv4 and IPv6 unicast routes not made by the kernel itself.
int ks_nl_routes(int nl, ks_route *out, int max);
/// SIOCSIFADDR on an AF_INET6 socket: `addr`/`prefix` on `ifname`.
int ks_if_add_ipv6(const char *ifname, const char *addr, int prefix);
/// SIOCADDRT on an AF_INET6 socket; `gateway` NULL: on-link; `dev` NULL: any.
int ks_route_add_ipv6(const char *dst, int prefix, const char *_Nullable gateway, const char *_Nullable dev);
int ks_nl_link_up(int nl, int ifindex, unsigned mtu);
/// Adds (add 1) or deletes the ingress qdisc of `ifindex`.
int ks_nl_qdisc_ingress(int nl, int ifindex, int add);
/// Every packet arriving at `from` leaves through `to` (tc u32 match-all, mirred redirect).
int ks_nl_redirect(int nl, int from, int to);
/// A tap device `name` in the calling thread's network namespace: its fd, its index in `ifindex`.
int ks_tap_open(const char *name, int *ifindex);
/// A route to dest/prefix via gateway (0: on-link), optionally bound to `dev`.
int ks_route_add_ipv4(uint32_t dest_be, int prefix, uint32_t gateway_be, const char *_Nullable dev);
int ks_vsock_connect(int fd, uint32_t cid, uint32_t port);
int ks_af_vsock(void);
/// The pid of a unix socket's peer (SO_PEERCRED), 0 if unknown.
pid_t ks_peer_pid(int fd);

// prctl(PR_SET_CHILD_SUBREAPER, 1): orphans of our descendants (an OCI runtime's
// container init once the runtime exits) become our children. 0 or -errno.
int ks_set_child_subreaper(void);
/// accept4(SOCK_NONBLOCK | SOCK_CLOEXEC): the new fd or -errno (-EAGAIN when none).
int ks_accept(int fd);
/// pipe2(O_CLOEXEC [| O_NONBLOCK]) into fds[0] (read) and fds[1] (write).
int ks_pipe(int *fds, int nonblocking);
/// A pty pair, both non-blocking and close-on-exec.
int ks_openpty(int *master, int *slave);

// ---- libseccomp -----------------------------------------------------------------
/// "major.minor.micro" of the libseccomp in use.
void ks_seccomp_version(char *buf, size_t len);

// keeper.c: the daemon's subreaper parent; see the file's comment. Returns only on a
// failure before the fork (-errno); the parent never returns.
int ks_keeper_run(const char *exits_dir, const char *program, char *_Nullable const argv[_Nonnull]);
// main() of the kuasar-keeper program: kuasar-keeper EXITS_DIR PROGRAM ARGV0 [ARG...].
int ks_keeper_main(int argc, char *_Nullable *_Nonnull argv);
// Start time (clock ticks since boot) of a process, 0 if unreadable.
unsigned long long ks_proc_starttime(pid_t pid);

// Creates the namespaces `flags` (CLONE_NEWNET|…) in a vfork-style child that
// bind-mounts sources[i] (its /proc/self/ns files) onto targets[i] and exits: a pod's
// namespaces pinned with no process left. 0, or -errno (failed_index: which mount).
int ks_pin_namespaces(int flags, const char *_Nonnull const *_Nonnull sources, const char *_Nonnull const *_Nonnull targets,
                      int count, int *failed_index);

// cgroup v1 joins off the loop: a CLONE_VM child writes `target` into each fd (cgroup.procs)
// and exits 0 or with the errno. Returns a block to release once it is reaped (NULL and
// errno on failure); *pid and *pidfd name the joiner.
void *_Nullable ks_cgroup_join_start(const int *fds, int count, pid_t target, pid_t *pid, int *pidfd);
void ks_cgroup_join_release(void *block);


// podholder.c: the per-pod holder process (see the file's comment).
/// The holder's program as a minimal static ELF in a sealed, read-only memfd (close-on-exec):
/// the fd, or -errno (-ENOEXEC on an architecture without one).
int ks_pod_holder_image(void);
typedef struct ks_pod_holder_attr {
    int image_fd;                           // from ks_pod_holder_image
    uint64_t clone_flags;                   // CLONE_NEWPID/NEWNET/NEWIPC/NEWUTS to create
    int netns_fd;                           // a network namespace to join first (CNI's), -1 none
    const char *_Nullable netns_path;       // its path, for errors
    const char *_Nullable hostname;         // set in the new UTS namespace
    int loopback_up;                        // bring `lo` up (a network namespace made here)
    const ks_sysctl *_Nullable sysctls;     // key = /proc/sys path, written in the pod's namespaces
    int sysctl_count;
    const char *_Nullable const *_Nullable pin_sources; // /proc/self/ns files bind-mounted onto
    const char *_Nullable const *_Nullable pin_targets; // these (existing empty files)
    int pin_count;
    char *_Nullable const *_Nullable argv;  // required; nullable only so Swift can zero-initialize
} ks_pod_holder_attr;
/// Starts a holder in new namespaces: 0 with *pid/*pidfd, or -errno with errbuf naming the step.
int ks_pod_holder_spawn(const ks_pod_holder_attr *attr, pid_t *pid, int *pidfd, char *errbuf, size_t errlen);

#pragma clang assume_nonnull end

#endif
