"""Address-range allocator for PCI windows and I/O port space (docs/pci.md#bar-allocation).

Placement is top-down first fit: free gaps are scanned from the highest address downwards and a request
lands at the highest address of the first gap that can hold it at the requested alignment. Guests and
users then see the same BAR addresses as under cloud-hypervisor.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

IO_SPACE_START = 0
IO_SPACE_END = 0xFFFF  # inclusive
IO_BAR_ALIGN = 4


class AllocatorError(ValueError):
    """A request that is malformed (not merely unsatisfiable)."""


@dataclass(frozen=True)
class AddressRange:
    start: int
    size: int

    @property
    def end(self) -> int:
        """Last address of the range (inclusive)."""
        return self.start + self.size - 1

    def __str__(self) -> str:
        return f"[{self.start:#x}-{self.end:#x}]"


def _check_align(align: int) -> None:
    if align <= 0 or align & (align - 1):
        raise AllocatorError(f"alignment {align:#x} is not a power of two")


def align_down(value: int, align: int) -> int:
    return value & ~(align - 1)


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class AddressAllocator:
    """Hands out non-overlapping ranges of `[start, end_inclusive]`."""

    def __init__(self, start: int, end_inclusive: int) -> None:
        if start < 0 or end_inclusive < start:
            raise AllocatorError(f"invalid allocator range {start:#x}-{end_inclusive:#x}")
        self.start = start
        self.end = end_inclusive
        self._starts: list[int] = []  # sorted allocation starts
        self._sizes: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"AddressAllocator({self.start:#x}-{self.end:#x}, {len(self._starts)} allocations)"

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def contains(self, addr: int, size: int = 1) -> bool:
        """Whether `[addr, addr + size)` lies inside the managed range."""
        return size > 0 and self.start <= addr and addr + size - 1 <= self.end

    def allocations(self) -> list[AddressRange]:
        return [AddressRange(s, self._sizes[s]) for s in self._starts]

    def size_of(self, addr: int) -> int | None:
        """Size of the allocation starting at `addr`, or None."""
        return self._sizes.get(addr)

    def free_ranges(self) -> list[AddressRange]:
        """Free gaps in ascending address order."""
        gaps: list[AddressRange] = []
        cursor = self.start
        for s in self._starts:
            if s > cursor:
                gaps.append(AddressRange(cursor, s - cursor))
            cursor = s + self._sizes[s]
        if cursor <= self.end:
            gaps.append(AddressRange(cursor, self.end + 1 - cursor))
        return gaps

    def allocate(self, size: int, align: int = 1) -> int | None:
        """Place `size` bytes at an `align`-aligned address, top-down first fit; None when full."""
        if size <= 0:
            raise AllocatorError(f"invalid allocation size {size:#x}")
        _check_align(align)
        for gap in reversed(self.free_ranges()):
            candidate = align_down(gap.start + gap.size - size, align)
            if candidate >= gap.start:
                self._insert(candidate, size)
                return candidate
        return None

    def allocate_at(self, addr: int, size: int, align: int = 1) -> bool:
        """Take exactly `[addr, addr + size)`; False if it is misaligned, outside or not free."""
        if size <= 0:
            raise AllocatorError(f"invalid allocation size {size:#x}")
        _check_align(align)
        if addr % align or not self.contains(addr, size):
            return False
        i = bisect.bisect_left(self._starts, addr)
        if i < len(self._starts) and self._starts[i] < addr + size:
            return False
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._sizes[prev] > addr:
                return False
        self._insert(addr, size)
        return True

    def free(self, addr: int) -> int:
        """Release the allocation starting at `addr`; returns its size."""
        size = self._sizes.pop(addr, None)
        if size is None:
            raise AllocatorError(f"no allocation starts at {addr:#x}")
        self._starts.remove(addr)
        return size

    def largest_free_aligned(self, align: int) -> AddressRange | None:
        """The largest free range that starts at an `align`-aligned address (None if there is none).

        Its size bounds what a naturally aligned request of alignment `align` could still get here.
        """
        _check_align(align)
        best: AddressRange | None = None
        for gap in self.free_ranges():
            start = align_up(gap.start, align)
            usable = gap.start + gap.size - start
            if usable > 0 and (best is None or usable > best.size):
                best = AddressRange(start, usable)
        return best

    def _insert(self, addr: int, size: int) -> None:
        bisect.insort(self._starts, addr)
        self._sizes[addr] = size


def io_allocator() -> AddressAllocator:
    """The VM-wide I/O port allocator `[0, 0x10000)`; use IO_BAR_ALIGN for I/O BARs."""
    return AddressAllocator(IO_SPACE_START, IO_SPACE_END)
