"""The host layer's view of sysfs: PCI functions read through pyvmm.pci_sysfs (the one module that reads
/sys/bus/pci), with user-facing errors, and the one function that writes to sysfs (binding, restoring)."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pyvmm import pci_sysfs
from pyvmm.pci_sysfs import VFIO_DRIVER, PciFunction

from .bdf import Bdf, parse_bdf
from .errors import HostError, HostUsageError

__all__ = ["VFIO_DRIVER", "PciFunction"]

SETTLE_SECONDS = 5.0  # how long a driver link or /dev/vfio node may take to appear


def device_dir(bdf: Bdf) -> Path:
    return pci_sysfs.SYSFS.device_dir(bdf)


def driver_dir(driver: str) -> Path:
    return pci_sysfs.SYSFS.driver_dir(driver)


def drivers_probe() -> str:
    return str(pci_sysfs.SYSFS.drivers_probe)


def read_function(bdf: Bdf) -> PciFunction:
    """The function's current state; HostUsageError when no such device exists."""
    function = pci_sysfs.SYSFS.function(bdf)
    if function is None:
        raise HostUsageError(f"{bdf}: no such PCI device (see `pyvmm-host list`)")
    return function


def scan() -> list[PciFunction]:
    """Every PCI function, in address order."""
    return pci_sysfs.SYSFS.functions()


def iommu_present() -> bool:
    return bool(pci_sysfs.SYSFS.group_numbers())


def resolve(spelling: str | Bdf) -> Bdf:
    """A DEVICE argument as the user wrote it, checked to exist."""
    bdf = spelling if isinstance(spelling, Bdf) else parse_bdf(spelling)
    if not pci_sysfs.SYSFS.exists(bdf):
        raise HostUsageError(f"{spelling}: no such PCI device (see `pyvmm-host list`)")
    return bdf


def device_attr(bdf: Bdf, attr: str) -> str:
    return str(device_dir(bdf) / attr)


def driver_attr(driver: str, attr: str) -> str:
    return str(driver_dir(driver) / attr)


def resolve_all(devices: Iterable[str | Bdf]) -> list[Bdf]:
    """Resolve each spelling, dropping repeats, in the order given."""
    bdfs: list[Bdf] = []
    for d in devices:
        bdf = resolve(d)
        if bdf not in bdfs:
            bdfs.append(bdf)
    return bdfs


def settle(check: Callable[[], bool], seconds: float = SETTLE_SECONDS) -> bool:
    """Poll `check` until it holds or `seconds` pass: driver links and /dev/vfio nodes lag a little."""
    deadline = time.monotonic() + seconds
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def write_attr(path: str, value: str) -> None:
    """One write(2) of `value` to a sysfs attribute; the kernel's errno becomes a HostError by the caller."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def describe_errno(err: OSError) -> str:
    """A short reason for a failed sysfs write, with the fix when the cause is common."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{reason} (run as root)"
    return reason


def sysfs_error(what: str, path: str, value: str, err: OSError) -> HostError:
    return HostError(f"{what}: writing {value.strip()!r} to {path} failed: {describe_errno(err)}")
