"""Plain data describing BARs: their kind, what a device needs, and guest-requested moves."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

NUM_BARS = 6
ROM_BAR_INDEX = 6  # the expansion ROM is addressed as BAR index 6 (as VFIO numbers regions)

MEM_BAR_MIN_SIZE = 16
IO_BAR_MIN_SIZE = 4
ROM_BAR_MIN_SIZE = 2048


class BarKind(IntEnum):
    IO = 0
    MEM32 = 1
    MEM64 = 2
    ROM = 3


@dataclass(frozen=True)
class BarInfo:
    """A BAR a device wants placed. `align` (optional) asks for more than the default alignment."""

    index: int
    kind: BarKind
    size: int
    prefetchable: bool = False
    align: int = 0


@dataclass(frozen=True)
class BarMove:
    """The guest reprogrammed BAR `bar_index` from `old` to `new` (both `length` bytes long)."""

    bar_index: int
    old: int
    new: int
    length: int
