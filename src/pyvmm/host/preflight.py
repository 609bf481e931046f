"""Preflight rules: from plain facts about the host and one function, everything standing between that
function and a guest, each with its fix, and the one-word verdict. Pure: no sysfs access here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum

from .groups import IommuGroup, blocks_group, joins_guest, stuck_bridge
from .hostfacts import HostFacts, format_size
from .inuse import HostUse
from .modules import ModuleState
from .pciids import PciIds
from .sysfs import VFIO_DRIVER, PciFunction


class Severity(IntEnum):
    INFO = 0
    WARNING = 1  # works, with a caveat or an extra step `bind` takes care of
    ERROR = 2  # the guest cannot have the device until this is fixed


class Problem(Enum):
    NO_IOMMU = "no-iommu"
    NO_GROUP = "no-iommu-group"
    VFIO_MISSING = "vfio-missing"
    VFIO_NOT_LOADED = "vfio-not-loaded"
    NO_INTERRUPT_REMAPPING = "no-interrupt-remapping"
    UNSAFE_INTERRUPTS = "unsafe-interrupts"
    BRIDGE = "bridge"
    IN_USE = "in-use"
    GROUP_NOT_VIABLE = "group-not-viable"  # other endpoints to take along (`bind --group`)
    GROUP_WITH_BRIDGE = "group-with-bridge"  # a bridge on a host driver shares the group: never viable
    GROUP_MEMBERS = "group-members"  # other members already on vfio-pci: the same guest gets them too
    MEMLOCK = "memlock"
    BOUND = "bound-to-vfio"


class Verdict(Enum):
    READY = "ready"  # already on vfio-pci, nothing in the way
    OK = "ok"  # `pyvmm-host bind` will do
    GROUP = "group"  # needs the rest of its IOMMU group: `bind --group`
    SHARED = "shared"  # its group holds a bridge the host drives: not isolated in this slot
    IN_USE = "in-use"  # the host needs it (mounted, swap, network up, root filesystem)
    BRIDGE = "bridge"
    NO_IOMMU = "no-iommu"
    NO_VFIO = "no-vfio"
    UNSAFE = "unsafe-irq"  # only with --allow-unsafe-interrupts
    MEMLOCK = "memlock"  # the memory-lock limit is below the guest's RAM


@dataclass(frozen=True)
class Finding:
    problem: Problem
    severity: Severity
    message: str
    fix: str


def describe(function: PciFunction, db: PciIds) -> str:
    """`0000:00:05.1 (Audio device, driver snd_hda_intel)`: enough to recognise a device in a message."""
    klass = db.class_name(function.class_code) or f"class {function.class_code >> 8:04x}"
    driver = f"driver {function.driver}" if function.driver else "no driver"
    return f"{function.bdf} ({klass}, {driver})"


def host_findings(host: HostFacts, memory: int | None = None) -> list[Finding]:
    """Findings that hold for every device of this host."""
    found: list[Finding] = []
    if not host.iommu:
        found.append(Finding(
            Problem.NO_IOMMU, Severity.ERROR,
            "no IOMMU: /sys/kernel/iommu_groups is empty",
            "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD)",
        ))
    for name, state in (("vfio-pci", host.vfio_pci), ("vfio_iommu_type1", host.vfio_iommu_type1)):
        if state is ModuleState.MISSING:
            found.append(Finding(
                Problem.VFIO_MISSING, Severity.ERROR,
                f"kernel module {name} is neither loaded, built in nor installed",
                "use a kernel built with CONFIG_VFIO_PCI and CONFIG_VFIO_IOMMU_TYPE1 (Debian's is)",
            ))
        elif state is ModuleState.AVAILABLE:
            found.append(Finding(
                Problem.VFIO_NOT_LOADED, Severity.WARNING,
                f"kernel module {name} is not loaded",
                f"`pyvmm-host bind` loads it (modprobe {name})",
            ))
    if not host.interrupt_remapping:
        risk = ("a device can then forge MSI writes and inject interrupts into the host or other guests, "
                "so its guest is not isolated")
        if host.unsafe_interrupts_allowed:
            found.append(Finding(
                Problem.UNSAFE_INTERRUPTS, Severity.WARNING,
                f"no interrupt remapping, and vfio_iommu_type1 allow_unsafe_interrupts is on: {risk}",
                "enable interrupt remapping (firmware, intremap=on) and restore the parameter; until then "
                "`pyvmm-host bind` and `pyvmm` still refuse unless told (--allow-unsafe-interrupts, "
                "--platform allow_unsafe_interrupts=on)",
            ))
        else:
            found.append(Finding(
                Problem.NO_INTERRUPT_REMAPPING, Severity.ERROR,
                f"no interrupt remapping: VFIO refuses devices unless unsafe interrupts are allowed; {risk}",
                "enable interrupt remapping (firmware, intremap=on), or accept the risk with "
                "`pyvmm-host bind --allow-unsafe-interrupts` and "
                "`pyvmm --platform allow_unsafe_interrupts=on`",
            ))
    if memory is not None and not host.can_lock_memory and host.memlock_limit is not None \
            and host.memlock_limit < memory:
        found.append(Finding(
            Problem.MEMLOCK, Severity.ERROR,
            f"memory-lock limit {format_size(host.memlock_limit)} is below the guest's "
            f"{format_size(memory)}: VFIO pins all guest RAM",
            f"raise it to at least {format_size(memory)} (ulimit -l, LimitMEMLOCK=, limits.conf) "
            "or run the VMM with CAP_IPC_LOCK",
        ))
    return found


def device_findings(
    function: PciFunction,
    group: IommuGroup | None,
    uses: Sequence[HostUse],
    db: PciIds,
) -> list[Finding]:
    """Findings about this one function: bridge, IOMMU group, host use, current driver."""
    found: list[Finding] = []
    bdf = function.bdf
    if function.is_bridge:
        found.append(Finding(
            Problem.BRIDGE, Severity.ERROR,
            f"{bdf} is a bridge ({db.class_name(function.class_code) or 'class 06'}): "
            "VFIO passes endpoints only",
            "pass the devices behind it instead",
        ))
    if group is None:
        found.append(Finding(
            Problem.NO_GROUP, Severity.ERROR,
            f"{bdf} has no iommu_group link: no IOMMU translates its DMA",
            "enable the IOMMU (intel_iommu=on / amd_iommu=on) or move the card to a slot behind it",
        ))
    else:
        others = [m for m in group.members if m.bdf != bdf and blocks_group(m)]
        if others:
            named = ", ".join(describe(m, db) for m in others)
            if any(stuck_bridge(m) for m in others):
                found.append(Finding(
                    Problem.GROUP_WITH_BRIDGE, Severity.ERROR,
                    f"IOMMU group {group.number} can never be viable: it also holds {named}, and a bridge "
                    "the host drives cannot be handed over",
                    "move the card to a slot with its own group (behind a root port with ACS)",
                ))
            else:
                found.append(Finding(
                    Problem.GROUP_NOT_VIABLE, Severity.ERROR,
                    f"IOMMU group {group.number} is not viable: it also holds {named}",
                    f"pass the whole group: `pyvmm-host bind --group {bdf}`",
                ))
        companions = [m for m in group.members if m.bdf != bdf and joins_guest(m)]
        if companions and not function.is_bridge:
            named = ", ".join(str(m.bdf) for m in companions)
            paths = " ".join(f"path=/sys/bus/pci/devices/{m.bdf}/" for m in companions)
            found.append(Finding(
                Problem.GROUP_MEMBERS, Severity.WARNING,
                f"IOMMU group {group.number} also holds {named}: a guest that gets {bdf} gets "
                f"{'them' if len(companions) > 1 else 'it'} too (bound to vfio-pci: `pyvmm-host bind --group "
                f"{bdf}`)",
                f"give the guest every one: --device path=/sys/bus/pci/devices/{bdf}/ {paths}",
            ))
    for use in uses:
        found.append(Finding(
            Problem.IN_USE, Severity.ERROR,
            f"{bdf} is in use by the host: {use.detail}",
            f"{use.fix or 'stop using it on the host first'}, or override with --force",
        ))
    if function.driver == VFIO_DRIVER:
        found.append(Finding(Problem.BOUND, Severity.INFO, f"{bdf} is bound to vfio-pci", "nothing to do"))
    return found


_ORDER = (
    (Problem.BRIDGE, Verdict.BRIDGE),
    (Problem.NO_IOMMU, Verdict.NO_IOMMU),
    (Problem.NO_GROUP, Verdict.NO_IOMMU),
    (Problem.IN_USE, Verdict.IN_USE),
    (Problem.GROUP_WITH_BRIDGE, Verdict.SHARED),
    (Problem.GROUP_NOT_VIABLE, Verdict.GROUP),
    (Problem.VFIO_MISSING, Verdict.NO_VFIO),
    (Problem.NO_INTERRUPT_REMAPPING, Verdict.UNSAFE),
    (Problem.MEMLOCK, Verdict.MEMLOCK),
)


def verdict(function: PciFunction, findings: Sequence[Finding]) -> Verdict:
    """The most fundamental error decides the word; without errors, ready if already on vfio-pci."""
    errors = {f.problem for f in findings if f.severity is Severity.ERROR}
    for problem, word in _ORDER:
        if problem in errors:
            return word
    return Verdict.READY if function.driver == VFIO_DRIVER else Verdict.OK
