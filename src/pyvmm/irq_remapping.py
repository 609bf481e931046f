"""Whether this host isolates a passed-through device's interrupts: interrupt remapping, and
vfio_iommu_type1's `allow_unsafe_interrupts` override (VFIO takes devices without remapping only while it
is on).

Imports nothing from pyvmm but its errors, so `pyvmm --device` (vmm.py) and a hot-plug (hotplug.py) ask it
without loading the host layer, and `pyvmm-host` (host/hostfacts.py) reads the same facts through it. It
reads /proc and /sys/kernel/irq and /sys/module, never the PCI part of sysfs (that is pci_sysfs.py's).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from pyvmm.errors import UsageError

PROC_INTERRUPTS = Path("/proc/interrupts")
SYS_IRQ = Path("/sys/kernel/irq")
UNSAFE_INTERRUPTS_PARAM = Path("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts")


def interrupt_remapping() -> bool:
    """Remapped interrupts show chip names such as IR-PCI-MSI or IR-IO-APIC (Intel and AMD alike)."""
    text = ""
    with contextlib.suppress(OSError):
        text = PROC_INTERRUPTS.read_text()
    if re.search(r"\bIR-|\b(?:INTEL|AMD)-IR\b", text):
        return True
    try:
        for irq in SYS_IRQ.iterdir():
            chip = (irq / "chip_name").read_text()
            if chip.startswith("IR-") or "-IR" in chip:
                return True
    except OSError:
        pass
    return False


def unsafe_interrupts_allowed() -> bool:
    """vfio_iommu_type1's allow_unsafe_interrupts is on (Y or 1); off when the module is not loaded."""
    try:
        value = UNSAFE_INTERRUPTS_PARAM.read_text().strip()
    except OSError:
        return False
    return value.upper() in ("Y", "1")


UNSAFE_INTERRUPTS_OPT_IN = "--platform allow_unsafe_interrupts=on"


def check_interrupt_isolation(allowed: bool) -> None:
    """Devices on a host without interrupt remapping can inject interrupts into the host: refuse unless the
    user opted in by name. VFIO itself only asks for vfio_iommu_type1's allow_unsafe_interrupts, which
    someone may have set for another purpose (or another VM): that alone is not this user's consent."""
    if allowed or interrupt_remapping():
        return
    if unsafe_interrupts_allowed():
        why = "vfio_iommu_type1 allow_unsafe_interrupts is on (set outside pyvmm), but pyvmm still refuses"
    else:
        why = "VFIO refuses the devices"
    raise UsageError(
        f"--device: no interrupt remapping on this host: {why}, as a guest could make its device inject "
        f"interrupts into the host; enable it (VT-d/AMD-Vi, intremap=on) or accept the risk with "
        f"{UNSAFE_INTERRUPTS_OPT_IN}"
    )
