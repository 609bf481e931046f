/* The floor under exit_cost.py's rows: the same real-mode guest program run by a loop of KVM_RUN calls in
 * C, with the VM set up as pyvmm.kvm.selftest.real_mode_vcpu sets it up (TSS, identity map, in-kernel
 * irqchip and PIT). Every port-I/O exit is answered with 0 (reads) or dropped (writes) without looking
 * further, until the write to the done port. Prints the seconds from the first KVM_RUN to that write.
 *
 * Usage: exit_floor PROGRAM_FILE CODE_GPA DONE_PORT TSS_ADDR IDENTITY_MAP_ADDR
 * (built and run by exit_cost.py's `c` row, with cc -O2; the addresses are pyvmm.layout's)
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE 0x10000

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int check(int ret, const char *what) {
    if (ret < 0) {
        perror(what);
        exit(1);
    }
    return ret;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s PROGRAM_FILE CODE_GPA DONE_PORT TSS_ADDR IDENTITY_MAP_ADDR\n", argv[0]);
        return 2;
    }
    unsigned long code_gpa = strtoul(argv[2], NULL, 0);
    unsigned done_port = strtoul(argv[3], NULL, 0);
    unsigned long tss_addr = strtoul(argv[4], NULL, 0);
    __u64 identity = strtoull(argv[5], NULL, 0);
    unsigned char *mem = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    FILE *f = fopen(argv[1], "rb");
    if (mem == MAP_FAILED || f == NULL || code_gpa >= RAM_SIZE) {
        perror(argv[1]);
        return 1;
    }
    fread(mem + code_gpa, 1, RAM_SIZE - code_gpa, f);
    fclose(f);

    int kvm = check(open("/dev/kvm", O_RDWR | O_CLOEXEC), "/dev/kvm");
    int vm = check(ioctl(kvm, KVM_CREATE_VM, 0), "KVM_CREATE_VM");
    check(ioctl(vm, KVM_SET_TSS_ADDR, tss_addr), "KVM_SET_TSS_ADDR");
    check(ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity), "KVM_SET_IDENTITY_MAP_ADDR");
    check(ioctl(vm, KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {.flags = 0};
    check(ioctl(vm, KVM_CREATE_PIT2, &pit), "KVM_CREATE_PIT2");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE, .userspace_addr = (unsigned long)mem};
    check(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region), "KVM_SET_USER_MEMORY_REGION");
    int vcpu = check(ioctl(vm, KVM_CREATE_VCPU, 0), "KVM_CREATE_VCPU");
    int run_size = check(ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) {
        perror("mmap kvm_run");
        return 1;
    }
    struct kvm_sregs sregs;
    check(ioctl(vcpu, KVM_GET_SREGS, &sregs), "KVM_GET_SREGS");
    struct kvm_segment *segments[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.ss};
    for (int i = 0; i < 4; i++) {
        segments[i]->base = 0;
        segments[i]->selector = 0;
    }
    check(ioctl(vcpu, KVM_SET_SREGS, &sregs), "KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = code_gpa;
    regs.rflags = 0x2;
    regs.rsp = 0xF000;
    check(ioctl(vcpu, KVM_SET_REGS, &regs), "KVM_SET_REGS");

    double start = now();
    for (;;) {
        check(ioctl(vcpu, KVM_RUN, 0), "KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == done_port)
            break;
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset((char *)run + run->io.data_offset, 0, (size_t)run->io.size * run->io.count);
    }
    printf("%.9f\n", now() - start);
    return 0;
}
