"""Host-wide facts a passthrough depends on: IOMMU, VFIO modules, interrupt remapping, memory locking."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyvmm.irq_remapping import interrupt_remapping, unsafe_interrupts_allowed
from pyvmm.memlock import can_lock_memory, memlock_limit

from . import modules
from .errors import HostUsageError
from .modules import ModuleState
from .sysfs import iommu_present


@dataclass(frozen=True)
class HostFacts:
    iommu: bool  # any IOMMU group exists
    vfio_pci: ModuleState
    vfio_iommu_type1: ModuleState
    interrupt_remapping: bool
    unsafe_interrupts_allowed: bool
    memlock_limit: int | None  # soft RLIMIT_MEMLOCK in bytes; None when unlimited
    can_lock_memory: bool  # CAP_IPC_LOCK: VFIO then ignores the limit


def gather() -> HostFacts:
    return HostFacts(
        iommu=iommu_present(),
        vfio_pci=modules.module_state(modules.VFIO_PCI),
        vfio_iommu_type1=modules.module_state(modules.VFIO_IOMMU_TYPE1),
        interrupt_remapping=interrupt_remapping(),
        unsafe_interrupts_allowed=unsafe_interrupts_allowed(),
        memlock_limit=memlock_limit(),
        can_lock_memory=can_lock_memory(),
    )


_SIZE = re.compile(r"^(\d+)([KMGT]?)$")
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A guest memory size as cloud-hypervisor spells it: `512M`, `2G`, bytes, or `size=512M`."""
    spelled = text.strip()
    if spelled.startswith("size="):
        spelled = spelled[5:]
    match = _SIZE.match(spelled)
    if match is None or int(match[1]) == 0:
        raise HostUsageError(
            f"--memory {text!r}: write a size such as 512M or 2G (binary K, M, G, T suffixes)"
        )
    return int(match[1]) * _SUFFIX[match[2]]


def format_size(n: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n // (1 << 20)}M" if n >= 1 << 20 else f"{n}B"
