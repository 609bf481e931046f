"""Initial CPU state for the 64-bit Linux boot protocol, as plain data for the KVM layer to apply.

Who gets what:

* Every vCPU: its own CPUID (see pyvmm.boot.cpuid) and `boot_msrs()`.
* Only the boot vCPU (`BOOT_VCPU_ID`, which KVM treats as the BSP): `setup_boot_vcpu()`'s registers,
  special registers and FPU state, entering a bzImage directly in long mode, or `setup_pvh_boot_vcpu()`'s,
  entering an ELF vmlinux at its PVH entry in 32-bit protected mode without paging (docs/boot.md).
* Application processors get no register setup: they stay in KVM's reset state, waiting in the in-kernel
  LAPIC for the INIT/SIPI sequence the guest kernel sends when it brings them up.

The dataclass field names are those of `struct kvm_regs`, `kvm_sregs`, `kvm_segment` and `kvm_fpu`, so the
KVM layer can copy them over by name. `SpecialRegisters` leaves out `apic_base` and `interrupt_bitmap`: keep
the values KVM_GET_SREGS returned for those.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from pyvmm import layout
from pyvmm.boot.gdt import DESCRIPTOR_SIZE, Segment, SegmentType, decode_descriptor, encode_descriptor
from pyvmm.boot.paging import IDENTITY_MAP_SIZE, write_identity_map
from pyvmm.memory import GuestMemory

BOOT_VCPU_ID = 0

# Selectors the 64-bit boot protocol requires: __BOOT_CS and __BOOT_DS (GDT entries 2 and 3).
BOOT_CS_SELECTOR = 0x10
BOOT_DS_SELECTOR = 0x18
GDT_ENTRIES = 4  # null, unused, __BOOT_CS, __BOOT_DS
IDT_SIZE = 16  # one (not present) 64-bit gate: any exception before Linux sets its IDT shuts down


class Cr0(IntFlag):
    PE = 1 << 0
    MP = 1 << 1
    EM = 1 << 2
    TS = 1 << 3
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16
    AM = 1 << 18
    NW = 1 << 29
    CD = 1 << 30
    PG = 1 << 31


class Cr4(IntFlag):
    VME = 1 << 0
    PSE = 1 << 4
    PAE = 1 << 5
    PGE = 1 << 7
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    LA57 = 1 << 12


class Efer(IntFlag):
    SCE = 1 << 0
    LME = 1 << 8
    LMA = 1 << 10
    NXE = 1 << 11


class Msr(IntEnum):
    IA32_TSC = 0x10
    IA32_SYSENTER_CS = 0x174
    IA32_SYSENTER_ESP = 0x175
    IA32_SYSENTER_EIP = 0x176
    IA32_MISC_ENABLE = 0x1A0
    MTRR_DEF_TYPE = 0x2FF
    STAR = 0xC000_0081
    LSTAR = 0xC000_0082
    CSTAR = 0xC000_0083
    SYSCALL_MASK = 0xC000_0084
    KERNEL_GS_BASE = 0xC000_0102


MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRITE_BACK = 6

# CD/NW clear so caches are on from the first instruction; ET and NE as on any post-486 CPU.
BOOT_CR0 = Cr0.PE | Cr0.ET | Cr0.NE | Cr0.PG
BOOT_CR4 = Cr4.PAE
BOOT_EFER = Efer.LME | Efer.LMA
BOOT_RFLAGS = 0x2  # bit 1 is reserved and always set; IF clear as the boot protocol requires

FPU_FCW = 0x37F  # all x87 exceptions masked, 64-bit precision, round to nearest
FPU_MXCSR = 0x1F80  # all SSE exceptions masked, round to nearest


@dataclass(frozen=True)
class DescriptorTable:
    base: int
    limit: int


@dataclass(frozen=True)
class SpecialRegisters:
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int


@dataclass(frozen=True)
class GeneralRegisters:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = BOOT_RFLAGS


@dataclass(frozen=True)
class FpuState:
    """The kvm_fpu fields to set; the x87/XMM registers themselves start zeroed."""

    fcw: int = FPU_FCW
    mxcsr: int = FPU_MXCSR
    fsw: int = 0
    ftwx: int = 0  # abridged tag word: all registers empty


@dataclass(frozen=True)
class BootVcpuState:
    regs: GeneralRegisters
    sregs: SpecialRegisters
    fpu: FpuState = field(default_factory=FpuState)


_FLAT_4G = 0xFFFF_FFFF

CODE_SEGMENT = Segment(
    base=0, limit=_FLAT_4G, selector=BOOT_CS_SELECTOR, type=SegmentType.CODE_EXEC_READ_ACCESSED,
    present=True, dpl=0, db=False, s=True, l=True, g=True, avl=False,
)  # fmt: skip
DATA_SEGMENT = Segment(
    base=0, limit=_FLAT_4G, selector=BOOT_DS_SELECTOR, type=SegmentType.DATA_READ_WRITE_ACCESSED,
    present=True, dpl=0, db=True, s=True, l=False, g=True, avl=False,
)  # fmt: skip
# VMX and SVM refuse to enter a long-mode guest without a usable busy 64-bit TSS in TR. The 32-byte GDT
# slot layout.py leaves (IDT at 0x520) has no room for a 16-byte TSS descriptor, and nothing reloads TR
# from the GDT before Linux installs its own, so TR only gets hidden state, like KVM's reset value.
TSS_SEGMENT = Segment(
    base=0, limit=0x67, selector=0, type=SegmentType.SYSTEM_TSS_BUSY,
    present=True, dpl=0, db=False, s=False, l=False, g=False, avl=False,
)  # fmt: skip
LDT_SEGMENT = Segment(
    base=0, limit=0xFFFF, selector=0, type=SegmentType.SYSTEM_LDT,
    present=True, dpl=0, db=False, s=False, l=False, g=False, avl=False,
)  # fmt: skip


def gdt_bytes() -> bytes:
    """The boot GDT: null, unused, __BOOT_CS (64-bit flat code), __BOOT_DS (flat data)."""
    table = [0] * GDT_ENTRIES
    table[BOOT_CS_SELECTOR // DESCRIPTOR_SIZE] = encode_descriptor(CODE_SEGMENT)
    table[BOOT_DS_SELECTOR // DESCRIPTOR_SIZE] = encode_descriptor(DATA_SEGMENT)
    return struct.pack(f"<{GDT_ENTRIES}Q", *table)


def read_gdt_segment(memory: GuestMemory, gdt: DescriptorTable, selector: int) -> Segment:
    """Load a segment from the guest's GDT as the CPU would (for checks and debugging)."""
    offset = selector & ~0x7
    if offset + DESCRIPTOR_SIZE - 1 > gdt.limit:
        raise ValueError(f"selector {selector:#x} is beyond the GDT limit {gdt.limit:#x}")
    return decode_descriptor(memory.read_u64(gdt.base + offset), selector)


def write_boot_tables(memory: GuestMemory) -> tuple[DescriptorTable, DescriptorTable, int]:
    """Write the GDT, the IDT and the identity-map page tables; returns (gdt, idt, cr3)."""
    gdt = gdt_bytes()
    if layout.BOOT_GDT_START + len(gdt) > layout.BOOT_IDT_START:
        raise ValueError("boot GDT overlaps the boot IDT")
    memory.write(layout.BOOT_GDT_START, gdt)
    memory.write(layout.BOOT_IDT_START, bytes(IDT_SIZE))
    cr3 = write_identity_map(memory)
    return (
        DescriptorTable(layout.BOOT_GDT_START, len(gdt) - 1),
        DescriptorTable(layout.BOOT_IDT_START, IDT_SIZE - 1),
        cr3,
    )


def boot_special_registers(gdt: DescriptorTable, idt: DescriptorTable, cr3: int) -> SpecialRegisters:
    return SpecialRegisters(
        cs=CODE_SEGMENT,
        ds=DATA_SEGMENT,
        es=DATA_SEGMENT,
        fs=DATA_SEGMENT,
        gs=DATA_SEGMENT,
        ss=DATA_SEGMENT,
        tr=TSS_SEGMENT,
        ldt=LDT_SEGMENT,
        gdt=gdt,
        idt=idt,
        cr0=int(BOOT_CR0),
        cr2=0,
        cr3=cr3,
        cr4=int(BOOT_CR4),
        cr8=0,
        efer=int(BOOT_EFER),
    )


def boot_general_registers(entry_point: int, zero_page: int) -> GeneralRegisters:
    return GeneralRegisters(
        rip=entry_point,
        rsi=zero_page,
        rsp=layout.BOOT_STACK_POINTER,
        rbp=layout.BOOT_STACK_POINTER,
    )


def setup_boot_vcpu(memory: GuestMemory, entry_point: int, zero_page: int) -> BootVcpuState:
    """Write the boot GDT/IDT/page tables and return the boot vCPU's long-mode entry state.

    For `BOOT_VCPU_ID` only; `entry_point` and `zero_page` come from load_linux's BootInfo.
    """
    if not (0 <= entry_point < IDENTITY_MAP_SIZE and 0 <= zero_page < IDENTITY_MAP_SIZE):
        raise ValueError("entry point and zero page must lie in the identity-mapped first 4 GiB")
    gdt, idt, cr3 = write_boot_tables(memory)
    return BootVcpuState(
        regs=boot_general_registers(entry_point, zero_page),
        sregs=boot_special_registers(gdt, idt, cr3),
    )


# PVH entry (docs/boot.md#pvh-entry): flat 4 GiB 32-bit segments, paging off, %ebx = hvm_start_info.
PVH_CR0 = Cr0.PE | Cr0.ET
PVH_CODE_SEGMENT = Segment(
    base=0, limit=_FLAT_4G, selector=BOOT_CS_SELECTOR, type=SegmentType.CODE_EXEC_READ_ACCESSED,
    present=True, dpl=0, db=True, s=True, l=False, g=True, avl=False,
)  # fmt: skip
# Type 0xB outside long mode is a busy 32-bit TSS, which the PVH ABI asks for in TR (base 0, limit 0x67).
PVH_TSS_SEGMENT = TSS_SEGMENT


def pvh_gdt_bytes() -> bytes:
    """The PVH GDT: null, unused, 32-bit flat code, flat data (the selectors of the 64-bit boot GDT)."""
    table = [0] * GDT_ENTRIES
    table[BOOT_CS_SELECTOR // DESCRIPTOR_SIZE] = encode_descriptor(PVH_CODE_SEGMENT)
    table[BOOT_DS_SELECTOR // DESCRIPTOR_SIZE] = encode_descriptor(DATA_SEGMENT)
    return struct.pack(f"<{GDT_ENTRIES}Q", *table)


def setup_pvh_boot_vcpu(memory: GuestMemory, entry_point: int, start_info: int) -> BootVcpuState:
    """Write the PVH GDT/IDT and return the boot vCPU's 32-bit PVH entry state (`BOOT_VCPU_ID` only)."""
    if not (0 <= entry_point < 1 << 32 and 0 <= start_info < 1 << 32):
        raise ValueError("the PVH entry point and start info must be 32-bit addresses")
    gdt = pvh_gdt_bytes()
    memory.write(layout.BOOT_GDT_START, gdt)
    memory.write(layout.BOOT_IDT_START, bytes(IDT_SIZE))
    sregs = SpecialRegisters(
        cs=PVH_CODE_SEGMENT, ds=DATA_SEGMENT, es=DATA_SEGMENT, fs=DATA_SEGMENT, gs=DATA_SEGMENT,
        ss=DATA_SEGMENT, tr=PVH_TSS_SEGMENT, ldt=LDT_SEGMENT,
        gdt=DescriptorTable(layout.BOOT_GDT_START, len(gdt) - 1),
        idt=DescriptorTable(layout.BOOT_IDT_START, IDT_SIZE - 1),
        cr0=int(PVH_CR0), cr2=0, cr3=0, cr4=0, cr8=0, efer=0,
    )  # fmt: skip
    regs = GeneralRegisters(rip=entry_point, rbx=start_info, rsp=layout.BOOT_STACK_POINTER)
    return BootVcpuState(regs=regs, sregs=sregs)


def boot_msrs() -> list[tuple[int, int]]:
    """(index, value) MSRs for every vCPU, boot vCPU and application processors alike."""
    return [
        (Msr.IA32_SYSENTER_CS, 0),
        (Msr.IA32_SYSENTER_ESP, 0),
        (Msr.IA32_SYSENTER_EIP, 0),
        (Msr.STAR, 0),
        (Msr.CSTAR, 0),
        (Msr.KERNEL_GS_BASE, 0),
        (Msr.SYSCALL_MASK, 0),
        (Msr.LSTAR, 0),
        (Msr.IA32_TSC, 0),
        (Msr.IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        # With a VFIO device KVM honours guest MTRRs (non-coherent DMA), and MTRRs left disabled make
        # all of RAM uncacheable: default to write-back until the guest programs its own.
        (Msr.MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
