"""ctypes mirror of <linux/kvm.h> and <asm/kvm.h> (x86_64): ioctl numbers, structures, constants.

Names are exactly the kernel's so that the headers and the KVM API documentation can be read alongside.
Layouts are verified against the system headers by tests/unit/test_kvm_bindings.py (a gcc-compiled probe).
"""

from __future__ import annotations

import ctypes
import functools
from enum import IntEnum, IntFlag

from pyvmm.cabi import with_flex_array
from pyvmm.ioctl import IO, IOR, IOW, IOWR

KVMIO = 0xAE
KVM_API_VERSION = 12

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32


# --- asm/kvm.h (x86) --------------------------------------------------------------------------------------

KVM_NR_INTERRUPTS = 256
KVM_APIC_REG_SIZE = 0x400


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *((name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; `kvm_msrs_array(n)` gives the type with n trailing entries."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; `kvm_msr_list_array(n)` gives the type with n trailing indices."""

    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; `kvm_cpuid2_array(n)` gives the type with n trailing entries."""

    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]  # `char` in the header; bytes are easier as u8


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel's spelling


# --- linux/kvm.h --------------------------------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class _kvm_irq_level_u(ctypes.Union):
    _fields_ = [("irq", u32), ("status", s32)]


class kvm_irq_level(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("u", _kvm_irq_level_u), ("level", u32)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class _kvm_coalesced_pio_u(ctypes.Union):
    _fields_ = [("pad", u32), ("pio", u32)]


class kvm_coalesced_mmio_zone(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("addr", u64), ("size", u32), ("u", _kvm_coalesced_pio_u)]


class kvm_coalesced_mmio(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("phys_addr", u64), ("len", u32), ("u", _kvm_coalesced_pio_u), ("data", u8 * 8)]


class kvm_coalesced_mmio_ring(ctypes.Structure):
    """The ring's header; `struct kvm_coalesced_mmio coalesced_mmio[]` follows it to the end of the page."""

    _fields_ = [("first", u32), ("last", u32)]


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class _kvm_irq_routing_msi_u(ctypes.Union):
    _fields_ = [("pad", u32), ("devid", u32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("u", _kvm_irq_routing_msi_u)]


class _kvm_irq_routing_entry_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _kvm_irq_routing_entry_u)]


class kvm_irq_routing(ctypes.Structure):
    """Header only; `kvm_irq_routing_array(n)` gives the type with n trailing entries."""

    _fields_ = [("nr", u32), ("flags", u32)]


class kvm_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


class kvm_create_device(ctypes.Structure):
    _fields_ = [("type", u32), ("fd", u32), ("flags", u32)]


class kvm_device_attr(ctypes.Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


# kvm_run and the members of its exit union that we use. The nested types have no kernel name (they are
# anonymous in the header); the underscore prefix marks them as such.


class _kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_system_event_u(ctypes.Union):
    _fields_ = [("flags", u64), ("data", u64 * 16)]


class _kvm_run_system_event(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", u32), ("ndata", u32), ("u", _kvm_run_system_event_u)]


class _kvm_run_eoi(ctypes.Structure):
    _fields_ = [("vector", u8)]


class _kvm_run_exit_u(ctypes.Union):
    _fields_ = [
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("mmio", _kvm_run_mmio),
        ("internal", _kvm_run_internal),
        ("system_event", _kvm_run_system_event),
        ("eoi", _kvm_run_eoi),
        ("padding", ctypes.c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", _kvm_run_exit_u),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES),
    ]


# Every structure above that exists under this name in the kernel headers (checked by the probe test).
KERNEL_STRUCTS: tuple[type[ctypes.Structure], ...] = (
    kvm_regs,
    kvm_segment,
    kvm_dtable,
    kvm_sregs,
    kvm_fpu,
    kvm_msr_entry,
    kvm_msrs,
    kvm_msr_list,
    kvm_cpuid_entry2,
    kvm_cpuid2,
    kvm_lapic_state,
    kvm_userspace_memory_region,
    kvm_irq_level,
    kvm_pit_config,
    kvm_irqfd,
    kvm_ioeventfd,
    kvm_coalesced_mmio_zone,
    kvm_coalesced_mmio,
    kvm_coalesced_mmio_ring,
    kvm_irq_routing_irqchip,
    kvm_irq_routing_msi,
    kvm_irq_routing_entry,
    kvm_irq_routing,
    kvm_msi,
    kvm_create_device,
    kvm_device_attr,
    kvm_mp_state,
    kvm_enable_cap,
    kvm_clock_data,
    kvm_run,
)


# --- flexible-array helpers ---------------------------------------------------------------------------------


@functools.cache
def kvm_msrs_array(n: int) -> type[ctypes.Structure]:
    """`struct kvm_msrs` followed by `n` kvm_msr_entry."""
    return with_flex_array(kvm_msrs, "entries", kvm_msr_entry, n)


@functools.cache
def kvm_msr_list_array(n: int) -> type[ctypes.Structure]:
    """`struct kvm_msr_list` followed by `n` u32 indices."""
    return with_flex_array(kvm_msr_list, "indices", u32, n)


@functools.cache
def kvm_cpuid2_array(n: int) -> type[ctypes.Structure]:
    """`struct kvm_cpuid2` followed by `n` kvm_cpuid_entry2."""
    return with_flex_array(kvm_cpuid2, "entries", kvm_cpuid_entry2, n)


@functools.cache
def kvm_irq_routing_array(n: int) -> type[ctypes.Structure]:
    """`struct kvm_irq_routing` followed by `n` kvm_irq_routing_entry."""
    return with_flex_array(kvm_irq_routing, "entries", kvm_irq_routing_entry, n)


# --- ioctl numbers ------------------------------------------------------------------------------------------


class KvmIoctl(IntEnum):
    # /dev/kvm
    KVM_GET_API_VERSION = IO(KVMIO, 0x00)
    KVM_CREATE_VM = IO(KVMIO, 0x01)
    KVM_GET_MSR_INDEX_LIST = IOWR(KVMIO, 0x02, kvm_msr_list)
    KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
    KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
    KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, kvm_cpuid2)
    # VM
    KVM_CREATE_VCPU = IO(KVMIO, 0x41)
    KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, kvm_userspace_memory_region)
    KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
    KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, u64)
    KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)
    KVM_IRQ_LINE = IOW(KVMIO, 0x61, kvm_irq_level)
    KVM_SET_GSI_ROUTING = IOW(KVMIO, 0x6A, kvm_irq_routing)
    KVM_IRQFD = IOW(KVMIO, 0x76, kvm_irqfd)
    KVM_CREATE_PIT2 = IOW(KVMIO, 0x77, kvm_pit_config)
    KVM_IOEVENTFD = IOW(KVMIO, 0x79, kvm_ioeventfd)
    KVM_REGISTER_COALESCED_MMIO = IOW(KVMIO, 0x67, kvm_coalesced_mmio_zone)
    KVM_UNREGISTER_COALESCED_MMIO = IOW(KVMIO, 0x68, kvm_coalesced_mmio_zone)
    KVM_SET_CLOCK = IOW(KVMIO, 0x7B, kvm_clock_data)
    KVM_GET_CLOCK = IOR(KVMIO, 0x7C, kvm_clock_data)
    KVM_SIGNAL_MSI = IOW(KVMIO, 0xA5, kvm_msi)
    KVM_CREATE_DEVICE = IOWR(KVMIO, 0xE0, kvm_create_device)
    # device fds
    KVM_SET_DEVICE_ATTR = IOW(KVMIO, 0xE1, kvm_device_attr)
    KVM_GET_DEVICE_ATTR = IOW(KVMIO, 0xE2, kvm_device_attr)
    KVM_HAS_DEVICE_ATTR = IOW(KVMIO, 0xE3, kvm_device_attr)
    # vCPU (KVM_ENABLE_CAP also on VMs with KVM_CAP_ENABLE_CAP_VM)
    KVM_RUN = IO(KVMIO, 0x80)
    KVM_GET_REGS = IOR(KVMIO, 0x81, kvm_regs)
    KVM_SET_REGS = IOW(KVMIO, 0x82, kvm_regs)
    KVM_GET_SREGS = IOR(KVMIO, 0x83, kvm_sregs)
    KVM_SET_SREGS = IOW(KVMIO, 0x84, kvm_sregs)
    KVM_GET_MSRS = IOWR(KVMIO, 0x88, kvm_msrs)
    KVM_SET_MSRS = IOW(KVMIO, 0x89, kvm_msrs)
    KVM_GET_FPU = IOR(KVMIO, 0x8C, kvm_fpu)
    KVM_SET_FPU = IOW(KVMIO, 0x8D, kvm_fpu)
    KVM_GET_LAPIC = IOR(KVMIO, 0x8E, kvm_lapic_state)
    KVM_SET_LAPIC = IOW(KVMIO, 0x8F, kvm_lapic_state)
    KVM_SET_CPUID2 = IOW(KVMIO, 0x90, kvm_cpuid2)
    KVM_GET_CPUID2 = IOWR(KVMIO, 0x91, kvm_cpuid2)
    KVM_GET_MP_STATE = IOR(KVMIO, 0x98, kvm_mp_state)
    KVM_SET_MP_STATE = IOW(KVMIO, 0x99, kvm_mp_state)
    KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, kvm_enable_cap)


# --- constants ----------------------------------------------------------------------------------------------


class KvmExit(IntEnum):
    KVM_EXIT_UNKNOWN = 0
    KVM_EXIT_EXCEPTION = 1
    KVM_EXIT_IO = 2
    KVM_EXIT_HYPERCALL = 3
    KVM_EXIT_DEBUG = 4
    KVM_EXIT_HLT = 5
    KVM_EXIT_MMIO = 6
    KVM_EXIT_IRQ_WINDOW_OPEN = 7
    KVM_EXIT_SHUTDOWN = 8
    KVM_EXIT_FAIL_ENTRY = 9
    KVM_EXIT_INTR = 10
    KVM_EXIT_SET_TPR = 11
    KVM_EXIT_TPR_ACCESS = 12
    KVM_EXIT_NMI = 16
    KVM_EXIT_INTERNAL_ERROR = 17
    KVM_EXIT_WATCHDOG = 21
    KVM_EXIT_SYSTEM_EVENT = 24
    KVM_EXIT_IOAPIC_EOI = 26
    KVM_EXIT_HYPERV = 27
    KVM_EXIT_X86_RDMSR = 29
    KVM_EXIT_X86_WRMSR = 30
    KVM_EXIT_DIRTY_RING_FULL = 31
    KVM_EXIT_AP_RESET_HOLD = 32
    KVM_EXIT_X86_BUS_LOCK = 33
    KVM_EXIT_XEN = 34
    KVM_EXIT_NOTIFY = 37


class KvmExitIo(IntEnum):
    KVM_EXIT_IO_IN = 0
    KVM_EXIT_IO_OUT = 1


class KvmInternalError(IntEnum):
    KVM_INTERNAL_ERROR_EMULATION = 1
    KVM_INTERNAL_ERROR_SIMUL_EX = 2
    KVM_INTERNAL_ERROR_DELIVERY_EV = 3
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4


class KvmSystemEvent(IntEnum):
    KVM_SYSTEM_EVENT_SHUTDOWN = 1
    KVM_SYSTEM_EVENT_RESET = 2
    KVM_SYSTEM_EVENT_CRASH = 3
    KVM_SYSTEM_EVENT_WAKEUP = 4
    KVM_SYSTEM_EVENT_SUSPEND = 5
    KVM_SYSTEM_EVENT_SEV_TERM = 6


class KvmMpState(IntEnum):
    KVM_MP_STATE_RUNNABLE = 0
    KVM_MP_STATE_UNINITIALIZED = 1
    KVM_MP_STATE_INIT_RECEIVED = 2
    KVM_MP_STATE_HALTED = 3
    KVM_MP_STATE_SIPI_RECEIVED = 4
    KVM_MP_STATE_STOPPED = 5
    KVM_MP_STATE_CHECK_STOP = 6
    KVM_MP_STATE_OPERATING = 7
    KVM_MP_STATE_LOAD = 8
    KVM_MP_STATE_AP_RESET_HOLD = 9
    KVM_MP_STATE_SUSPENDED = 10


class KvmCap(IntEnum):
    """The x86-relevant subset of KVM_CAP_*."""

    KVM_CAP_IRQCHIP = 0
    KVM_CAP_HLT = 1
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_PIT = 11
    KVM_CAP_MP_STATE = 14
    KVM_CAP_COALESCED_MMIO = 15
    KVM_CAP_SYNC_MMU = 16
    KVM_CAP_USER_NMI = 22
    KVM_CAP_SET_GUEST_DEBUG = 23
    KVM_CAP_IRQ_ROUTING = 25
    KVM_CAP_IRQ_INJECT_STATUS = 26
    KVM_CAP_MCE = 31
    KVM_CAP_IRQFD = 32
    KVM_CAP_PIT2 = 33
    KVM_CAP_PIT_STATE2 = 35
    KVM_CAP_IOEVENTFD = 36
    KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
    KVM_CAP_ADJUST_CLOCK = 39
    KVM_CAP_INTERNAL_ERROR_DATA = 40
    KVM_CAP_VCPU_EVENTS = 41
    KVM_CAP_DEBUGREGS = 50
    KVM_CAP_ENABLE_CAP = 54
    KVM_CAP_XSAVE = 55
    KVM_CAP_XCRS = 56
    KVM_CAP_TSC_CONTROL = 60
    KVM_CAP_GET_TSC_KHZ = 61
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_ONE_REG = 70
    KVM_CAP_TSC_DEADLINE_TIMER = 72
    KVM_CAP_SIGNAL_MSI = 77
    KVM_CAP_READONLY_MEM = 81
    KVM_CAP_IRQFD_RESAMPLE = 82
    KVM_CAP_DEVICE_CTRL = 89
    KVM_CAP_EXT_EMUL_CPUID = 95
    KVM_CAP_ENABLE_CAP_VM = 98
    KVM_CAP_IOEVENTFD_NO_LENGTH = 100
    KVM_CAP_CHECK_EXTENSION_VM = 105
    KVM_CAP_X86_SMM = 117
    KVM_CAP_SPLIT_IRQCHIP = 121
    KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
    KVM_CAP_MAX_VCPU_ID = 128
    KVM_CAP_X2APIC_API = 129
    KVM_CAP_MSI_DEVID = 131
    KVM_CAP_IMMEDIATE_EXIT = 136
    KVM_CAP_X86_DISABLE_EXITS = 143
    KVM_CAP_GET_MSR_FEATURES = 153
    KVM_CAP_NESTED_STATE = 157
    KVM_CAP_COALESCED_PIO = 162
    KVM_CAP_X86_USER_SPACE_MSR = 188
    KVM_CAP_X86_MSR_FILTER = 189
    KVM_CAP_SREGS2 = 200
    KVM_CAP_XSAVE2 = 208
    KVM_CAP_SYSTEM_EVENT_DATA = 215
    KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218


class KvmMemFlag(IntFlag):
    KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
    KVM_MEM_READONLY = 1 << 1


class KvmIrqfdFlag(IntFlag):
    KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
    KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class KvmIoeventfdFlag(IntFlag):
    KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
    KVM_IOEVENTFD_FLAG_PIO = 1 << 1
    KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class KvmIrqRouting(IntEnum):
    KVM_IRQ_ROUTING_IRQCHIP = 1
    KVM_IRQ_ROUTING_MSI = 2


class KvmIrqchip(IntEnum):
    KVM_IRQCHIP_PIC_MASTER = 0
    KVM_IRQCHIP_PIC_SLAVE = 1
    KVM_IRQCHIP_IOAPIC = 2


class KvmDevType(IntEnum):
    KVM_DEV_TYPE_VFIO = 4


# The KVM VFIO device's attribute group and attributes. Kernels >= 6.6 name them KVM_DEV_VFIO_FILE*; older
# headers call the same values KVM_DEV_VFIO_GROUP*. Plain constants: an IntEnum would merge equal values.
KVM_DEV_VFIO_FILE = 1
KVM_DEV_VFIO_FILE_ADD = 1
KVM_DEV_VFIO_FILE_DEL = 2
KVM_DEV_VFIO_GROUP = 1
KVM_DEV_VFIO_GROUP_ADD = 1
KVM_DEV_VFIO_GROUP_DEL = 2

KVM_PIT_SPEAKER_DUMMY = 1
KVM_MSI_VALID_DEVID = 1 << 0
KVM_CREATE_DEVICE_TEST = 1
