"""Split of the 32-bit and 64-bit PCI device areas among segments (docs/pci.md#aperture-weights).

Each segment gets `weight * unit` bytes, contiguous in segment order, where `unit` is the per-weight share
rounded down to the area's alignment (4 KiB below 4 GiB, 4 GiB above); the last segment takes whatever is
left, so the whole area is always handed out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm import layout

MMIO32_ALIGN = 4 * layout.KiB
MMIO64_ALIGN = 4 * layout.GiB


@dataclass(frozen=True)
class Window:
    """An inclusive guest-physical range `[start, end]`."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.start <= addr and addr + size - 1 <= self.end

    def __str__(self) -> str:
        return f"[{self.start:#x}-{self.end:#x}]"


@dataclass(frozen=True)
class SegmentWindows:
    """The device-memory windows of one PCI segment."""

    segment: int
    mmio32: Window
    mmio64: Window


def mmio32_aperture() -> Window:
    """The 32-bit PCI device area below the ECAM window."""
    start = layout.MEM_32BIT_DEVICES_START
    return Window(start, start + layout.MEM_32BIT_DEVICES_SIZE - 1)


def mmio64_aperture(ram_size: int, phys_bits: int = layout.DEFAULT_MAX_PHYS_BITS) -> Window:
    """The 64-bit PCI device area above RAM (no memory hotplug)."""
    start, end = layout.mmio64_area(ram_size, phys_bits)
    return Window(start, end)


def split_aperture(area: Window, weights: Sequence[int], align: int) -> list[Window]:
    """Divide `area` among len(weights) segments in proportion to their weights."""
    if not weights:
        raise ValueError("at least one PCI segment is needed")
    if any(w <= 0 for w in weights):
        raise ValueError(f"invalid PCI segment aperture weight: {min(weights)}")
    total = sum(weights)
    unit = area.size // (align * total) * align
    if unit == 0 and len(weights) > 1:
        raise ValueError(
            f"device area {area} is too small to split among {len(weights)} PCI segments "
            f"in units of {align:#x} bytes"
        )
    windows: list[Window] = []
    k = 0
    for s, weight in enumerate(weights):
        base = area.start + k * unit
        end = area.end if s == len(weights) - 1 else base + unit * weight - 1
        windows.append(Window(base, end))
        k += weight
    return windows


def segment_windows(
    mmio32_weights: Sequence[int],
    mmio64_weights: Sequence[int],
    mmio64_area: Window,
    mmio32_area: Window | None = None,
) -> list[SegmentWindows]:
    """Per-segment 32-bit and 64-bit windows; both weight lists have one entry per segment."""
    if len(mmio32_weights) != len(mmio64_weights):
        raise ValueError(f"{len(mmio32_weights)} mmio32 weights but {len(mmio64_weights)} mmio64 weights")
    low = split_aperture(mmio32_area or mmio32_aperture(), mmio32_weights, MMIO32_ALIGN)
    high = split_aperture(mmio64_area, mmio64_weights, MMIO64_ALIGN)
    return [SegmentWindows(s, lo, hi) for s, (lo, hi) in enumerate(zip(low, high, strict=True))]
