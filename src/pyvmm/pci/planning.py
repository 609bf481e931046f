"""Where every PCI device's BARs go, worked out before anything is opened (docs/pci.md#aperture-weights,
#bar-allocation, #32-bit-exhaustion).

The plan runs the builder's own placement code (PciSegment.add_device, top-down first fit per window) on
placeholder devices that ask for the same BARs, in the builder's order: explicit slots reserved first, then
`--disk`s, then `--device`s, each in command-line order. So the addresses a plan shows are the ones the
guest then sees, and a BAR that does not fit is found before KVM or VFIO is touched, with a remedy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pyvmm import layout
from pyvmm.pci.apertures import SegmentWindows, Window, mmio64_aperture, segment_windows
from pyvmm.pci.bar import ROM_BAR_INDEX, BarInfo, BarKind, BarMove
from pyvmm.pci.bus import BarAllocationError, BarPlacement, PciError
from pyvmm.pci.device import PciDevice
from pyvmm.pci.platform import PciPlatform

Weights = Sequence[tuple[int, int]]  # (mmio32, mmio64) weight of every segment


class PlanError(PciError):
    """The PCI layout the command line asks for cannot be built (a configuration problem, exit 2)."""


@dataclass(frozen=True)
class PlanItem:
    """One device to place: how the command line names it, where it goes, the BARs it asks for."""

    label: str  # "--device path=/sys/bus/pci/devices/0000:00:04.0/"
    segment: int
    slot: int | None
    bars: tuple[BarInfo, ...]
    what: str = ""  # shown after the label, e.g. "virtio-blk" or "host 0000:00:04.0 (1b36:0007)"


@dataclass(frozen=True)
class PlannedDevice:
    item: PlanItem
    slot: int
    placements: tuple[BarPlacement, ...]

    @property
    def bdf(self) -> str:
        return f"{self.item.segment:04x}:00:{self.slot:02x}.0"


@dataclass(frozen=True)
class PciPlan:
    phys_bits: int
    weights: tuple[tuple[int, int], ...]
    windows: tuple[SegmentWindows, ...]
    items: tuple[PlanItem, ...]
    devices: tuple[PlannedDevice, ...]  # in plug order


class _Placeholder(PciDevice):
    """Stands in for a device during planning: asks for its BARs, does nothing else."""

    def __init__(self, item: PlanItem) -> None:
        self.name = item.label
        self._bars = list(item.bars)

    def config_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def config_write(self, offset: int, size: int, value: int) -> list[BarMove]:
        return []

    def bars(self) -> list[BarInfo]:
        return list(self._bars)

    def assign_bar(self, index: int, address: int) -> None:
        pass

    def bar_move_refused(self, move: BarMove) -> None:
        pass

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass


# ---- the steps the builder shares ------------------------------------------------------------------------


def plan_windows(weights: Weights, ram_size: int, phys_bits: int) -> list[SegmentWindows]:
    """Every segment's 32-bit and 64-bit window (docs/pci.md#aperture-weights)."""
    try:
        return segment_windows([w for w, _ in weights], [w for _, w in weights],
                               mmio64_aperture(ram_size, phys_bits))
    except ValueError as exc:
        raise PlanError(f"--platform num_pci_segments={len(weights)}: {exc}") from exc


class _Unserved:
    """A bus that accepts every range and serves none: planning only needs the placements."""

    def insert(self, base: int, length: int, device: object) -> None:
        pass

    def remove(self, base: int) -> None:
        pass

    def move(self, old_base: int, new_base: int) -> None:
        pass


def planning_platform(windows: Sequence[SegmentWindows]) -> PciPlatform:
    """A PciPlatform on buses that serve nothing: the builder's placement code, with nothing behind it."""
    return PciPlatform(windows, pio_bus=_Unserved(), mmio_bus=_Unserved())


def reserve_slots(platform: PciPlatform, items: Sequence[PlanItem]) -> None:
    """Keep every explicitly requested slot, so that automatic placement never takes one."""
    for item in items:
        if item.slot is not None:
            platform.reserve_slot(item.segment, item.slot)


# ---- planning --------------------------------------------------------------------------------------------


class _Exhausted(Exception):
    def __init__(self, item: PlanItem, error: BarAllocationError) -> None:
        self.item = item
        self.error = error


def _place(items: Sequence[PlanItem], weights: Weights, ram_size: int, phys_bits: int) -> PciPlan:
    windows = plan_windows(weights, ram_size, phys_bits)
    platform = planning_platform(windows)
    reserve_slots(platform, items)
    planned: list[PlannedDevice] = []
    for item in items:
        try:
            address = platform.attach(_Placeholder(item), item.segment, item.slot)
        except BarAllocationError as exc:
            raise _Exhausted(item, exc) from exc
        planned.append(PlannedDevice(item, address.slot, tuple(platform.placements(address))))
    return PciPlan(phys_bits, tuple(weights), tuple(windows), tuple(items), tuple(planned))


def plan_pci(items: Sequence[PlanItem], weights: Weights, ram_size: int, phys_bits: int) -> PciPlan:
    """Place every item's BARs as the builder will; PlanError (one line, with a remedy) when one does not fit.

    `items` must be in the builder's plug order (disks, then passed-through devices).
    """
    try:
        return _place(items, weights, ram_size, phys_bits)
    except _Exhausted as exc:
        raise PlanError(_exhaustion_message(exc, items, weights, ram_size, phys_bits)) from exc.error


def _fits(items: Sequence[PlanItem], weights: Weights, ram_size: int, phys_bits: int,
          upto: int | None = None) -> bool:
    """Whether everything fits (`upto`: at least items[:upto + 1])."""
    try:
        _place(items, weights, ram_size, phys_bits)
    except _Exhausted as exc:
        return upto is not None and items.index(exc.item) > upto
    except PciError:
        return False
    return True


MAX_SUGGESTED_WEIGHT = 1 << 16


def _candidate_weights(current: int) -> list[int]:
    near = list(range(current + 1, current + 33))
    far = [current << k for k in range(6, 17) if current << k <= MAX_SUGGESTED_WEIGHT]
    return near + far


def _suggest_weight(
    segment: int, column: int, failing: int, items: Sequence[PlanItem], weights: Weights, ram_size: int,
    phys_bits: int,
) -> tuple[int, bool] | None:
    """The smallest weight for `segment` (column 0: mmio32, 1: mmio64) with which everything fits (True), or
    else with which at least items[failing] and those before it fit (False)."""
    if len(weights) < 2:
        return None
    for upto in (None, failing):
        for weight in _candidate_weights(weights[segment][column]):
            tried = list(weights)
            pair = list(tried[segment])
            pair[column] = weight
            tried[segment] = (pair[0], pair[1])
            if _fits(items, tried, ram_size, phys_bits, upto):
                return weight, upto is None
    return None


def _suggest_segment(
    item: PlanItem, items: Sequence[PlanItem], weights: Weights, ram_size: int, phys_bits: int
) -> int | None:
    """Another segment the device could go to (automatic slot) with everything still fitting."""
    for other in range(len(weights)):
        if other == item.segment:
            continue
        moved = [replace(i, segment=other, slot=None) if i is item else i for i in items]
        if _fits(moved, weights, ram_size, phys_bits):
            return other
    return None


def size_text(size: int) -> str:
    """Exact, in the largest unit that divides it: 16 MiB, 512 KiB, 16380 KiB, 4 GiB, 256 bytes."""
    for unit, name in ((layout.GiB, "GiB"), (layout.MiB, "MiB"), (layout.KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def bar_text(bar: BarInfo | BarPlacement) -> str:
    name = "ROM" if bar.index == ROM_BAR_INDEX else f"BAR{bar.index}"
    kind = {BarKind.IO: "I/O", BarKind.MEM32: "32-bit memory", BarKind.MEM64: "64-bit memory",
            BarKind.ROM: "expansion ROM, 32-bit"}[bar.kind]
    return f"{name} ({kind}, {size_text(bar.size)})"


def _exhaustion_message(
    exc: _Exhausted, items: Sequence[PlanItem], weights: Weights, ram_size: int, phys_bits: int
) -> str:
    err, item = exc.error, exc.item
    seg = err.segment
    window = err.window_range
    free = err.largest_free
    free_text = f"{size_text(free.size)} at {free.start:#x}" if free else "none"
    text = (
        f"{item.label}: {bar_text(err.bar)} does not fit in the {err.window} of PCI segment {seg} "
        f"{window} ({size_text(window.size)}; largest free {size_text(err.align)}-aligned range: {free_text})"
    )
    remedies: list[str] = []
    if err.bar.kind in (BarKind.MEM32, BarKind.ROM, BarKind.MEM64):
        column = 1 if err.bar.kind == BarKind.MEM64 else 0
        key = "mmio64_aperture_weight" if column else "mmio32_aperture_weight"
        failing = list(items).index(item)
        suggestion = _suggest_weight(seg, column, failing, items, weights, ram_size, phys_bits)
        if suggestion is not None:
            weight, everything = suggestion
            more = "" if everything else " (then see what else does not fit)"
            remedies.append(
                f"give segment {seg} a larger share with --pci-segment pci_segment={seg},{key}={weight}{more}"
            )
        elif len(weights) > 1:
            remedies.append(
                f"raise segment {seg}'s share with --pci-segment pci_segment={seg},{key}=<weight> "
                "(no weight alone makes everything fit)"
            )
        other = _suggest_segment(item, items, weights, ram_size, phys_bits)
        if other is not None:
            remedies.append(f"put the device on another segment with pci_segment={other}")
        elif len(weights) == 1:
            remedies.append("add PCI segments (--platform num_pci_segments=N) and spread the devices with "
                            "pci_segment=")
        else:
            remedies.append("or spread the devices over the segments with pci_segment=")
        if column == 1:
            remedies.append("or raise --cpus max_phys_bits")
    if not remedies:
        return text
    return text + "; " + ", or ".join(r.removeprefix("or ") for r in remedies)


# ---- reporting -------------------------------------------------------------------------------------------


def approximate_size(size: int) -> str:
    """1.50 GiB, 134.73 MiB: in the largest binary unit not above it."""
    for unit, name in ((1 << 40, "TiB"), (layout.GiB, "GiB"), (layout.MiB, "MiB"), (layout.KiB, "KiB")):
        if size >= unit:
            return f"{size / unit:.2f} {name}"
    return f"{size} bytes"


def _window_text(window: Window) -> str:
    exact, rough = size_text(window.size), approximate_size(window.size)
    same_unit = exact.split()[-1] == rough.split()[-1]  # then the exact size is already readable
    return f"{window} {exact}" if same_unit else f"{window} {exact} ({rough})"


def format_plan(plan: PciPlan, header: Callable[[], list[str]] | None = None) -> str:
    """The plan as `--dry-run` prints it: per segment its ECAM window, its apertures, its devices' BARs."""
    lines = header() if header is not None else []
    for w in plan.windows:
        w32, w64 = plan.weights[w.segment]
        ecam = layout.ecam_base(w.segment)
        ecam_end = ecam + layout.PCI_MMCONFIG_SIZE_PER_SEGMENT - 1
        lines.append(f"PCI segment {w.segment}: ECAM [{ecam:#x}-{ecam_end:#x}]")
        lines.append(f"  32-bit window {_window_text(w.mmio32)} (mmio32_aperture_weight={w32})")
        lines.append(f"  64-bit window {_window_text(w.mmio64)} (mmio64_aperture_weight={w64})")
        if w.segment == 0:
            lines.append("  0000:00:00.0 host bridge")
        for dev in plan.devices:
            if dev.item.segment != w.segment:
                continue
            what = f" ({dev.item.what})" if dev.item.what else ""
            lines.append(f"  {dev.bdf} {dev.item.label}{what}")
            for p in dev.placements:
                where = {BarKind.IO: "I/O ports", BarKind.MEM64: "64-bit window"}.get(p.kind, "32-bit window")
                end = p.address + p.size - 1
                lines.append(f"    {bar_text(p)} at [{p.address:#x}-{end:#x}] in the {where}")
            if not dev.placements:
                lines.append("    no BARs")
    return "\n".join(lines) + "\n"
