// The pod holder: one tiny process per CRI pod that lives in the pod's namespaces for
// as long as the pod does. containerd 2.x points every container's namespaces at
// /proc/<pid>/ns/* of the pid Controller.Start returned, and crictl/nsenter/CNI use the
// same pid, so it must be a real process in the pod — never the daemon. When the pod
// has its own pid namespace the holder is its init and reaps orphans, as a pause
// container does.
//
// Its program is a few dozen instructions with no libc, assembled below into .rodata
// (never run by the daemon) and wrapped at run time into a minimal static ELF in a
// sealed memfd: every holder maps the same pages, so a pod costs one or two dirty
// stack pages and no dynamic loader, no Swift runtime, no libc relocations.
#include <features.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "CShims.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef AT_EMPTY_PATH
#define AT_EMPTY_PATH 0x1000
#endif

// The program: name itself (comm is the memfd's fd number otherwise), set its signal
// mask to exactly SIGCHLD (the daemon's blocked set is inherited), then forever reap
// any child; with none, sleep in rt_sigtimedwait until the next SIGCHLD. A blocked
// SIGCHLD stays pending even at its default (ignore) disposition, so no exit is missed
// between ECHILD and the wait. As a namespace init it ignores every signal it has no
// handler for; the daemon ends it with SIGKILL.
#if defined(__x86_64__)
#define KS_HOLDER_MACHINE EM_X86_64
__asm__(
    ".pushsection .rodata.ks_holder,\"a\"\n"
    ".globl ks_holder_code_begin\n.hidden ks_holder_code_begin\n"
    ".globl ks_holder_code_end\n.hidden ks_holder_code_end\n"
    "ks_holder_code_begin:\n"
    "  mov $157, %eax\n"            // prctl(PR_SET_NAME, name)
    "  mov $15, %edi\n"
    "  lea 9f(%rip), %rsi\n"
    "  syscall\n"
    "  push $0x10000\n"             // sigset: SIGCHLD (17) is bit 16
    "  mov $14, %eax\n"             // rt_sigprocmask(SIG_SETMASK, &set, NULL, 8)
    "  mov $2, %edi\n"
    "  mov %rsp, %rsi\n"
    "  xor %edx, %edx\n"
    "  mov $8, %r10d\n"
    "  syscall\n"
    "1:\n"
    "  mov $61, %eax\n"             // wait4(-1, NULL, 0, NULL)
    "  mov $-1, %rdi\n"
    "  xor %esi, %esi\n"
    "  xor %edx, %edx\n"
    "  xor %r10d, %r10d\n"
    "  syscall\n"
    "  cmp $-10, %rax\n"            // -ECHILD: nothing to reap yet
    "  jne 1b\n"
    "  mov $128, %eax\n"            // rt_sigtimedwait(&set, NULL, NULL, 8)
    "  mov %rsp, %rdi\n"
    "  xor %esi, %esi\n"
    "  xor %edx, %edx\n"
    "  mov $8, %r10d\n"
    "  syscall\n"
    "  jmp 1b\n"
    "9: .asciz \"kuasar-pod\"\n"
    "ks_holder_code_end:\n"
    ".popsection\n");
#elif defined(__aarch64__)
#define KS_HOLDER_MACHINE EM_AARCH64
__asm__(
    ".pushsection .rodata.ks_holder,\"a\"\n"
    ".globl ks_holder_code_begin\n.hidden ks_holder_code_begin\n"
    ".globl ks_holder_code_end\n.hidden ks_holder_code_end\n"
    "ks_holder_code_begin:\n"
    "  mov x8, #167\n"              // prctl(PR_SET_NAME, name)
    "  mov x0, #15\n"
    "  adr x1, 9f\n"
    "  svc #0\n"
    "  mov x9, #0x10000\n"          // sigset: SIGCHLD (17) is bit 16
    "  str x9, [sp, #-16]!\n"
    "  mov x8, #135\n"              // rt_sigprocmask(SIG_SETMASK, &set, NULL, 8)
    "  mov x0, #2\n"
    "  mov x1, sp\n"
    "  mov x2, #0\n"
    "  mov x3, #8\n"
    "  svc #0\n"
    "1:\n"
    "  mov x8, #260\n"              // wait4(-1, NULL, 0, NULL)
    "  mov x0, #-1\n"
    "  mov x1, #0\n"
    "  mov x2, #0\n"
    "  mov x3, #0\n"
    "  svc #0\n"
    "  cmn x0, #10\n"               // -ECHILD: nothing to reap yet
    "  b.ne 1b\n"
    "  mov x8, #137\n"              // rt_sigtimedwait(&set, NULL, NULL, 8)
    "  mov x0, sp\n"
    "  mov x1, #0\n"
    "  mov x2, #0\n"
    "  mov x3, #8\n"
    "  svc #0\n"
    "  b 1b\n"
    "9: .asciz \"kuasar-pod\"\n"
    "  .balign 4\n"
    "ks_holder_code_end:\n"
    ".popsection\n");
#endif

#ifdef KS_HOLDER_MACHINE
extern const unsigned char ks_holder_code_begin[];
extern const unsigned char ks_holder_code_end[];

int ks_pod_holder_image(void) {
    enum { BASE = 0x400000 };
    size_t code = (size_t)(ks_holder_code_end - ks_holder_code_begin);
    size_t headers = sizeof(Elf64_Ehdr) + 2 * sizeof(Elf64_Phdr);
    unsigned char image[4096];
    if (headers + code > sizeof image) return -E2BIG;
    memset(image, 0, sizeof image);
    Elf64_Ehdr *eh = (Elf64_Ehdr *)image;
    memcpy(eh->e_ident, ELFMAG, SELFMAG);
    eh->e_ident[EI_CLASS] = ELFCLASS64;
    eh->e_ident[EI_DATA] = ELFDATA2LSB;
    eh->e_ident[EI_VERSION] = EV_CURRENT;
    eh->e_ident[EI_OSABI] = ELFOSABI_SYSV;
    eh->e_type = ET_EXEC;
    eh->e_machine = KS_HOLDER_MACHINE;
    eh->e_version = EV_CURRENT;
    eh->e_entry = BASE + headers;
    eh->e_phoff = sizeof(Elf64_Ehdr);
    eh->e_ehsize = sizeof(Elf64_Ehdr);
    eh->e_phentsize = sizeof(Elf64_Phdr);
    eh->e_phnum = 2;
    Elf64_Phdr *load = (Elf64_Phdr *)(image + sizeof(Elf64_Ehdr));
    load->p_type = PT_LOAD;
    load->p_flags = PF_R | PF_X;
    load->p_offset = 0;
    load->p_vaddr = load->p_paddr = BASE;
    load->p_filesz = load->p_memsz = headers + code;
    load->p_align = 0x1000;
    Elf64_Phdr *stack = load + 1;  // a non-executable stack
    stack->p_type = PT_GNU_STACK;
    stack->p_flags = PF_R | PF_W;
    memcpy(image + headers, ks_holder_code_begin, code);

    int fd = (int)syscall(SYS_memfd_create, "kuasar-pod", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -errno;
    size_t len = headers + code, off = 0;
    while (off < len) {
        ssize_t w = write(fd, image + off, len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) { int e = errno; close(fd); return -e; }
        off += (size_t)w;
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0) {
        int e = errno; close(fd); return -e;
    }
    // exec refuses a file that is open for writing (ETXTBSY): keep a read-only view.
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int ro = open(path, O_RDONLY | O_CLOEXEC);
    int e = errno;
    close(fd);
    return ro < 0 ? -e : ro;
}
#else
int ks_pod_holder_image(void) { return -ENOEXEC; }
#endif

struct holder_child {
    const ks_pod_holder_attr *attr;
    const char *stage;   // what failed, for the error message
    const char *detail;
    int err;
};

#define HOLDER_FAIL(c, what, d) do { (c)->stage = (what); (c)->detail = (d); (c)->err = errno; _exit(127); } while (0)

// Runs in the pod's new namespaces, sharing the parent's memory (CLONE_VM) while the
// parent is suspended (CLONE_VFORK) until the exec: only system calls, no allocation.
static int holder_main(void *p) {
    struct holder_child *c = p;
    const ks_pod_holder_attr *a = c->attr;
    if (a->netns_fd >= 0 && setns(a->netns_fd, CLONE_NEWNET) < 0) HOLDER_FAIL(c, "setns(net)", a->netns_path);
    if (a->hostname && sethostname(a->hostname, strlen(a->hostname)) < 0) HOLDER_FAIL(c, "sethostname", a->hostname);
    if (a->loopback_up) {
        // A network namespace we made has only `lo`, and it starts down; CNI's loopback
        // plugin would bring it up, but a pod without CNI still talks to itself.
        int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (s < 0) HOLDER_FAIL(c, "socket", "for lo");
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        memcpy(ifr.ifr_name, "lo", 3);
        if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) HOLDER_FAIL(c, "SIOCGIFFLAGS", "lo");
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) HOLDER_FAIL(c, "SIOCSIFFLAGS", "lo up");
        close(s);
    }
    for (int i = 0; i < a->sysctl_count; i++) {
        int fd = open(a->sysctls[i].key, O_WRONLY | O_CLOEXEC);
        if (fd < 0) HOLDER_FAIL(c, "open sysctl", a->sysctls[i].key);
        size_t len = strlen(a->sysctls[i].value);
        if (write(fd, a->sysctls[i].value, len) != (ssize_t)len) HOLDER_FAIL(c, "write sysctl", a->sysctls[i].key);
        close(fd);
    }
    for (int i = 0; i < a->pin_count; i++) {
        if (mount(a->pin_sources[i], a->pin_targets[i], NULL, MS_BIND, NULL) < 0) HOLDER_FAIL(c, "pin namespace", a->pin_targets[i]);
    }
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0) HOLDER_FAIL(c, "open", "/dev/null");
    for (int fd = 0; fd < 3; fd++) if (dup2(null, fd) < 0) HOLDER_FAIL(c, "dup2", "/dev/null");
    if (setsid() < 0) HOLDER_FAIL(c, "setsid", NULL);
    syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC);
    // Without stack randomization the kernel's initial frame (argv, auxv: well under a
    // page) sits at the top of one stack page instead of often straddling two: ~4 kB per
    // pod. The holder reads no input, so there is nothing for ASLR to protect.
    int persona = personality(0xffffffff);
    if (persona != -1) personality((unsigned long)persona | ADDR_NO_RANDOMIZE);
    char *const envp[] = {NULL};
    syscall(SYS_execveat, a->image_fd, "", a->argv, envp, AT_EMPTY_PATH);
    HOLDER_FAIL(c, "execveat", "the holder image (vm.memfd_noexec may forbid executing a memfd)");
    return 127;
}

int ks_pod_holder_spawn(const ks_pod_holder_attr *attr, pid_t *pid, int *pidfd, char *errbuf, size_t errlen) {
    struct holder_child c = {attr, NULL, NULL, 0};
    size_t stack_size = 64 * 1024;
    char *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) return -errno;
    int fd = -1;
    int flags = (int)attr->clone_flags | CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD;
    pid_t child = clone(holder_main, stack + stack_size, flags, &c, &fd);
    int err = child < 0 ? errno : 0;
    munmap(stack, stack_size);
    if (err) {
        snprintf(errbuf, errlen, "clone(pod namespaces)");
        return -err;
    }
    if (c.stage) {
        // It exited before the exec: reap it here so its status is never mistaken for the holder's.
        siginfo_t info;
        while (waitid(P_PID, (id_t)child, &info, WEXITED) < 0 && errno == EINTR) {}
        close(fd);
        snprintf(errbuf, errlen, "%s%s%s", c.stage, c.detail ? " " : "", c.detail ? c.detail : "");
        return -(c.err ? c.err : EIO);
    }
    *pid = child;
    *pidfd = fd;
    return 0;
}
