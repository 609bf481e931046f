"""Capability walks over a device's config space and the read patches the guest sees
(docs/vfio.md#capabilities).

Pure logic over a `read(offset, size) -> int` function, so it runs against the VFIO config region as well
as against bytes in a test. Both walks stop on loops and on all-ones answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from pyvmm.errors import UsageError

ConfigReader = Callable[[int, int], int]

STATUS = 0x06
STATUS_CAP_LIST = 1 << 4
CAPABILITIES_POINTER = 0x34
LEGACY_CONFIG_SIZE = 0x100
EXTENDED_CONFIG_START = 0x100
_MAX_STD_CAPS = 48  # (256 - 64) / 4: more nodes than fit means a loop
_MAX_EXT_CAPS = (4096 - 256) // 4

GPUDIRECT_CLIQUE_OFFSET = 0xD4


class CapId(IntEnum):
    PM = 0x01
    MSI = 0x05
    VENDOR = 0x09
    PCIE = 0x10
    MSIX = 0x11


class ExtCapId(IntEnum):
    ARI = 0x000E
    SRIOV = 0x0010
    RESIZABLE_BAR = 0x0015


# Extended capabilities a guest must not see: it cannot use SR-IOV/ARI on a single assigned function, and
# resizing a BAR would contradict the shadow BAR sizes.
HIDDEN_EXT_CAPS = frozenset({ExtCapId.ARI, ExtCapId.SRIOV, ExtCapId.RESIZABLE_BAR})


@dataclass(frozen=True)
class ConfigPatch:
    """On read, bits `mask` of the dword at `offset` (aligned) read as `value` instead of the device's."""

    offset: int
    mask: int
    value: int

    def apply(self, dword: int) -> int:
        return (dword & ~self.mask & 0xFFFF_FFFF) | (self.value & self.mask)


@dataclass
class CapabilityScan:
    standard: list[tuple[int, int]] = field(default_factory=list)  # (offset, id) in list order
    extended: list[tuple[int, int]] = field(default_factory=list)

    def find(self, cap_id: int) -> int | None:
        return next((off for off, cid in self.standard if cid == cap_id), None)

    @property
    def last(self) -> int | None:
        return self.standard[-1][0] if self.standard else None


def walk_standard(read: ConfigReader) -> list[tuple[int, int]]:
    if not read(STATUS, 2) & STATUS_CAP_LIST:
        return []
    caps: list[tuple[int, int]] = []
    seen: set[int] = set()
    ptr = read(CAPABILITIES_POINTER, 1) & 0xFC
    while ptr >= 0x40 and ptr not in seen and len(caps) < _MAX_STD_CAPS:
        seen.add(ptr)
        cap_id = read(ptr, 1)
        if cap_id == 0xFF:  # an all-ones answer: nothing readable there
            break
        caps.append((ptr, cap_id))
        ptr = read(ptr + 1, 1) & 0xFC
    return caps


def walk_extended(read: ConfigReader, config_size: int) -> list[tuple[int, int]]:
    caps: list[tuple[int, int]] = []
    if config_size <= EXTENDED_CONFIG_START:
        return caps
    seen: set[int] = set()
    ptr = EXTENDED_CONFIG_START
    while EXTENDED_CONFIG_START <= ptr < config_size and ptr not in seen and len(caps) < _MAX_EXT_CAPS:
        seen.add(ptr)
        header = read(ptr, 4)
        if header in (0, 0xFFFF_FFFF):
            break
        caps.append((ptr, header & 0xFFFF))
        ptr = (header >> 20) & 0xFFC
    return caps


def scan(read: ConfigReader, config_size: int) -> CapabilityScan:
    result = CapabilityScan(walk_standard(read))
    # Extended capabilities exist only on PCI Express functions.
    if result.find(CapId.PCIE) is not None:
        result.extended = walk_extended(read, config_size)
    return result


def hidden_ext_cap_patches(caps: CapabilityScan) -> list[ConfigPatch]:
    """Zero the id of each hidden extended capability, keeping version and next so the chain stays intact."""
    return [ConfigPatch(off, 0xFFFF, 0) for off, cid in caps.extended if cid in HIDDEN_EXT_CAPS]


class CapabilityConflict(UsageError, ValueError):
    """A capability pyvmm would add overlaps one the device already has (a configuration problem)."""


CLIQUE_CAP_LENGTH = 8
_PCIE_CAP_LENGTH = 0x3C
_MSIX_CAP_LENGTH = 12
_PM_CAP_LENGTH = 8


def capability_extent(read: ConfigReader, offset: int, cap_id: int, following: int) -> int:
    """How many bytes the standard capability at `offset` occupies.

    Known layouts give their exact length (MSI from its control word, vendor-specific from its length
    byte); others are taken to reach the next capability (by address) or the end of legacy config space.
    """
    if cap_id == CapId.MSI:
        control = read(offset + 2, 2)
        return 10 + (4 if control & 0x80 else 0) + (10 if control & 0x100 else 0)
    if cap_id == CapId.MSIX:
        return _MSIX_CAP_LENGTH
    if cap_id == CapId.PM:
        return _PM_CAP_LENGTH
    if cap_id == CapId.PCIE:
        return _PCIE_CAP_LENGTH
    if cap_id == CapId.VENDOR:
        return max(read(offset + 2, 1), 3)
    return max(following - offset, 2)


def occupied_by(
    read: ConfigReader, caps: CapabilityScan, start: int, length: int
) -> tuple[int, int, int] | None:
    """(offset, id, extent) of the first standard capability overlapping `[start, start + length)`."""
    offsets = sorted(off for off, _ in caps.standard)
    for off, cap_id in caps.standard:
        later = [o for o in offsets if o > off]
        extent = capability_extent(read, off, cap_id, later[0] if later else LEGACY_CONFIG_SIZE)
        if off < start + length and start < off + extent:
            return off, cap_id, extent
    return None


def capability_name(cap_id: int) -> str:
    try:
        return f"{CapId(cap_id).name} capability"
    except ValueError:
        return f"capability {cap_id:#04x}"


def clique_conflict(read: ConfigReader, caps: CapabilityScan) -> str | None:
    """Why the GPUDirect clique capability cannot go at 0xD4 on this device, or None if it can."""
    hit = occupied_by(read, caps, GPUDIRECT_CLIQUE_OFFSET, CLIQUE_CAP_LENGTH)
    if hit is None:
        return None
    off, cap_id, extent = hit
    end = GPUDIRECT_CLIQUE_OFFSET + CLIQUE_CAP_LENGTH - 1
    return (
        f"config space {GPUDIRECT_CLIQUE_OFFSET:#x}-{end:#x}, where the GPUDirect clique capability goes, is "
        f"already used by the device's {capability_name(cap_id)} at {off:#x} "
        f"({off:#x}-{off + extent - 1:#x}); "
        "adding it would corrupt the device's capability list"
    )


def gpudirect_clique_patches(
    caps: CapabilityScan, clique: int, read: ConfigReader | None = None
) -> list[ConfigPatch]:
    """The NVIDIA P2P clique vendor capability at 0xD4, linked from the last standard capability
    (docs/vfio.md#gpudirect-clique-capability).

    Raises CapabilityConflict when a capability of the device already occupies 0xD4-0xDB (`read`, the
    device's config space, tells how long its capabilities are; without it only their starts are checked).
    """
    if not 0 <= clique <= 15:
        raise ValueError(f"GPUDirect clique id {clique} is not within 0-15")
    last = caps.last
    if last is None:
        return []
    if read is not None:
        problem = clique_conflict(read, caps)
        if problem is not None:
            raise CapabilityConflict(problem)
    elif any(GPUDIRECT_CLIQUE_OFFSET <= off < GPUDIRECT_CLIQUE_OFFSET + 8 for off, _ in caps.standard):
        raise CapabilityConflict(f"config space at {GPUDIRECT_CLIQUE_OFFSET:#x} is taken by a capability")
    link = last & ~3
    shift = 8 * (last - link + 1)
    return [
        ConfigPatch(link, 0xFF << shift, GPUDIRECT_CLIQUE_OFFSET << shift),
        ConfigPatch(GPUDIRECT_CLIQUE_OFFSET, 0xFFFF_FFFF, 0x5008_0009),
        ConfigPatch(GPUDIRECT_CLIQUE_OFFSET + 4, 0xFFFF_FFFF, (clique << 19) | 0x5032),
    ]


def bytes_reader(data: bytes) -> ConfigReader:
    """A ConfigReader over a config-space dump (e.g. sysfs `config`); bytes past its end read all-ones."""

    def read(offset: int, size: int) -> int:
        chunk = data[offset:offset + size]
        if len(chunk) < size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(chunk, "little")

    return read


def apply_patches(patches: dict[int, list[ConfigPatch]], dword_offset: int, dword: int) -> int:
    for patch in patches.get(dword_offset, ()):
        dword = patch.apply(dword)
    return dword
