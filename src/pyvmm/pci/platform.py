"""The VM's PCI platform: its segments, their configuration windows on the buses, and every device's BARs.

One object does the wiring that used to be repeated by each kind of device (virtio, VFIO) and by the
fuzzers: the builder, the device attachers and the fuzz harnesses all plug devices in through
`PciPlatform.attach`, and every guest BAR move goes through `_move_bar`. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pyvmm import layout
from pyvmm.hypervisor import MemorySlots
from pyvmm.pci.allocator import AddressAllocator, io_allocator
from pyvmm.pci.apertures import SegmentWindows
from pyvmm.pci.bar import BarKind, BarMove
from pyvmm.pci.bus import BarPlacement, PciConfigIo, PciConfigMmio, PciError, PciSegment, SlotError
from pyvmm.pci.device import BarBusAdapter, PciDevice

log = logging.getLogger(__name__)


class AddressBus(Protocol):
    """The registration side of an I/O-port or MMIO bus (devices.bus.IoBus)."""

    def insert(self, base: int, length: int, device: Any) -> None: ...

    def remove(self, base: int) -> Any: ...

    def move(self, old_base: int, new_base: int) -> None: ...


@dataclass(frozen=True, order=True)
class PciAddress:
    """Where a device sits: segment and slot (always function 0, bus 0)."""

    segment: int
    slot: int

    def __str__(self) -> str:
        return f"{self.segment:04x}:00:{self.slot:02x}.0"


class PciPlatform:
    """Segments with their ECAM windows on the MMIO bus, 0xCF8 for segment 0 on the port bus, one VM-wide
    I/O port allocator, and the attach/detach/BAR-move wiring between devices and the buses.

    `memory_slots` (when the VM has them) is where device models map host memory (VFIO BAR areas) into the
    guest; the same allocator numbers the RAM slots, so slot numbers are decided in one place.
    """

    def __init__(
        self,
        windows: Sequence[SegmentWindows],
        *,
        pio_bus: AddressBus,
        mmio_bus: AddressBus,
        memory_slots: MemorySlots | None = None,
        page_size: int = mmap.PAGESIZE,
    ) -> None:
        if not windows:
            raise PciError("a PCI platform needs at least one segment")
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.memory_slots = memory_slots
        self.io: AddressAllocator = io_allocator()
        # one lock for every slot, placement and allocator (docs/hotplug.md#thread-safety): hot-plug and eject
        # against guest BAR moves; reentrant, since attach holds it while the segment takes it again
        self.lock = threading.RLock()
        self.segments = [PciSegment(w.segment, w, self.io, on_bar_move=self._move_bar, page_size=page_size,
                                    lock=self.lock) for w in windows]
        self.refused_moves = 0  # BAR moves the buses refused (an overlap the allocators did not see)
        for segment in self.segments:
            mmio_bus.insert(segment.ecam_base, layout.PCI_MMCONFIG_SIZE_PER_SEGMENT, PciConfigMmio(segment))
        self.config_io = PciConfigIo(self.segments[0])  # 0xCF8-0xCFF
        pio_bus.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE, self.config_io)

    def __repr__(self) -> str:
        return f"PciPlatform({len(self.segments)} segments)"

    # ---- topology -------------------------------------------------------------------------------------

    def segment(self, segment_id: int) -> PciSegment:
        if not 0 <= segment_id < len(self.segments):
            raise SlotError(f"PCI segment {segment_id} does not exist (this VM has {len(self.segments)}: "
                            "--platform num_pci_segments=N)")
        return self.segments[segment_id]

    def reserve_slot(self, segment_id: int, slot: int) -> None:
        """Keep `slot` for a device that names it, so that automatic placement never takes it."""
        self.segment(segment_id).reserve_slot(slot)

    def attach(self, device: PciDevice, segment_id: int = 0, slot: int | None = None) -> PciAddress:
        """Plug `device` in (the given slot or the lowest free one), place its BARs and serve them on the
        buses. PciError (exit 2) when the slot is taken or a BAR does not fit; nothing is left behind."""
        with self.lock:
            return self._attach(device, segment_id, slot)

    def _attach(self, device: PciDevice, segment_id: int, slot: int | None) -> PciAddress:
        segment = self.segment(segment_id)
        slot = segment.add_device(device, slot)
        inserted: list[BarPlacement] = []
        try:
            for placement in segment.placements(slot):
                self._bus(placement.kind).insert(placement.address, placement.size,
                                                 BarBusAdapter(device, placement.index))
                inserted.append(placement)
        except Exception as exc:
            for placement in inserted:
                self._bus(placement.kind).remove(placement.address)
            segment.remove_device(slot)
            raise PciError(f"{device.name}: cannot serve its BARs: {exc}") from exc
        return PciAddress(segment_id, slot)

    def detach(self, address: PciAddress) -> PciDevice:
        """Take the device at `address` off the buses and free its slot and BAR ranges."""
        with self.lock:
            segment = self.segment(address.segment)
            for placement in segment.placements(address.slot):
                self._bus(placement.kind).remove(placement.address)
            return segment.remove_device(address.slot)

    def placements(self, address: PciAddress) -> list[BarPlacement]:
        return self.segment(address.segment).placements(address.slot)

    def device(self, address: PciAddress) -> PciDevice | None:
        return self.segment(address.segment).device(address.slot)

    def devices(self) -> Iterator[tuple[PciAddress, PciDevice]]:
        """Every plugged device (the host bridge included), in address order."""
        for segment in self.segments:
            for slot, device in segment.devices().items():
                yield PciAddress(segment.id, slot), device

    # ---- guest BAR moves ------------------------------------------------------------------------------

    def _bus(self, kind: BarKind) -> AddressBus:
        return self.pio_bus if kind == BarKind.IO else self.mmio_bus

    def bus_for(self, kind: BarKind) -> AddressBus:
        """The bus a BAR of `kind` is served on."""
        return self._bus(kind)

    def _move_bar(self, device: PciDevice, move: BarMove) -> bool:
        """Called by a segment once the new range is reserved in its window: move the bus range. False
        refuses the move (the segment rolls back and the BAR register reads the old address again)."""
        kind = next((b.kind for b in device.bars() if b.index == move.bar_index), None)
        if kind is None:
            return False
        try:
            self._bus(kind).move(move.old, move.new)
        except Exception:  # an overlap on the bus that the window allocators did not see
            self.refused_moves += 1
            log.warning("cannot move BAR%d of %s to %#x", move.bar_index, device.name, move.new,
                        exc_info=True)
            return False
        return True
