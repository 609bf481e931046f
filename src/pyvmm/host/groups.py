"""IOMMU groups: which functions share one, and which members stand in the way of VFIO (the rule itself is
pyvmm.pci_sysfs.member_role, shared with `pyvmm --device`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pyvmm.pci_sysfs import MemberRole, member_role

from .sysfs import PciFunction


@dataclass(frozen=True)
class IommuGroup:
    number: int
    members: tuple[PciFunction, ...]

    @property
    def blockers(self) -> tuple[PciFunction, ...]:
        return tuple(m for m in self.members if blocks_group(m))

    @property
    def viable(self) -> bool:
        """What VFIO requires before a VMM may open the group: no member's driver claims its DMA."""
        return not self.blockers


def blocks_group(member: PciFunction) -> bool:
    """True when this member keeps its group from being usable through VFIO."""
    return member_role(member).blocks


def stuck_bridge(member: PciFunction) -> bool:
    """A bridge on a driver that blocks the group: pyvmm never hands it over, so the group stays unviable."""
    return member_role(member) is MemberRole.DRIVEN_BRIDGE


def joins_guest(member: PciFunction) -> bool:
    """An endpoint (on vfio-pci, or idle): the guest that gets one function of the group gets this one too."""
    return member_role(member).joins_guest


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
