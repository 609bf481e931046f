"""IOMMU groups: which functions share one, and which members stand in the way of VFIO."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .sysfs import VFIO_DRIVER, PciFunction

# Drivers VFIO tolerates in a group it owns: they do no DMA of their own on the device's behalf.
HARMLESS_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub", "pcieport"})


@dataclass(frozen=True)
class IommuGroup:
    number: int
    members: tuple[PciFunction, ...]

    @property
    def blockers(self) -> tuple[PciFunction, ...]:
        return tuple(m for m in self.members if blocks_group(m))

    @property
    def viable(self) -> bool:
        """What VFIO requires before a VMM may open the group: nobody else drives any member."""
        return not self.blockers


def blocks_group(member: PciFunction) -> bool:
    """True when this member keeps its group from being usable through VFIO."""
    if member.driver is None or member.driver in HARMLESS_DRIVERS:
        return False
    # Bridges with a bridge header are tolerated on any driver (the kernel exempts them).
    return member.header_type == 0


def build_groups(functions: Iterable[PciFunction]) -> list[IommuGroup]:
    """Group functions by their iommu_group number, in group order; functions without a group are left out."""
    by_number: dict[int, list[PciFunction]] = {}
    for f in functions:
        if f.iommu_group is not None:
            by_number.setdefault(f.iommu_group, []).append(f)
    return [IommuGroup(n, tuple(sorted(m, key=lambda f: f.bdf))) for n, m in sorted(by_number.items())]


def group_of(function: PciFunction, functions: Iterable[PciFunction]) -> IommuGroup | None:
    if function.iommu_group is None:
        return None
    members = [f for f in functions if f.iommu_group == function.iommu_group]
    return IommuGroup(function.iommu_group, tuple(sorted(members, key=lambda f: f.bdf)))
