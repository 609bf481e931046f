"""Host-wide facts a passthrough depends on: IOMMU, VFIO modules, interrupt remapping, memory locking."""

from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path

from pyvmm.irq_remapping import interrupt_remapping, unsafe_interrupts_allowed

from . import modules
from .errors import HostUsageError
from .modules import ModuleState
from .sysfs import iommu_present

_CAP_IPC_LOCK = 14


@dataclass(frozen=True)
class HostFacts:
    iommu: bool  # any IOMMU group exists
    vfio_pci: ModuleState
    vfio_iommu_type1: ModuleState
    interrupt_remapping: bool
    unsafe_interrupts_allowed: bool
    memlock_limit: int | None  # soft RLIMIT_MEMLOCK in bytes; None when unlimited
    can_lock_memory: bool  # CAP_IPC_LOCK: VFIO then ignores the limit


def can_lock_memory() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def memlock_limit() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


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
