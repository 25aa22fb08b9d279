// Does KVM really run a guest here? Opening /dev/kvm is not enough: a nested or
// para-virtualised host (PVM) accepts KVM_CREATE_VM and then cannot run ordinary guests.
// The probe runs a few bytes of real-mode code in a forked child, with a deadline:
//   mov al, 0x4b ; out 0x10, al ; hlt
// and passes only when the vCPU exits with that port write.
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>
#include "CShims.h"

// Child exit codes: the step that failed.
enum { P_OK = 0, P_OPEN = 10, P_API, P_VM, P_MEM, P_VCPU, P_RUNSIZE, P_REGS, P_RUN, P_EXIT };

static int probe_child(void) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) return P_OPEN;
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != 12) return P_API;
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) return P_VM;
    uint8_t *mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return P_MEM;
    const uint8_t code[] = {0xb0, 0x4b, 0xe6, 0x10, 0xf4};
    memcpy(mem, code, sizeof code);
    struct kvm_userspace_memory_region region = {.slot = 0, .guest_phys_addr = 0x1000, .memory_size = 0x1000, .userspace_addr = (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) return P_MEM;
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) return P_VCPU;
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size <= 0) return P_RUNSIZE;
    struct kvm_run *run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) return P_RUNSIZE;
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) return P_REGS;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) return P_REGS;
    struct kvm_regs regs = {.rip = 0x1000, .rax = 0, .rflags = 0x2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) return P_REGS;
    if (ioctl(vcpu, KVM_RUN, 0) < 0) return P_RUN;
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT || run->io.port != 0x10) return P_EXIT;
    if (((uint8_t *)run)[run->io.data_offset] != 0x4b) return P_EXIT;
    return P_OK;
}

pid_t ks_kvm_probe_fork(void) {
    pid_t pid = fork();
    if (pid == 0) _exit(probe_child());
    return pid;
}

int ks_kvm_probe_describe(int exit_code, char *why, size_t why_len) {
    static const char *const steps[] = {"open /dev/kvm", "KVM API version is not 12", "KVM_CREATE_VM", "guest memory", "KVM_CREATE_VCPU",
                                        "KVM_GET_VCPU_MMAP_SIZE", "setting vCPU registers", "KVM_RUN", "the test guest did not write its marker (wrong exit)"};
    if (exit_code == P_OK) {
        snprintf(why, why_len, "a test guest ran to its marker");
        return 1;
    }
    if (exit_code >= P_OPEN && exit_code <= P_EXIT) snprintf(why, why_len, "%s failed", steps[exit_code - P_OPEN]);
    else snprintf(why, why_len, "the probe exited %d", exit_code);
    return 0;
}
