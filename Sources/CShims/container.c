// The container child: what runs between clone3 and execve for a container's init or
// an exec into it. It runs on a copy of the daemon's memory (no CLONE_VM), so it may
// read the attr the parent prepared, but it calls only async-signal-safe functions:
// no malloc, no stdio, no locks (another thread of the parent may have held one).
#include "CShims.h"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <limits.h>
#include <unistd.h>

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_RAISE 2
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

ssize_t ks_recv_with_fd(int sock, void *buf, size_t len, int *fd) {
    *fd = -1;
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n;
    do { n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(fd, CMSG_DATA(c), sizeof(int));
    }
    return n;
}

int ks_setns(int fd, int nstype) { return setns(fd, nstype) < 0 ? -errno : 0; }

int ks_mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data) {
    return mount(source, target, fstype, flags, data) < 0 ? -errno : 0;
}

int ks_umount(const char *target, int flags) { return umount2(target, flags) < 0 ? -errno : 0; }

int ks_openat2(int dirfd, const char *path, int flags, uint64_t resolve) {
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)flags | O_CLOEXEC;
    how.resolve = resolve;
    long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    return fd < 0 ? -errno : (int)fd;
}

int ks_memfd(const char *name, int sealable) {
    int fd = memfd_create(name, MFD_CLOEXEC | (sealable ? MFD_ALLOW_SEALING : 0));
    return fd < 0 ? -errno : fd;
}

int ks_seal_contents(int fd) {
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) == 0 ? 0 : -errno;
}

int ks_become_unprivileged(unsigned id, int nice_level) {
    if (setpriority(PRIO_PROCESS, 0, nice_level) != 0) return -errno;
    if (geteuid() == 0) {
        if (setgroups(0, NULL) != 0) return -errno;
        if (setresgid(id, id, id) != 0) return -errno;
        if (setresuid(id, id, id) != 0) return -errno;
    }
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 ? 0 : -errno;
}

// ---- seccomp (parent side: libseccomp allocates, so it never runs in the child) ----

int ks_seccomp_export(uint32_t default_action, const uint32_t *arches, int arch_count,
                      const ks_seccomp_rule *rules, int rule_count, char *errbuf, size_t errlen) {
    errbuf[0] = 0;
    scmp_filter_ctx ctx = seccomp_init(default_action);
    if (!ctx) return -EINVAL;
    int rc = 0;
    for (int i = 0; i < arch_count && rc == 0; i++) {
        rc = seccomp_arch_add(ctx, arches[i]);
        if (rc == -EEXIST) rc = 0;  // the native arch is already in
    }
    // A filter that only blocks must not stop the runtime's own last steps.
    for (int i = 0; i < rule_count && rc == 0; i++) {
        int nr = seccomp_syscall_resolve_name(rules[i].name);
        if (nr == __NR_SCMP_ERROR) continue;  // unknown on this arch/kernel: runc skips it too
        if (rules[i].action == default_action) continue;
        struct scmp_arg_cmp cmp[6];
        int n = rules[i].arg_count > 6 ? 6 : rules[i].arg_count;
        for (int a = 0; a < n; a++) {
            cmp[a].arg = rules[i].args[a].index;
            cmp[a].op = (enum scmp_compare)rules[i].args[a].op;
            cmp[a].datum_a = rules[i].args[a].value;
            cmp[a].datum_b = rules[i].args[a].value2;
        }
        rc = seccomp_rule_add_array(ctx, rules[i].action, nr, (unsigned)n, n ? cmp : NULL);
        if (rc < 0) {
            size_t k = 0;
            for (const char *p = rules[i].name; *p && k + 1 < errlen; p++) errbuf[k++] = *p;
            errbuf[k] = 0;
        }
    }
    int fd = -1;
    if (rc == 0) {
        fd = memfd_create("seccomp", MFD_CLOEXEC);
        if (fd < 0) rc = -errno;
        else rc = seccomp_export_bpf(ctx, fd);
    }
    seccomp_release(ctx);
    if (rc < 0) {
        if (fd >= 0) close(fd);
        return rc;
    }
    return fd;
}

// ---- the child ---------------------------------------------------------------------

struct report_buf { ks_child_report r; size_t len; };

static void put(struct report_buf *b, const char *s) {
    while (s && *s && b->len + 1 < sizeof b->r.what) b->r.what[b->len++] = *s++;
    b->r.what[b->len] = 0;
}

__attribute__((noreturn))
static void fail(int sync_fd, const char *step, const char *_Nullable subject, int err) {
    struct report_buf b;
    memset(&b, 0, sizeof b);
    b.r.kind = 1;
    b.r.err = err;
    put(&b, step);
    if (subject) { put(&b, " "); put(&b, subject); }
    ssize_t w;
    do { w = write(sync_fd, &b.r, sizeof b.r); } while (w < 0 && errno == EINTR);
    _exit(127);
}

static int join_path(char *out, size_t cap, const char *a, const char *b) {
    size_t k = 0;
    for (; a && *a; a++) { if (k + 1 >= cap) return -1; out[k++] = *a; }
    for (; b && *b; b++) { if (k + 1 >= cap) return -1; out[k++] = *b; }
    out[k] = 0;
    return 0;
}

static const uint64_t IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;

// Opens `path` inside the root `rootfd` as O_PATH, creating what is missing: every
// directory, and the last component as a file when `last_is_file`. Every lookup is
// openat2(RESOLVE_IN_ROOT), so no symlink (absolute or "..") leads outside the root; a
// dangling symlink in the image is followed by hand (its target is created inside the
// root, as securejoin does for runc), at most 40 times.
static int open_in_root(int rootfd, const char *path, int create, int last_is_file) {
    char cur[PATH_MAX];
    if (strlen(path) >= sizeof cur) return -ENAMETOOLONG;
    strcpy(cur, path);
    for (int hops = 0; hops < 40; hops++) {
        char prefix[PATH_MAX];
        size_t plen = 0;
        const char *p = cur;
        int fd = -1, restart = 0;
        while (*p == '/') p++;
        if (!*p) return ks_openat2(rootfd, ".", O_PATH, IN_ROOT);
        while (*p && !restart) {
            const char *start = p;
            while (*p && *p != '/') p++;
            size_t clen = (size_t)(p - start);
            while (*p == '/') p++;
            int last = *p == 0;
            if (plen + clen + 2 >= sizeof prefix || clen > NAME_MAX) return -ENAMETOOLONG;
            size_t parent_len = plen;
            prefix[plen++] = '/';
            memcpy(prefix + plen, start, clen);
            plen += clen;
            prefix[plen] = 0;
            if (fd >= 0) close(fd);
            fd = ks_openat2(rootfd, prefix, O_PATH, IN_ROOT);
            if (fd != -ENOENT || !create) {
                if (fd < 0) return fd;
                continue;
            }
            char name[NAME_MAX + 1];
            memcpy(name, start, clen);
            name[clen] = 0;
            prefix[parent_len] = 0;
            int parent = ks_openat2(rootfd, parent_len ? prefix : ".", O_PATH | O_DIRECTORY, IN_ROOT);
            if (parent < 0) return parent;
            char target[PATH_MAX];
            ssize_t tl = readlinkat(parent, name, target, sizeof target - 1);
            if (tl > 0) {
                // A dangling symlink: continue from its target, resolved inside the root.
                target[tl] = 0;
                char next[PATH_MAX];
                int n;
                if (target[0] == '/') n = join_path(next, sizeof next, target, "/");
                else {
                    n = join_path(next, sizeof next, prefix, "/");
                    if (n == 0) n = join_path(next + strlen(next), sizeof next - strlen(next), target, "/");
                }
                if (n == 0) n = join_path(next + strlen(next), sizeof next - strlen(next), p, NULL);
                close(parent);
                if (n < 0) return -ENAMETOOLONG;
                strcpy(cur, next);
                restart = 1;
                break;
            }
            // O_PATH parents cannot create: reopen them as real directories.
            int dir = openat(parent, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            close(parent);
            if (dir < 0) return -errno;
            int rc;
            if (last && last_is_file) {
                rc = openat(dir, name, O_CREAT | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0644);
                if (rc >= 0) close(rc);
            } else {
                rc = mkdirat(dir, name, 0755);
            }
            int e = errno;
            close(dir);
            if (rc < 0 && e != EEXIST) return -e;
            prefix[parent_len] = '/';
            fd = ks_openat2(rootfd, prefix, O_PATH, IN_ROOT);
            if (fd < 0) return fd;
        }
        if (!restart) return fd;
    }
    return -ELOOP;
}

static void fd_path(char *out, int fd) {
    char num[16];
    int k = 0;
    unsigned v = (unsigned)fd;
    char tmp[16];
    do { tmp[k++] = (char)('0' + v % 10); v /= 10; } while (v);
    for (int i = 0; i < k; i++) num[i] = tmp[k - 1 - i];
    num[k] = 0;
    join_path(out, 64, "/proc/self/fd/", num);
}

#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#define KS_MOUNT_ATTR_RDONLY 0x00000001
#define KS_AT_RECURSIVE 0x8000
struct ks_mount_attr { uint64_t attr_set, attr_clr, propagation, userns_fd; };

static void do_mount(const ks_container_attr *a, int sync_fd, int rootfd, const ks_mount_op *m) {
    int is_bind = (m->flags & MS_BIND) != 0;
    int fd = open_in_root(rootfd, m->target, 1, m->target_is_file);
    if (fd < 0) fail(sync_fd, "create mount point", m->target, -fd);
    char where[64];
    fd_path(where, fd);
    if (mount(m->source, where, m->fstype, m->flags, m->data) < 0) {
        int e = errno;
        // sysfs cannot be mounted without owning the network namespace: bind the host's
        // read-only instead, as runc does for rootless containers.
        if (m->fstype && strcmp(m->fstype, "sysfs") == 0 && (e == EPERM || e == EBUSY)) {
            if (mount("/sys", where, NULL, MS_BIND | MS_REC, NULL) < 0) fail(sync_fd, "mount sysfs on", m->target, errno);
        } else {
            fail(sync_fd, "mount on", m->target, e);
        }
    }
    close(fd);
    if ((is_bind && m->remount_flags) || m->propagation) {
        // The new mount sits on top of the dentry `fd` pointed at: reopen to reach it.
        fd = open_in_root(rootfd, m->target, 0, 0);
        if (fd < 0) fail(sync_fd, "reopen mount", m->target, -fd);
        fd_path(where, fd);
        if (is_bind && m->remount_flags &&
            mount(NULL, where, NULL, MS_BIND | MS_REMOUNT | m->remount_flags, NULL) < 0)
            fail(sync_fd, "remount", m->target, errno);
        if (m->propagation && mount(NULL, where, NULL, m->propagation, NULL) < 0)
            fail(sync_fd, "set propagation of", m->target, errno);
        close(fd);
    }
    if (m->recursive_ro) {
        fd = open_in_root(rootfd, m->target, 0, 0);
        if (fd < 0) fail(sync_fd, "reopen mount", m->target, -fd);
        fd_path(where, fd);
        struct ks_mount_attr attr = {KS_MOUNT_ATTR_RDONLY, 0, 0, 0};
        if (syscall(SYS_mount_setattr, AT_FDCWD, where, KS_AT_RECURSIVE, &attr, sizeof attr) < 0)
            fail(sync_fd, "make read-only recursively (rro)", m->target, errno);
        close(fd);
    }
    (void)a;
}

int ks_have_mount_setattr(void) {
    // EINVAL (a zero-size attr) means the call exists; ENOSYS that it does not.
    long rc = syscall(SYS_mount_setattr, -1, "", 0, NULL, 0);
    return !(rc < 0 && errno == ENOSYS);
}

static void make_device(int sync_fd, int rootfd, const ks_device *d) {
    // Parent directory inside the root, then mknod by name under it.
    char parent[PATH_MAX];
    const char *slash = strrchr(d->path, '/');
    size_t plen = slash ? (size_t)(slash - d->path) : 0;
    if (plen >= sizeof parent) fail(sync_fd, "device path too long", d->path, ENAMETOOLONG);
    memcpy(parent, d->path, plen);
    parent[plen] = 0;
    int pfd = open_in_root(rootfd, plen ? parent : "/", 1, 0);
    if (pfd < 0) fail(sync_fd, "create device directory for", d->path, -pfd);
    int dir = openat(pfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    close(pfd);
    if (dir < 0) fail(sync_fd, "open device directory for", d->path, errno);
    const char *name = slash ? slash + 1 : d->path;
    if (mknodat(dir, name, d->mode, makedev(d->major, d->minor)) < 0) {
        int e = errno;
        if (e == EEXIST) { close(dir); return; }
        if (e != EPERM) fail(sync_fd, "mknod", d->path, e);
        // In a user namespace mknod is refused: bind the host's device node instead.
        int f = openat(dir, name, O_CREAT | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0666);
        if (f < 0) fail(sync_fd, "create device file", d->path, errno);
        close(f);
        int t = open_in_root(rootfd, d->path, 0, 0);
        if (t < 0) fail(sync_fd, "open device file", d->path, -t);
        char where[64];
        fd_path(where, t);
        if (mount(d->path, where, NULL, MS_BIND, NULL) < 0) fail(sync_fd, "bind device", d->path, errno);
        close(t);
    } else {
        fchownat(dir, name, d->uid, d->gid, AT_SYMLINK_NOFOLLOW);
        fchmodat(dir, name, d->mode & 07777, 0);
    }
    close(dir);
}

static void dev_symlinks(int rootfd) {
    static const char *const links[][2] = {
        {"/proc/self/fd", "dev/fd"}, {"/proc/self/fd/0", "dev/stdin"}, {"/proc/self/fd/1", "dev/stdout"},
        {"/proc/self/fd/2", "dev/stderr"}, {"/proc/kcore", "dev/core"}, {"pts/ptmx", "dev/ptmx"},
    };
    int dev = ks_openat2(rootfd, "/dev", O_RDONLY | O_DIRECTORY, IN_ROOT);
    if (dev < 0) return;
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
        symlinkat(links[i][0], dev, links[i][1] + 4);  // an existing entry is kept
    }
    close(dev);
}

// Walks up from the rootfs's parent directory to the first mount point and makes that
// mount private (mount(2) changes propagation only on a mount's root: EINVAL elsewhere).
static void make_parent_mount_private(int sync_fd, const char *rootfs) {
    char dir[PATH_MAX];
    size_t len = strlen(rootfs);
    if (len >= sizeof dir) fail(sync_fd, "rootfs path too long", rootfs, ENAMETOOLONG);
    memcpy(dir, rootfs, len + 1);
    for (;;) {
        char *slash = strrchr(dir, '/');
        if (!slash) return;
        if (slash == dir) { dir[1] = 0; } else { *slash = 0; }
        if (mount(NULL, dir, NULL, MS_PRIVATE, NULL) == 0) return;
        if (errno != EINVAL) fail(sync_fd, "make the rootfs's parent mount private", dir, errno);
        if (dir[1] == 0) return;
    }
}

static void setup_rootfs(const ks_container_attr *a, int sync_fd) {
    unsigned long prop = a->rootfs_propagation ? a->rootfs_propagation : (MS_SLAVE | MS_REC);
    if (mount(NULL, "/", NULL, prop, NULL) < 0) fail(sync_fd, "set propagation of /", NULL, errno);
    // pivot_root (and the MS_MOVE fallback) refuse a new root under a shared mount
    // (EINVAL): with an rshared root, make just the mount holding the rootfs private, as
    // runc does; the requested propagation is applied to the new / after the pivot.
    if (prop & MS_SHARED) make_parent_mount_private(sync_fd, a->rootfs);
    // pivot_root needs the new root to be a mount point.
    if (mount(a->rootfs, a->rootfs, NULL, MS_BIND | MS_REC, NULL) < 0) fail(sync_fd, "bind rootfs", a->rootfs, errno);
    int rootfd = open(a->rootfs, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0) fail(sync_fd, "open rootfs", a->rootfs, errno);
    for (int i = 0; i < a->mount_count; i++) do_mount(a, sync_fd, rootfd, &a->mounts[i]);
    for (int i = 0; i < a->device_count; i++) make_device(sync_fd, rootfd, &a->devices[i]);
    if (a->setup_dev) dev_symlinks(rootfd);
    close(rootfd);

    if (a->no_pivot) {
        if (chdir(a->rootfs) < 0) fail(sync_fd, "chdir", a->rootfs, errno);
        if (mount(a->rootfs, "/", NULL, MS_MOVE, NULL) < 0) fail(sync_fd, "move rootfs to /", NULL, errno);
        if (chroot(".") < 0) fail(sync_fd, "chroot", a->rootfs, errno);
    } else {
        int oldroot = open("/", O_DIRECTORY | O_RDONLY | O_CLOEXEC);
        int newroot = open(a->rootfs, O_DIRECTORY | O_RDONLY | O_CLOEXEC);
        if (oldroot < 0 || newroot < 0) fail(sync_fd, "open roots for pivot_root", a->rootfs, errno);
        if (fchdir(newroot) < 0) fail(sync_fd, "chdir", a->rootfs, errno);
        if (syscall(SYS_pivot_root, ".", ".") < 0) {
            int e = errno;
            // A root on ramfs/initramfs cannot be pivoted: move it over / and chroot,
            // as the OCI spec allows.
            if (e != EINVAL) fail(sync_fd, "pivot_root", a->rootfs, e);
            if (mount(a->rootfs, "/", NULL, MS_MOVE, NULL) < 0) fail(sync_fd, "move rootfs to /", NULL, errno);
            if (chroot(".") < 0) fail(sync_fd, "chroot", a->rootfs, errno);
        } else {
            // The old root is stacked under the new one at "/": detach it.
            if (fchdir(oldroot) < 0) fail(sync_fd, "chdir to old root", NULL, errno);
            if (mount(NULL, ".", NULL, MS_SLAVE | MS_REC, NULL) < 0) fail(sync_fd, "make old root slave", NULL, errno);
            if (umount2(".", MNT_DETACH) < 0) fail(sync_fd, "detach old root", NULL, errno);
        }
        close(oldroot);
        close(newroot);
    }
    if (chdir("/") < 0) fail(sync_fd, "chdir /", NULL, errno);
    // The container's own root gets the propagation its spec asks for (rshared: mounts
    // made under a shared bind reach the host; rslave: the host's reach the container).
    if (a->rootfs_propagation && mount(NULL, "/", NULL, a->rootfs_propagation, NULL) < 0)
        fail(sync_fd, "set propagation of the container's /", NULL, errno);

    for (int i = 0; i < a->readonly_count; i++) {
        const char *p = a->readonly[i];
        if (mount(p, p, NULL, MS_BIND | MS_REC, NULL) < 0) {
            if (errno == ENOENT) continue;
            fail(sync_fd, "bind read-only path", p, errno);
        }
        if (mount(NULL, p, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC, NULL) < 0)
            fail(sync_fd, "remount read-only", p, errno);
    }
    for (int i = 0; i < a->masked_count; i++) {
        const char *p = a->masked[i];
        struct stat st;
        if (lstat(p, &st) < 0) continue;  // absent paths need no masking
        int rc = S_ISDIR(st.st_mode) ? mount("tmpfs", p, "tmpfs", MS_RDONLY, NULL)
                                     : mount("/dev/null", p, NULL, MS_BIND, NULL);
        if (rc < 0) fail(sync_fd, "mask", p, errno);
    }
    if (a->rootfs_readonly && mount(NULL, "/", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL) < 0)
        fail(sync_fd, "remount / read-only", NULL, errno);
}

// A terminal from the container's own devpts (so ttyname and /dev/pts agree inside):
// the slave becomes stdio and the controlling terminal, the master goes to the parent.
static void make_console(int sync_fd) {
    int m = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) fail(sync_fd, "open /dev/ptmx", NULL, errno);
    int unlock = 0;
    if (ioctl(m, TIOCSPTLCK, &unlock) < 0) fail(sync_fd, "unlock pty", NULL, errno);
    int s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY);
    if (s < 0) fail(sync_fd, "open pty peer", NULL, errno);
    ks_child_report r;
    memset(&r, 0, sizeof r);
    r.kind = 2;
    ssize_t w = ks_send_with_fd(sync_fd, &r, sizeof r, m);
    if (w < 0) fail(sync_fd, "send console", NULL, (int)-w);
    close(m);
    for (int fd = 0; fd < 3; fd++)
        if (dup2(s, fd) < 0) fail(sync_fd, "dup2 console", NULL, errno);
    if (s > 2) close(s);
    if (ioctl(0, TIOCSCTTY, 0) < 0) fail(sync_fd, "set controlling terminal", NULL, errno);
}

static void write_file(int sync_fd, const char *path, const char *value, const char *step) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) fail(sync_fd, step, path, errno);
    size_t n = strlen(value);
    if (write(fd, value, n) != (ssize_t)n) fail(sync_fd, step, path, errno);
    close(fd);
}

static void set_capabilities(const ks_container_attr *a, int sync_fd) {
    struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    data[0].effective = (uint32_t)a->cap_effective;
    data[1].effective = (uint32_t)(a->cap_effective >> 32);
    data[0].permitted = (uint32_t)a->cap_permitted;
    data[1].permitted = (uint32_t)(a->cap_permitted >> 32);
    data[0].inheritable = (uint32_t)a->cap_inheritable;
    data[1].inheritable = (uint32_t)(a->cap_inheritable >> 32);
    if (syscall(SYS_capset, &hdr, data) < 0) fail(sync_fd, "capset", NULL, errno);
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    for (int c = 0; c < 64; c++)
        if (a->cap_ambient & (1ULL << c)) prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0);
}

static void load_seccomp(const ks_container_attr *a, int sync_fd) {
    struct sock_fprog prog = { .len = a->seccomp_len, .filter = (struct sock_filter *)a->seccomp_filter };
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) fail(sync_fd, "load seccomp filter", NULL, errno);
}

// execvpe with the container's PATH (from envp), after pivot_root.
static void exec_in_container(const ks_container_attr *a, int sync_fd) {
    if (a->exec_fd >= 0) {
        syscall(SYS_execveat, a->exec_fd, "", (char *const *)a->argv, (char *const *)a->envp, AT_EMPTY_PATH);
        fail(sync_fd, "exec the host program for", a->path, errno);
    }
    if (strchr(a->path, '/')) {
        execve(a->path, (char *const *)a->argv, (char *const *)a->envp);
        fail(sync_fd, "exec", a->path, errno);
    }
    const char *pathvar = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    for (char *const *e = a->envp; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) { pathvar = *e + 5; break; }
    int last_err = ENOENT;
    const char *p = pathvar;
    while (1) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        char full[PATH_MAX];
        if (dlen + strlen(a->path) + 2 < sizeof full) {
            memcpy(full, p, dlen);
            full[dlen] = '/';
            strcpy(full + dlen + 1, a->path);
            execve(full, (char *const *)a->argv, (char *const *)a->envp);
            if (errno != ENOENT && errno != ENOTDIR) last_err = errno;
        }
        if (!end) break;
        p = end + 1;
    }
    fail(sync_fd, "exec", a->path, last_err);
}

static void wait_for_go(int sync_fd) {
    char go = 0;
    ssize_t n;
    do { n = read(sync_fd, &go, 1); } while (n < 0 && errno == EINTR);
    if (n != 1 || go != 'G') _exit(0);  // the parent gave up on us
}

__attribute__((noreturn))
static void container_child(const ks_container_attr *a) {
    int sync_fd = a->sync_fd;
    if (a->parent_sync_fd >= 0) close(a->parent_sync_fd);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int s = 1; s < _NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP) sigaction(s, &dfl, NULL);
    // Die with the daemon while still being set up (cleared before exec).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    // The parent's socket pair is non-blocking; this end waits.
    int fl = fcntl(sync_fd, F_GETFL);
    if (fl >= 0) fcntl(sync_fd, F_SETFL, fl & ~O_NONBLOCK);

    // 'G' says the parent has moved us into our cgroups (and written our id maps). Only
    // a new user namespace needs it before anything else; otherwise the setup below
    // overlaps the cgroup migration (in cgroup v1 each costs an RCU grace period) and we
    // wait for 'G' only before reporting ready or exec'ing.
    ssize_t n;
    int early_go = (a->clone_flags & CLONE_NEWUSER) != 0;
    if (early_go) wait_for_go(sync_fd);

    if (a->setns_pidfd >= 0 && setns(a->setns_pidfd, a->setns_pidfd_flags) < 0)
        fail(sync_fd, "join the container's namespaces", NULL, errno);
    for (int i = 0; i < a->join_count; i++)
        if (setns(a->join_fds[i], a->join_types[i]) < 0) fail(sync_fd, "setns", NULL, errno);
    if ((a->clone_flags & CLONE_NEWUSER) && (setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0))
        fail(sync_fd, "become root in the user namespace", NULL, errno);

    if (setsid() < 0) fail(sync_fd, "setsid", NULL, errno);

    // The stdio mapping; the sync socket is lifted above it and stays open until exec.
    if (ks_child_map_fds(a->fds, a->fd_count, &sync_fd) < 0) fail(sync_fd, "map stdio", NULL, errno);

    if (a->rootfs) setup_rootfs(a, sync_fd);
    if (a->create_console) make_console(sync_fd);

    for (int i = 0; i < a->sysctl_count; i++) {
        char path[PATH_MAX] = "/proc/sys/";
        size_t k = strlen(path);
        for (const char *c = a->sysctls[i].key; *c && k + 1 < sizeof path; c++) path[k++] = *c == '.' ? '/' : *c;
        path[k] = 0;
        write_file(sync_fd, path, a->sysctls[i].value, "write sysctl");
    }
    if (a->hostname && sethostname(a->hostname, strlen(a->hostname)) < 0) fail(sync_fd, "sethostname", a->hostname, errno);
    if (a->domainname && setdomainname(a->domainname, strlen(a->domainname)) < 0) fail(sync_fd, "setdomainname", a->domainname, errno);

    if (a->has_oom_score_adj) {
        char v[16];
        int x = a->oom_score_adj, k = 0, neg = x < 0;
        unsigned u = neg ? (unsigned)(-x) : (unsigned)x;
        char tmp[16];
        do { tmp[k++] = (char)('0' + u % 10); u /= 10; } while (u);
        int j = 0;
        if (neg) v[j++] = '-';
        while (k) v[j++] = tmp[--k];
        v[j] = 0;
        write_file(sync_fd, "/proc/self/oom_score_adj", v, "write oom_score_adj");
    }
    for (int i = 0; i < a->rlimit_count; i++) {
        struct rlimit rl = { .rlim_cur = a->rlimits[i].soft, .rlim_max = a->rlimits[i].hard };
        if (setrlimit(a->rlimits[i].resource, &rl) < 0) fail(sync_fd, "setrlimit", NULL, errno);
    }

    if (a->seccomp_filter && !a->no_new_privs) load_seccomp(a, sync_fd);

    if (a->has_caps) {
        for (int c = 0; c < 64; c++) {
            if (a->cap_bounding & (1ULL << c)) continue;
            if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno == EINVAL) break;  // past the last cap
        }
        prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0);
    }
    if (setgroups((size_t)a->gid_count, a->gid_count ? (const gid_t *)a->gids : NULL) < 0 && errno != EPERM)
        fail(sync_fd, "setgroups", NULL, errno);
    if (setresgid(a->gid, a->gid, a->gid) < 0) fail(sync_fd, "setgid", NULL, errno);
    if (setresuid(a->uid, a->uid, a->uid) < 0) fail(sync_fd, "setuid", NULL, errno);
    if (a->has_caps) {
        prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
        set_capabilities(a, sync_fd);
    }
    if (a->umask >= 0) umask((mode_t)a->umask);
    if (a->cwd && chdir(a->cwd) < 0) fail(sync_fd, "chdir", a->cwd, errno);
    if (a->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) fail(sync_fd, "set no_new_privs", NULL, errno);

    if (!early_go) wait_for_go(sync_fd);
    // 'G' came after we joined our cgroups: a cgroup namespace made now has them as root.
    if (a->late_cgroupns && unshare(CLONE_NEWCGROUP) < 0) fail(sync_fd, "unshare cgroup namespace", NULL, errno);
    if (a->wait_for_start) {
        ks_child_report ready;
        memset(&ready, 0, sizeof ready);
        ssize_t w;
        do { w = write(sync_fd, &ready, sizeof ready); } while (w < 0 && errno == EINTR);
        char s = 0;
        do { n = read(sync_fd, &s, 1); } while (n < 0 && errno == EINTR);
        if (n != 1 || s != 'S') _exit(0);  // deleted before it was started
    }
    prctl(PR_SET_PDEATHSIG, 0);
    if (a->seccomp_filter && a->no_new_privs) load_seccomp(a, sync_fd);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    exec_in_container(a, sync_fd);
    _exit(127);
}

int ks_container_clone(const ks_container_attr *a, pid_t *pid, int *pidfd) {
    int child_pidfd = -1;
    // Signals stay blocked across the clone so no handler of ours runs in the child.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    long rc = ks_clone3_pidfd(a->clone_flags, a->cgroup_fd, &child_pidfd);
    if (rc == 0) container_child(a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc < 0) return (int)rc;
    *pid = (pid_t)rc;
    *pidfd = child_pidfd;
    return 0;
}

// ---- pinned namespaces without a launcher ----

struct pin_args {
    const char *const *sources;
    const char *const *targets;
    int count;
    int failed_index;
    int failed_errno;
};

// Runs in the new namespaces, sharing the parent's memory (CLONE_VM) while the parent
// is suspended (CLONE_VFORK): bind-mounts its own ns files onto the targets, then exits.
static int pin_child(void *p) {
    struct pin_args *a = p;
    for (int i = 0; i < a->count; i++) {
        if (mount(a->sources[i], a->targets[i], NULL, MS_BIND, NULL) != 0) {
            a->failed_index = i;
            a->failed_errno = errno;
            _exit(1);
        }
    }
    _exit(0);
}

int ks_pin_namespaces(int flags, const char *const *sources, const char *const *targets, int count, int *failed_index) {
    struct pin_args a = {sources, targets, count, -1, 0};
    size_t stack_size = 64 * 1024;
    char *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) return -errno;
    pid_t pid = clone(pin_child, stack + stack_size, flags | CLONE_VM | CLONE_VFORK | SIGCHLD, &a);
    int err = pid < 0 ? errno : 0;
    if (pid > 0) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    }
    munmap(stack, stack_size);
    if (err) return -err;
    *failed_index = a.failed_index;
    return a.failed_index >= 0 ? -a.failed_errno : 0;
}

// ---- cgroup v1 joins off the loop ----

// cgroup v1 has no CLONE_INTO_CGROUP, and moving a process waits for an RCU grace period
// (milliseconds). A joiner does it instead of the daemon's loop: a CLONE_VM child on a
// stack of its own that writes `target` into each cgroup.procs (its copy of the fd table)
// and exits with 0 or the errno. It reads only its own block and makes raw syscalls, so
// it never writes the errno it shares with the loop's thread.
struct cg_join {
    int count;
    int fds[64];
    char pid[16];
    int pidlen;
};

static long raw_write(int fd, const void *buf, size_t len) {
#if defined(__x86_64__)
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(SYS_write), "D"(fd), "S"(buf), "d"(len) : "rcx", "r11", "memory");
    return ret;
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = SYS_write;
    register long x0 __asm__("x0") = fd;
    register long x1 __asm__("x1") = (long)buf;
    register long x2 __asm__("x2") = (long)len;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
    return x0;
#else
    long r = syscall(SYS_write, fd, buf, len);
    return r < 0 ? -errno : r;
#endif
}

static int cg_join_main(void *p) {
    struct cg_join *j = p;
    for (int i = 0; i < j->count; i++) {
        long w;
        do { w = raw_write(j->fds[i], j->pid, (size_t)j->pidlen); } while (w == -EINTR);
        if (w < 0) return (int)-w;
        if (w != j->pidlen) return EIO;
    }
    return 0;
}

#define CG_JOIN_SIZE (64 * 1024)

void *ks_cgroup_join_start(const int *fds, int count, pid_t target, pid_t *pid, int *pidfd) {
    if (count > 64) { errno = E2BIG; return NULL; }
    char *block = mmap(NULL, CG_JOIN_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (block == MAP_FAILED) return NULL;
    struct cg_join *j = (struct cg_join *)block;
    j->count = count;
    for (int i = 0; i < count; i++) j->fds[i] = fds[i];
    j->pidlen = snprintf(j->pid, sizeof j->pid, "%d", (int)target);
    int fd = -1;
    pid_t child = clone(cg_join_main, block + CG_JOIN_SIZE, CLONE_VM | CLONE_PIDFD | SIGCHLD, j, &fd);
    if (child < 0) {
        int e = errno;
        munmap(block, CG_JOIN_SIZE);
        errno = e;
        return NULL;
    }
    *pid = child;
    *pidfd = fd;
    return block;
}

void ks_cgroup_join_release(void *block) { munmap(block, CG_JOIN_SIZE); }
