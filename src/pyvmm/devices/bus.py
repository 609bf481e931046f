"""Address-range dispatch for port I/O and MMIO exits.

Lookups run on vCPU threads without taking a lock: every change (insert/remove/move, on any thread) builds a
new immutable snapshot under a lock and publishes it with a single attribute store, which readers see
atomically. Lookup is a bisect over the sorted range bases.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int:
        """Value of `size` bytes at `offset` from the range base (extra high bits are discarded)."""
        ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class InterruptLine(Protocol):
    def set_level(self, asserted: bool) -> None:
        """Drive a level-triggered interrupt line (KVM_IRQ_LINE)."""
        ...


class BusError(Exception):
    """A refused bus registration (overlap, empty or out-of-range range, unknown base)."""


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: BusDevice

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.base + self.length

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.length


@dataclass(frozen=True)
class _Snapshot:
    bases: tuple[int, ...]
    ranges: tuple[BusRange, ...]


class IoBus:
    """Ranges [base, base+length) of an address space of `size` addresses, each served by one device.

    An access is dispatched to the range containing its first byte, with offset = addr - base; an access
    to no range reads all-ones and its writes are dropped.
    """

    def __init__(self, name: str = "bus", size: int = 1 << 64) -> None:
        self.name = name
        self.size = size
        self._lock = threading.Lock()
        self._snapshot = _Snapshot((), ())

    def __repr__(self) -> str:
        return f"IoBus({self.name!r}, {len(self._snapshot.ranges)} ranges)"

    # --- registration (any thread) -------------------------------------------------------------------------

    def insert(self, base: int, length: int, device: BusDevice) -> None:
        """Register `device` for [base, base+length); raises BusError on overlap or a bad range."""
        with self._lock:
            ranges = list(self._snapshot.ranges)
            self._check_free(ranges, base, length)
            ranges.append(BusRange(base, length, device))
            self._publish(ranges)

    def remove(self, base: int) -> BusDevice:
        """Unregister the range starting at `base` and return its device."""
        with self._lock:
            ranges = list(self._snapshot.ranges)
            index = self._index_of(base)
            removed = ranges.pop(index)
            self._publish(ranges)
            return removed.device

    def move(self, old_base: int, new_base: int, new_length: int | None = None) -> None:
        """Atomically re-register the range at `old_base` at `new_base` (e.g. a PCI BAR reprogrammed)."""
        with self._lock:
            ranges = list(self._snapshot.ranges)
            old = ranges.pop(self._index_of(old_base))
            length = old.length if new_length is None else new_length
            self._check_free(ranges, new_base, length)
            ranges.append(BusRange(new_base, length, old.device))
            self._publish(ranges)

    def _index_of(self, base: int) -> int:
        snapshot = self._snapshot
        i = bisect.bisect_left(snapshot.bases, base)
        if i == len(snapshot.bases) or snapshot.bases[i] != base:
            raise BusError(f"{self.name}: no range registered at {base:#x}")
        return i

    def _check_free(self, ranges: list[BusRange], base: int, length: int) -> None:
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x} (length {length})")
        if base < 0 or base + length > self.size:
            raise BusError(f"{self.name}: range {base:#x}+{length:#x} is outside the bus")
        for r in ranges:
            if base < r.end and r.base < base + length:
                raise BusError(
                    f"{self.name}: range {base:#x}-{base + length - 1:#x} overlaps "
                    f"{r.base:#x}-{r.end - 1:#x} ({type(r.device).__name__})"
                )

    def _publish(self, ranges: list[BusRange]) -> None:
        ranges.sort(key=lambda r: r.base)
        self._snapshot = _Snapshot(tuple(r.base for r in ranges), tuple(ranges))

    # --- lookup and dispatch (vCPU threads, lock-free) -----------------------------------------------------

    def ranges(self) -> tuple[BusRange, ...]:
        return self._snapshot.ranges

    def find(self, addr: int) -> BusRange | None:
        """The range containing `addr`, if any."""
        snapshot = self._snapshot
        i = bisect.bisect_right(snapshot.bases, addr) - 1
        if i >= 0:
            r = snapshot.ranges[i]
            if addr < r.base + r.length:
                return r
        return None

    def read(self, addr: int, size: int) -> int:
        snapshot = self._snapshot
        i = bisect.bisect_right(snapshot.bases, addr) - 1
        mask = (1 << (size * 8)) - 1
        if i >= 0:
            r = snapshot.ranges[i]
            offset = addr - r.base
            if offset < r.length:
                return r.device.read(offset, size) & mask
        return mask

    def write(self, addr: int, size: int, value: int) -> None:
        snapshot = self._snapshot
        i = bisect.bisect_right(snapshot.bases, addr) - 1
        if i >= 0:
            r = snapshot.ranges[i]
            offset = addr - r.base
            if offset < r.length:
                r.device.write(offset, size, value)
