"""Linux direct kernel boot: a bzImage (x86-64 64-bit boot protocol) or an ELF vmlinux (PVH entry), boot
vCPU state, CPUID.

Everything here is plain data written into GuestMemory or returned as dataclasses; the KVM layer turns it
into kvm_regs / kvm_sregs / kvm_fpu / MSR and CPUID ioctls. Typical use by the VM builder:

    kernel = load_kernel(memory, path, cmdline, initramfs, layout.e820_entries(ram), rsdp_addr)
    state = boot_vcpu_state(memory, kernel)                                      # vCPU 0 only
    for vcpu_id in range(max_vcpus):                                             # every vCPU
        cpuid = adjust_cpuid(supported, vcpu_id, max_vcpus, phys_bits)
        msrs = boot_msrs()
"""

from pyvmm.boot.bootparams import LoadFlags, XLoadFlags
from pyvmm.boot.bzimage import (
    BootInfo,
    BzImage,
    KernelImageError,
    SetupHeader,
    load_linux,
    parse_bzimage,
    parse_setup_header,
)
from pyvmm.boot.cpu import (
    BOOT_CS_SELECTOR,
    BOOT_DS_SELECTOR,
    BOOT_VCPU_ID,
    BootVcpuState,
    DescriptorTable,
    FpuState,
    GeneralRegisters,
    Msr,
    SpecialRegisters,
    boot_msrs,
    setup_boot_vcpu,
    setup_pvh_boot_vcpu,
)
from pyvmm.boot.cpuid import (
    CpuidEntry,
    CpuidError,
    CpuidFlag,
    CpuTopology,
    adjust_cpuid,
    guest_phys_bits,
    host_phys_bits,
)
from pyvmm.boot.elf import ElfKernel, LoadSegment, parse_elf_kernel
from pyvmm.boot.gdt import Segment
from pyvmm.boot.kernel import KernelFormat, LoadedKernel, boot_vcpu_state, check_kernel, load_kernel
from pyvmm.boot.pvh import PvhBootInfo, load_pvh
from pyvmm.boot.zeropage import E820Entry, ZeroPageError

__all__ = [
    "BOOT_CS_SELECTOR",
    "BOOT_DS_SELECTOR",
    "BOOT_VCPU_ID",
    "BootInfo",
    "BootVcpuState",
    "BzImage",
    "CpuTopology",
    "CpuidEntry",
    "CpuidError",
    "CpuidFlag",
    "DescriptorTable",
    "E820Entry",
    "ElfKernel",
    "FpuState",
    "GeneralRegisters",
    "KernelFormat",
    "KernelImageError",
    "LoadFlags",
    "LoadSegment",
    "LoadedKernel",
    "Msr",
    "PvhBootInfo",
    "Segment",
    "SetupHeader",
    "SpecialRegisters",
    "XLoadFlags",
    "ZeroPageError",
    "adjust_cpuid",
    "boot_msrs",
    "boot_vcpu_state",
    "check_kernel",
    "guest_phys_bits",
    "host_phys_bits",
    "load_kernel",
    "load_linux",
    "load_pvh",
    "parse_bzimage",
    "parse_elf_kernel",
    "parse_setup_header",
    "setup_boot_vcpu",
    "setup_pvh_boot_vcpu",
]
