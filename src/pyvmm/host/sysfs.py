"""Reading PCI functions from sysfs, and the one function that writes to it."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .bdf import Bdf, parse_bdf
from .errors import HostError, HostUsageError

PCI_DEVICES = Path("/sys/bus/pci/devices")
PCI_DRIVERS = Path("/sys/bus/pci/drivers")
DRIVERS_PROBE = Path("/sys/bus/pci/drivers_probe")
IOMMU_GROUPS = Path("/sys/kernel/iommu_groups")
DEV_VFIO = Path("/dev/vfio")
VFIO_DRIVER = "vfio-pci"
SETTLE_SECONDS = 5.0  # how long a driver link or /dev/vfio node may take to appear

_PCI_CLASS_BRIDGE = 0x06


@dataclass(frozen=True)
class PciFunction:
    """One PCI function as sysfs shows it right now."""

    bdf: Bdf
    vendor_id: int
    device_id: int
    subsystem_vendor_id: int
    subsystem_device_id: int
    class_code: int  # 24 bits: base class, subclass, programming interface
    revision: int
    header_type: int  # layout bits only (0 endpoint, 1 PCI bridge, 2 CardBus bridge)
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    sysfs_path: str  # resolved path under /sys/devices: devices below it belong to this function

    @property
    def ids(self) -> str:
        return f"{self.vendor_id:04x}:{self.device_id:04x}"

    @property
    def is_bridge(self) -> bool:
        """A bridge by class (host, ISA, PCI-PCI, ...) or by config header layout: never passed through."""
        return self.class_code >> 16 == _PCI_CLASS_BRIDGE or self.header_type != 0

    @property
    def vfio_group_path(self) -> Path | None:
        return None if self.iommu_group is None else DEV_VFIO / str(self.iommu_group)


def device_dir(bdf: Bdf) -> Path:
    return PCI_DEVICES / str(bdf)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _hex(path: Path) -> int:
    text = _read(path)
    return int(text, 16) if text else 0


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _header_type(directory: Path) -> int:
    # Byte 0x0E of config space; its top bit only says "multi-function". Unprivileged reads see 64 bytes.
    try:
        with open(directory / "config", "rb") as f:
            data = f.read(16)
        return data[14] & 0x7F if len(data) >= 15 else 0
    except OSError:
        return 0


def read_function(bdf: Bdf) -> PciFunction:
    """The function's current state; HostUsageError when no such device exists."""
    directory = device_dir(bdf)
    if not directory.is_dir():
        raise HostUsageError(f"{bdf}: no such PCI device (see `pyvmm-host list`)")
    override = _read(directory / "driver_override")
    group = _link_name(directory / "iommu_group")
    return PciFunction(
        bdf=bdf,
        vendor_id=_hex(directory / "vendor"),
        device_id=_hex(directory / "device"),
        subsystem_vendor_id=_hex(directory / "subsystem_vendor"),
        subsystem_device_id=_hex(directory / "subsystem_device"),
        class_code=_hex(directory / "class"),
        revision=_hex(directory / "revision"),
        header_type=_header_type(directory),
        driver=_link_name(directory / "driver"),
        # The kernel shows "(null)" when no override is set.
        driver_override=None if override in (None, "", "(null)") else override,
        iommu_group=int(group) if group is not None and group.isdigit() else None,
        sysfs_path=os.path.realpath(directory),
    )


def scan() -> list[PciFunction]:
    """Every PCI function, in address order."""
    try:
        names = os.listdir(PCI_DEVICES)
    except OSError:
        return []
    functions = []
    for name in sorted(names):
        try:
            functions.append(read_function(parse_bdf(name)))
        except HostUsageError:
            continue  # vanished while we looked (hot-unplug)
    return sorted(functions, key=lambda f: f.bdf)


def resolve(spelling: str | Bdf) -> Bdf:
    """A DEVICE argument as the user wrote it, checked to exist."""
    bdf = spelling if isinstance(spelling, Bdf) else parse_bdf(spelling)
    if not device_dir(bdf).is_dir():
        raise HostUsageError(f"{spelling}: no such PCI device (see `pyvmm-host list`)")
    return bdf


def driver_dir(driver: str) -> Path:
    return PCI_DRIVERS / driver


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
