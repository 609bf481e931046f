"""PCI functions and IOMMU groups as sysfs shows them, and the one rule for which members of an IOMMU group
stand in the way of VFIO.

The only module that reads /sys/bus/pci and /sys/kernel/iommu_groups (tests/unit/test_pci_sysfs.py fails when
another one starts to): the host layer (inventory, binding, preflight), `--device` checks and planning's BAR
reads all come here; the host layer's binding writes use its paths. It imports nothing from pyvmm, so
`pyvmm --device` loads it without the host layer. `PciSysfs(root)` reads a fake tree in tests; `SYSFS` is
the real one (looked up at call time by callers, so tests may replace it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path

SYSFS_ROOT = Path("/sys")
DEV_VFIO = Path("/dev/vfio")

VFIO_DRIVER = "vfio-pci"
PCI_STUB_DRIVER = "pci-stub"
PCIEPORT_DRIVER = "pcieport"

# Drivers that set driver_managed_dma: binding them claims no DMA ownership of the IOMMU group, so they never
# make a group unviable. vfio-pci's variant drivers (mlx5_vfio_pci, xe-vfio-pci, ...) are recognised by name.
DMA_MANAGED_DRIVERS = frozenset({VFIO_DRIVER, PCI_STUB_DRIVER, PCIEPORT_DRIVER})
_VFIO_VARIANT = re.compile(r"[_-]vfio[_-]pci$")

PCI_HEADER_TYPE = 0x0E  # config-space offset of the header-type byte
PCI_HEADER_TYPE_MASK = 0x7F  # the top bit only says "multi-function"
PCI_BASE_CLASS_BRIDGE = 0x06

# The kernel's own spelling of a PCI function's name (dev_name): domain:bus:device.function.
_NAME = re.compile(r"^([0-9a-f]{4,8}):([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")


class PciHeaderType(IntEnum):
    PCI_HEADER_TYPE_NORMAL = 0
    PCI_HEADER_TYPE_BRIDGE = 1
    PCI_HEADER_TYPE_CARDBUS = 2


@dataclass(frozen=True, order=True)
class Bdf:
    """A PCI function's address; str() is the kernel's name for it (0000:01:00.0)."""

    domain: int
    bus: int
    device: int
    function: int

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"

    @property
    def slot(self) -> str:
        """Domain, bus and device without the function: the functions of one card share it."""
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}"

    @classmethod
    def from_name(cls, name: str) -> Bdf | None:
        """The address of a sysfs entry named as the kernel names PCI functions; None for anything else."""
        match = _NAME.match(name)
        if match is None:
            return None
        return cls(int(match[1], 16), int(match[2], 16), int(match[3], 16), int(match[4]))


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
    header_type: int  # layout bits only (PciHeaderType)
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    sysfs_path: str  # resolved path under /sys/devices: devices below it belong to this function

    @property
    def name(self) -> str:
        return str(self.bdf)

    @property
    def ids(self) -> str:
        return f"{self.vendor_id:04x}:{self.device_id:04x}"

    @property
    def is_bridge(self) -> bool:
        """A bridge by class (host, ISA, PCI-PCI, ...) or by config header layout: never passed through."""
        return (self.class_code >> 16 == PCI_BASE_CLASS_BRIDGE
                or self.header_type != PciHeaderType.PCI_HEADER_TYPE_NORMAL)

    @property
    def vfio_group_path(self) -> Path | None:
        return None if self.iommu_group is None else DEV_VFIO / str(self.iommu_group)


# ---- one function's directory ------------------------------------------------------------------------------


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _hex(path: Path) -> int:
    text = _text(path)
    try:
        return int(text, 16) if text else 0
    except ValueError:
        return 0


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def function_dir(path: str | os.PathLike[str]) -> Path:
    """A function's directory as the user spelled it (a /sys/bus/pci/devices symlink, a trailing slash, a
    /sys/devices path), resolved."""
    return Path(path).resolve()


def is_function_dir(directory: Path) -> bool:
    return (directory / "config").is_file() and (directory / "vendor").is_file()


def read_driver(directory: Path) -> str | None:
    """The driver bound to the function in `directory`, None when none is."""
    return _link_name(directory / "driver")


def read_config(directory: Path, size: int | None = None) -> bytes:
    """Config space (the first 64 bytes only, unless root); OSError when it cannot be read."""
    with open(directory / "config", "rb") as f:
        return f.read() if size is None else f.read(size)


def read_resource(directory: Path) -> str:
    """The `resource` table (start end flags per BAR, then the ROM); OSError when it cannot be read."""
    return (directory / "resource").read_text()


def _header_type(directory: Path) -> int:
    try:
        data = read_config(directory, PCI_HEADER_TYPE + 1)
    except OSError:
        return PciHeaderType.PCI_HEADER_TYPE_NORMAL
    return data[PCI_HEADER_TYPE] & PCI_HEADER_TYPE_MASK if len(data) > PCI_HEADER_TYPE else 0


def _read_function(directory: Path, bdf: Bdf) -> PciFunction:
    override = _text(directory / "driver_override")
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
        driver=read_driver(directory),
        # The kernel shows "(null)" when no override is set.
        driver_override=None if override in (None, "", "(null)") else override,
        iommu_group=int(group) if group is not None and group.isdigit() else None,
        sysfs_path=os.path.realpath(directory),
    )


def function_at(path: str | os.PathLike[str]) -> PciFunction | None:
    """The function whose sysfs directory `path` is; None when it is not one."""
    directory = function_dir(path)
    bdf = Bdf.from_name(directory.name)
    if bdf is None or not is_function_dir(directory):
        return None
    return _read_function(directory, bdf)


# ---- the bus and its IOMMU groups -------------------------------------------------------------------------


class PciSysfs:
    """The PCI bus and IOMMU groups under sysfs mounted at `root` (/sys; a fake tree in tests)."""

    def __init__(self, root: str | os.PathLike[str] = SYSFS_ROOT) -> None:
        self.root = Path(root)
        self.pci_devices = self.root / "bus/pci/devices"
        self.pci_drivers = self.root / "bus/pci/drivers"
        self.drivers_probe = self.root / "bus/pci/drivers_probe"
        self.iommu_groups = self.root / "kernel/iommu_groups"

    def device_dir(self, bdf: Bdf | str) -> Path:
        return self.pci_devices / str(bdf)

    def driver_dir(self, driver: str) -> Path:
        return self.pci_drivers / driver

    def exists(self, bdf: Bdf | str) -> bool:
        return self.device_dir(bdf).is_dir()

    def driver(self, bdf: Bdf | str) -> str | None:
        """The driver bound to the function, None when none is (or there is no such function)."""
        return read_driver(self.device_dir(bdf))

    def function(self, bdf: Bdf) -> PciFunction | None:
        """The function's current state; None when no such function exists."""
        directory = self.device_dir(bdf)
        if not directory.is_dir():
            return None
        return _read_function(directory, bdf)

    def functions(self) -> list[PciFunction]:
        """Every PCI function, in address order."""
        try:
            names = os.listdir(self.pci_devices)
        except OSError:
            return []
        found = []
        for name in names:
            bdf = Bdf.from_name(name)
            function = None if bdf is None else self.function(bdf)
            if function is not None:  # else it vanished while we looked (hot-unplug)
                found.append(function)
        return sorted(found, key=lambda f: f.bdf)

    def group_numbers(self) -> list[int]:
        """Every IOMMU group; none without an IOMMU."""
        try:
            return sorted(int(n) for n in os.listdir(self.iommu_groups) if n.isdigit())
        except OSError:
            return []

    def group_members(self, number: int) -> list[PciFunction]:
        """The PCI functions of IOMMU group `number`, in address order (empty when there is no such group)."""
        devices = self.iommu_groups / str(number) / "devices"
        try:
            names = os.listdir(devices)
        except OSError:
            return []
        found = []
        for name in names:
            bdf = Bdf.from_name(name)
            if bdf is not None and is_function_dir(devices / name):
                found.append(_read_function(devices / name, bdf))
        return sorted(found, key=lambda f: f.bdf)


SYSFS = PciSysfs()


# ---- IOMMU-group viability ---------------------------------------------------------------------------------
#
# Kernel facts (Linux >= 5.19, drivers/vfio/group.c, drivers/pci/pci-driver.c): VFIO_GROUP_FLAGS_VIABLE is
# set while iommu_group_dma_owner_claimed() is false: while no member's driver has claimed DMA ownership.
# Every PCI driver claims it at probe (pci_dma_configure), except drivers that set driver_managed_dma:
# vfio-pci and its variants, pci-stub and pcieport. A function without a driver claims nothing. Bridges are
# no longer exempt (before 5.19 VFIO let any driver keep a non-normal header). Beyond what the kernel needs,
# pyvmm's rule: every function of a group that VFIO owns goes to the same guest (no one else can open the
# group meanwhile, and the functions are not isolated from each other).


class MemberRole(Enum):
    """What one member of an IOMMU group means for the group's passthrough."""

    VFIO = "vfio"  # on vfio-pci: goes to the guest that gets the group
    IDLE = "idle"  # an endpoint with no driver or on pci-stub: claims no DMA, but shares the group's DMA
    #                (peer to peer inside the group passes no IOMMU): it goes to the same guest, on vfio-pci
    PORT = "port"  # pcieport (root and switch ports), or a bridge with no driver: stays on the host
    DRIVEN = "driven"  # an endpoint on a driver that does DMA: blocks; bind it to vfio-pci with the group
    DRIVEN_BRIDGE = "driven-bridge"  # a bridge on such a driver: blocks, and pyvmm never hands a bridge over

    @property
    def blocks(self) -> bool:
        """The kernel refuses the group (not viable) while this member stays as it is."""
        return self in (MemberRole.DRIVEN, MemberRole.DRIVEN_BRIDGE)

    @property
    def joins_guest(self) -> bool:
        """The guest that gets one function of the group must get this one too: never a partial group."""
        return self in (MemberRole.VFIO, MemberRole.IDLE)


def is_vfio_driver(driver: str | None) -> bool:
    return driver is not None and (driver == VFIO_DRIVER or _VFIO_VARIANT.search(driver) is not None)


def member_role(function: PciFunction) -> MemberRole:
    """The one rule, used by `pyvmm-host` (groups, check, bind) and by `pyvmm --device`."""
    driver = function.driver
    if is_vfio_driver(driver):
        return MemberRole.VFIO
    if driver == "pcieport" or (driver is None and function.is_bridge):
        return MemberRole.PORT
    if driver is None or driver in DMA_MANAGED_DRIVERS:
        return MemberRole.IDLE
    return MemberRole.DRIVEN_BRIDGE if function.is_bridge else MemberRole.DRIVEN


def blockers(members: Iterable[PciFunction]) -> list[PciFunction]:
    """The members that keep their group from being viable."""
    return [m for m in members if member_role(m).blocks]


def left_out(members: Iterable[PciFunction], given: Collection[str]) -> list[PciFunction]:
    """The members that must join a guest given the functions named in `given` (0000:01:00.0) but are not."""
    return [m for m in members if member_role(m).joins_guest and m.name not in given]
