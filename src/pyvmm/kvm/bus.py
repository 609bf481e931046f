"""What the vCPU loop dispatches I/O exits to: a bus, read and written by absolute address.

kvm/ needs nothing more of the device side; pyvmm.devices.bus.IoBus provides it (structurally: it does not
import this module, so devices/ and kvm/ stay independent).
"""

from __future__ import annotations

from typing import Protocol


class Bus(Protocol):
    """A port-I/O or MMIO address space; `size` is 1, 2, 4 or 8 bytes, values are little-endian ints."""

    def read(self, addr: int, size: int) -> int: ...
    def write(self, addr: int, size: int, value: int) -> None: ...
