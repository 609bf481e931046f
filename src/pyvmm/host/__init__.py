"""pyvmm.host: prepare a host for VFIO passthrough. `pyvmm-host` is a thin shell over this API, and the
VMM uses it for `--device ...,managed=on`:

    outcome = bind_to_vfio(["0000:01:00.0"], group=True)   # journalled under /run/pyvmm
    ...
    restore(outcome.changed)                                # give back what this bind took
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmm.lazy import lazy_exports

if TYPE_CHECKING:
    from .actions import Step
    from .bdf import Bdf, parse_bdf
    from .binding import bind_to_vfio
    from .errors import HostError, HostUsageError, RefusedError
    from .groups import IommuGroup, blocks_group, build_groups
    from .hostfacts import HostFacts, parse_size
    from .inuse import HostUse, UseKind, host_uses
    from .inventory import DeviceInfo, describe_devices, iommu_groups
    from .journal import BindMethod, JournalState
    from .outcome import DeviceOutcome, Outcome
    from .pciids import PciIds, load_pci_ids
    from .preflight import Finding, Problem, Severity, Verdict
    from .restoring import restore, unbind
    from .selection import select_targets
    from .sysfs import PciFunction, read_function, resolve, scan

__all__ = [
    "Bdf",
    "BindMethod",
    "DeviceInfo",
    "DeviceOutcome",
    "Finding",
    "HostError",
    "HostFacts",
    "HostUsageError",
    "HostUse",
    "IommuGroup",
    "JournalState",
    "Outcome",
    "PciFunction",
    "PciIds",
    "Problem",
    "RefusedError",
    "Severity",
    "Step",
    "UseKind",
    "Verdict",
    "bind_to_vfio",
    "blocks_group",
    "build_groups",
    "describe_devices",
    "host_uses",
    "iommu_groups",
    "load_pci_ids",
    "parse_bdf",
    "parse_size",
    "read_function",
    "resolve",
    "restore",
    "scan",
    "select_targets",
    "unbind",
]

# Imported on first use (pyvmm/lazy.py): a VM without passthrough never needs most of them.
__getattr__ = lazy_exports(__name__, {
    "Bdf": "bdf",
    "BindMethod": "journal",
    "DeviceInfo": "inventory",
    "DeviceOutcome": "outcome",
    "Finding": "preflight",
    "HostError": "errors",
    "HostFacts": "hostfacts",
    "HostUsageError": "errors",
    "HostUse": "inuse",
    "IommuGroup": "groups",
    "JournalState": "journal",
    "Outcome": "outcome",
    "PciFunction": "sysfs",
    "PciIds": "pciids",
    "Problem": "preflight",
    "RefusedError": "errors",
    "Severity": "preflight",
    "Step": "actions",
    "UseKind": "inuse",
    "Verdict": "preflight",
    "bind_to_vfio": "binding",
    "blocks_group": "groups",
    "build_groups": "groups",
    "describe_devices": "inventory",
    "host_uses": "inuse",
    "iommu_groups": "inventory",
    "load_pci_ids": "pciids",
    "parse_bdf": "bdf",
    "parse_size": "hostfacts",
    "read_function": "sysfs",
    "resolve": "sysfs",
    "restore": "restoring",
    "scan": "sysfs",
    "select_targets": "selection",
    "unbind": "restoring",
})
