"""pyvmm.host: prepare a host for VFIO passthrough. `pyvmm-host` is a thin shell over this API, and the
VMM uses it for `--device ...,managed=on`:

    outcome = bind_to_vfio(["0000:01:00.0"], group=True)   # journalled under /run/pyvmm
    ...
    restore(outcome.changed)                                # give back what this bind took
"""

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
