"""The PCI inventory with names, groups, host use and verdicts: what `list`, `groups` and `check` show."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import hostfacts, sysfs
from .bdf import Bdf
from .groups import IommuGroup, build_groups, group_of
from .inuse import HostUse, host_uses, open_device_nodes
from .pciids import PciIds, load_pci_ids
from .preflight import Finding, Verdict, device_findings, host_findings, verdict
from .sysfs import PciFunction


@dataclass(frozen=True)
class DeviceInfo:
    function: PciFunction
    class_name: str | None
    vendor_name: str | None
    device_name: str | None
    group: IommuGroup | None
    uses: tuple[HostUse, ...]
    host_findings: tuple[Finding, ...]  # hold for every device of the host
    device_findings: tuple[Finding, ...]
    verdict: Verdict

    @property
    def findings(self) -> tuple[Finding, ...]:
        return self.host_findings + self.device_findings

    def to_json(self) -> dict[str, Any]:
        f = self.function
        return {
            "bdf": str(f.bdf),
            "class": f"{f.class_code:06x}",
            "class_name": self.class_name,
            "vendor_id": f"{f.vendor_id:04x}",
            "device_id": f"{f.device_id:04x}",
            "ids": f.ids,
            "vendor_name": self.vendor_name,
            "device_name": self.device_name,
            "subsystem": f"{f.subsystem_vendor_id:04x}:{f.subsystem_device_id:04x}",
            "revision": f"{f.revision:02x}",
            "driver": f.driver,
            "driver_override": f.driver_override,
            "iommu_group": f.iommu_group,
            "bridge": f.is_bridge,
            "verdict": self.verdict.value,
            "in_use": [u.detail for u in self.uses],
            "findings": [finding_json(x) for x in self.findings],
        }


def finding_json(finding: Finding) -> dict[str, str]:
    return {
        "problem": finding.problem.value,
        "severity": finding.severity.name.lower(),
        "message": finding.message,
        "fix": finding.fix,
    }


def member_json(member: PciFunction, db: PciIds) -> dict[str, Any]:
    return {
        "bdf": str(member.bdf),
        "ids": member.ids,
        "class_name": db.class_name(member.class_code),
        "vendor_name": db.vendor_name(member.vendor_id),
        "device_name": db.device_name(member.vendor_id, member.device_id),
        "driver": member.driver,
        "bridge": member.is_bridge,
    }


def group_json(group: IommuGroup, db: PciIds) -> dict[str, Any]:
    return {
        "group": group.number,
        "viable": group.viable,
        "devices": [member_json(m, db) for m in group.members],
    }


def describe_devices(
    bdfs: Iterable[Bdf] | None = None,
    memory: int | None = None,
    db: PciIds | None = None,
) -> list[DeviceInfo]:
    """Inventory of the named functions (all when None), with every finding about each."""
    db = db if db is not None else load_pci_ids()
    functions = sysfs.scan()
    by_bdf = {f.bdf: f for f in functions}
    wanted: Sequence[PciFunction] = functions if bdfs is None else [
        by_bdf[b] if b in by_bdf else sysfs.read_function(b) for b in bdfs
    ]
    common = tuple(host_findings(hostfacts.gather(), memory))
    infos = []
    opened = open_device_nodes()  # once: it walks every process's open files
    for f in wanted:
        group = group_of(f, functions)
        uses = tuple(host_uses(f.sysfs_path, opened))
        own = tuple(device_findings(f, group, uses, db))
        infos.append(DeviceInfo(
            function=f,
            class_name=db.class_name(f.class_code),
            vendor_name=db.vendor_name(f.vendor_id),
            device_name=db.device_name(f.vendor_id, f.device_id),
            group=group,
            uses=uses,
            host_findings=common,
            device_findings=own,
            verdict=verdict(f, common + own),
        ))
    return infos


def iommu_groups() -> list[IommuGroup]:
    return build_groups(sysfs.scan())
