"""The interface a PCI function implements to sit on a PciSegment, and a BAR-to-bus adapter."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial

from pyvmm.pci.bar import BarInfo, BarKind, BarMove
from pyvmm.pci.config import InterruptPin, PciConfiguration

log = logging.getLogger(__name__)

__all__ = ["BarBusAdapter", "BarInfo", "BarKind", "BarMove", "ConfigSpaceDevice", "PciDevice"]


class PciDevice(ABC):
    """One PCI function (always function 0 of its slot).

    Guest-controlled calls (config_*, bar_*) must never raise: bad accesses read all-ones or are dropped.
    """

    name: str = "pci-device"

    @abstractmethod
    def config_read(self, offset: int, size: int) -> int:
        """Read `size` bytes of configuration space at `offset`."""

    @abstractmethod
    def config_write(self, offset: int, size: int, value: int) -> list[BarMove]:
        """Write configuration space; returns BAR moves that the platform must now carry out."""

    @abstractmethod
    def bars(self) -> list[BarInfo]:
        """The BARs to allocate (sizes and kinds)."""

    @abstractmethod
    def assign_bar(self, index: int, address: int) -> None:
        """The platform placed BAR `index` at `address` (at creation)."""

    @abstractmethod
    def bar_move_refused(self, move: BarMove) -> None:
        """The platform could not carry out `move`: the BAR register must read `move.old` again."""

    def bar_moved(self, move: BarMove) -> None:  # noqa: B027 - optional hook
        """The platform carried out `move` (bus ranges already moved); e.g. remap memory slots."""

    def assign_intx(self, irq: int) -> None:  # noqa: B027 - optional hook
        """The legacy interrupt line of this slot (devices without INTx ignore it)."""

    @abstractmethod
    def bar_read(self, index: int, offset: int, size: int) -> int:
        """A trapped read of BAR `index` at `offset` from its base."""

    @abstractmethod
    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        """A trapped write of BAR `index` at `offset` from its base."""


class ConfigSpaceDevice(PciDevice):
    """A device whose whole configuration space is an emulated PciConfiguration.

    Subclasses override bar_read/bar_write for the registers behind their BARs.
    """

    def __init__(self, config: PciConfiguration, name: str = "pci-device") -> None:
        self.config = config
        self.name = name

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> list[BarMove]:
        return self.config.write(offset, size, value)

    def bars(self) -> list[BarInfo]:
        return self.config.bars()

    def assign_bar(self, index: int, address: int) -> None:
        self.config.set_bar_address(index, address)

    def bar_move_refused(self, move: BarMove) -> None:
        self.config.cancel_move(move)

    def assign_intx(self, irq: int) -> None:
        if self.config.interrupt_pin != InterruptPin.NONE:
            self.config.set_interrupt_line(irq)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        log.debug("%s: read of unemulated BAR%d offset %#x", self.name, index, offset)
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        log.debug("%s: write to unemulated BAR%d offset %#x dropped", self.name, index, offset)


class BarBusAdapter:
    """Presents one BAR of a device as a bus device (read/write at an offset from the BAR base).

    Offsets are relative, so the same adapter stays valid when the guest moves the BAR.
    """

    read: Callable[[int, int], int]  # (offset, size) -> device.bar_read(index, offset, size)
    write: Callable[[int, int, int], None]  # (offset, size, value) -> device.bar_write(index, ...)

    def __init__(self, device: PciDevice, index: int) -> None:
        self.device = device
        self.index = index
        # partial objects, not methods: a trapped BAR access is one Python call less (it is a vCPU exit)
        self.read = partial(device.bar_read, index)
        self.write = partial(device.bar_write, index)

    def __repr__(self) -> str:
        return f"BarBusAdapter({self.device.name}, BAR{self.index})"
