"""Capability walks over a device's config space and the read patches the guest sees (ch-vfio-spec §4.5).

Pure logic over a `read(offset, size) -> int` function, so it runs against the VFIO config region as well
as against bytes in a test. Both walks stop on loops and on all-ones answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

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


def gpudirect_clique_patches(caps: CapabilityScan, clique: int) -> list[ConfigPatch]:
    """The NVIDIA P2P clique vendor capability at 0xD4, linked from the last standard capability (§4.5.4)."""
    if not 0 <= clique <= 15:
        raise ValueError(f"GPUDirect clique id {clique} is not within 0-15")
    last = caps.last
    if last is None:
        return []
    if any(GPUDIRECT_CLIQUE_OFFSET <= off < GPUDIRECT_CLIQUE_OFFSET + 8 for off, _ in caps.standard):
        raise ValueError(f"config space at {GPUDIRECT_CLIQUE_OFFSET:#x} is taken by a capability")
    link = last & ~3
    shift = 8 * (last - link + 1)
    return [
        ConfigPatch(link, 0xFF << shift, GPUDIRECT_CLIQUE_OFFSET << shift),
        ConfigPatch(GPUDIRECT_CLIQUE_OFFSET, 0xFFFF_FFFF, 0x5008_0009),
        ConfigPatch(GPUDIRECT_CLIQUE_OFFSET + 4, 0xFFFF_FFFF, (clique << 19) | 0x5032),
    ]


def apply_patches(patches: dict[int, list[ConfigPatch]], dword_offset: int, dword: int) -> int:
    for patch in patches.get(dword_offset, ()):
        dword = patch.apply(dword)
    return dword
