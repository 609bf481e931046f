"""Resetting a passed-through function before the guest sees it (docs/vfio.md#reset-and-teardown).

A function reset (VFIO_DEVICE_RESET: FLR, PM reset, or a bus reset when the function is alone on its bus)
when vfio-pci offers one (VFIO_DEVICE_FLAGS_RESET); otherwise a bus (hot) reset when every IOMMU group it
would also reset is open in this VM; then the function must still answer config reads. What to do with a
function that could not be reset is the caller's policy (VfioPassthrough.reset).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from pyvmm.ioctl import IoctlError, ioctl
from pyvmm.pci_sysfs import Bdf
from pyvmm.vfio.bindings import (
    VfioDeviceFlag,
    VfioIoctl,
    VfioPciIoctl,
    vfio_pci_hot_reset_group_fds,
    vfio_pci_hot_reset_info,
    vfio_pci_hot_reset_info_devices,
)

# Functions a bus reset may touch: a bus has at most 32 devices of 8 functions; more is a kernel answer we
# do not believe.
MAX_DEPENDENT = 256


class ResetKind(Enum):
    FUNCTION = "function reset"
    BUS = "bus reset"


@dataclass(frozen=True)
class Dependent:
    """One function a bus reset of the device would also reset, and its IOMMU group."""

    group: int
    address: Bdf


@dataclass(frozen=True)
class ResetResult:
    kind: ResetKind | None  # None: not reset
    tried: tuple[str, ...] = ()  # what was tried and why it did not do (for the message)
    also_reset: frozenset[Bdf] = field(default_factory=frozenset)  # by a bus reset

    @property
    def done(self) -> bool:
        return self.kind is not None


def hot_reset_dependents(fd: int) -> list[Dependent]:
    """VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: every function a bus reset would reset. Raises IoctlError (ENODEV:
    no bus reset for this function, e.g. it sits on a root bus)."""
    info = vfio_pci_hot_reset_info(argsz=ctypes.sizeof(vfio_pci_hot_reset_info))
    try:
        ioctl(fd, VfioPciIoctl.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info)
        count = info.count
    except IoctlError as e:
        if e.errno != errno.ENOSPC:  # ENOSPC: the kernel filled in `count` for the second call
            raise
        count = info.count
    if count > MAX_DEPENDENT:
        raise IoctlError(errno.E2BIG, f"VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: {count} dependent functions")
    cls = vfio_pci_hot_reset_info_devices(count)
    full = cls(argsz=ctypes.sizeof(cls))
    if count:
        ioctl(fd, VfioPciIoctl.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, full)
    return [
        Dependent(d.group_id, Bdf(d.segment, d.bus, d.devfn >> 3, d.devfn & 7))
        for d in full.devices[: min(count, full.count)]
    ]


def hot_reset(fd: int, group_fds: list[int]) -> None:
    """VFIO_DEVICE_PCI_HOT_RESET with the fds of every affected group. Raises IoctlError."""
    cls = vfio_pci_hot_reset_group_fds(len(group_fds))
    request = cls(argsz=ctypes.sizeof(cls), count=len(group_fds))
    for i, group_fd in enumerate(group_fds):
        request.group_fds[i] = group_fd
    ioctl(fd, VfioPciIoctl.VFIO_DEVICE_PCI_HOT_RESET, request)


def reset_function(fd: int, flags: VfioDeviceFlag, groups: Mapping[int, int]) -> ResetResult:
    """Reset the device `fd` (its VFIO_DEVICE_GET_INFO `flags`): a function reset if offered, else a bus
    reset if every affected group is in `groups` (IOMMU group id -> open group fd of this VM)."""
    tried: list[str] = []
    if flags & VfioDeviceFlag.VFIO_DEVICE_FLAGS_RESET:
        try:
            ioctl(fd, VfioIoctl.VFIO_DEVICE_RESET)
        except IoctlError as e:
            tried.append(f"function reset failed: {os.strerror(e.errno or 0)}")
        else:
            return ResetResult(ResetKind.FUNCTION)
    else:
        tried.append("no function reset")
    try:
        dependents = hot_reset_dependents(fd)
    except IoctlError as e:
        tried.append(f"no bus reset: {os.strerror(e.errno or 0)}")
        return ResetResult(None, tuple(tried))
    if not dependents:
        tried.append("no bus reset: vfio-pci lists no functions for it")
        return ResetResult(None, tuple(tried))
    foreign = sorted({d.group for d in dependents if d.group not in groups})
    if foreign:
        names = ", ".join(str(g) for g in foreign)
        tried.append(f"a bus reset would also reset IOMMU group{'s' if len(foreign) > 1 else ''} {names}, "
                     "not given to this guest")
        return ResetResult(None, tuple(tried))
    try:
        hot_reset(fd, [groups[g] for g in sorted({d.group for d in dependents})])
    except IoctlError as e:
        tried.append(f"bus reset failed: {os.strerror(e.errno or 0)}")
        return ResetResult(None, tuple(tried))
    return ResetResult(ResetKind.BUS, tuple(tried), frozenset(d.address for d in dependents))
