"""PCI segments (one bus of 32 slots each), BAR placement, and the two config-access mechanisms.

docs/pci.md#config-space-access, #slot-assignment, #bar-allocation, #bar-relocation-by-the-guest. Every device
is function 0 of its slot; unlike cloud-hypervisor, accesses to functions 1-7 read all-ones and writes to them
are dropped, on both ECAM and port 0xCF8.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm import layout
from pyvmm.errors import UsageError
from pyvmm.pci.allocator import IO_BAR_ALIGN, AddressAllocator, AddressRange
from pyvmm.pci.apertures import SegmentWindows
from pyvmm.pci.bar import BarInfo, BarKind, BarMove
from pyvmm.pci.config import PciConfiguration
from pyvmm.pci.device import ConfigSpaceDevice, PciDevice

log = logging.getLogger(__name__)

NUM_SLOTS = 32
NUM_FUNCTIONS = 8
HOST_BRIDGE_VENDOR_ID = 0x8086
HOST_BRIDGE_DEVICE_ID = 0x0D57
CLASS_BRIDGE = 0x06
SUBCLASS_HOST_BRIDGE = 0x00

BarMoveCallback = Callable[[PciDevice, BarMove], bool]


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class PciError(UsageError):
    """A PCI topology or resource problem caused by configuration (not by the guest): exit status 2."""


class SlotError(PciError):
    pass


class BarAllocationError(PciError):
    """No aligned free range for a BAR in the window it must live in (docs/pci.md#32-bit-exhaustion)."""

    def __init__(
        self,
        device: str,
        bar: BarInfo,
        align: int,
        segment: int,
        window: str,
        window_range: AddressRange,
        largest_free: AddressRange | None,
    ) -> None:
        self.device = device
        self.bar = bar
        self.align = align
        self.segment = segment
        self.window = window
        self.window_range = window_range
        self.largest_free = largest_free
        free = f"{largest_free.size:#x} bytes at {largest_free.start:#x}" if largest_free else "none"
        super().__init__(
            f"cannot place BAR{bar.index} ({bar.kind.name}, {bar.size} bytes) of {device}: "
            f"no free {align:#x}-aligned range in the {window} of PCI segment {segment} "
            f"{window_range} ({window_range.size:#x} bytes); largest free aligned range: {free}"
        )


@dataclass(frozen=True)
class BarPlacement:
    index: int
    kind: BarKind
    address: int
    size: int


class HostBridge(ConfigSpaceDevice):
    """The host bridge in slot 0 of segment 0 (no BARs, no interrupt)."""

    def __init__(self) -> None:
        config = PciConfiguration(
            HOST_BRIDGE_VENDOR_ID, HOST_BRIDGE_DEVICE_ID, CLASS_BRIDGE, SUBCLASS_HOST_BRIDGE
        )
        super().__init__(config, "host-bridge")


class PciSegment:
    """One PCI segment: bus 0, slots 0-31, BAR windows, and the executor of guest BAR moves.

    `on_bar_move(device, move)` is called after the new range has been reserved in the window; it moves the
    bus ranges (and whatever else is needed) and returns False to refuse, which rolls everything back.

    `lock` guards the slots, placements and allocators: a device plugged or unplugged on another thread (a
    hot-plug from the API, an eject on a vCPU) must not interleave with a guest's BAR move, which frees its
    old range before it takes the new one. The platform gives every segment the same lock, since they share
    the I/O port allocator.
    """

    def __init__(
        self,
        segment_id: int,
        windows: SegmentWindows,
        io_allocator: AddressAllocator | None = None,
        on_bar_move: BarMoveCallback | None = None,
        page_size: int = mmap.PAGESIZE,
        lock: threading.RLock | None = None,
    ) -> None:
        if segment_id < 0:
            raise ValueError(f"invalid PCI segment id {segment_id}")
        self.id = segment_id
        self.windows = windows
        self.mmio32 = AddressAllocator(windows.mmio32.start, windows.mmio32.end)
        self.mmio64 = AddressAllocator(windows.mmio64.start, windows.mmio64.end)
        self.io = io_allocator
        self.on_bar_move = on_bar_move
        self.page_size = page_size
        self.lock = lock if lock is not None else threading.RLock()
        self._slots: dict[int, PciDevice] = {}
        self._reserved: set[int] = set()
        self._placements: dict[int, dict[int, BarPlacement]] = {}
        if segment_id == 0:
            self._slots[0] = HostBridge()
            self._placements[0] = {}

    def __repr__(self) -> str:
        return f"PciSegment({self.id}, slots={sorted(self._slots)})"

    @property
    def ecam_base(self) -> int:
        return layout.ecam_base(self.id)

    # ---- slots --------------------------------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < NUM_SLOTS:
            raise SlotError(f"PCI slot {slot} is out of range 0-{NUM_SLOTS - 1} on segment {self.id}")
        if slot == 0 and self.id == 0:
            raise SlotError("PCI slot 0 of segment 0 is reserved for the host bridge")
        if slot in self._slots:
            raise SlotError(f"PCI slot {slot} of segment {self.id} is already in use")

    def reserve_slot(self, slot: int) -> None:
        """Keep `slot` for a device that names it explicitly, so automatic placement skips it."""
        with self.lock:
            self._reserve_slot(slot)

    def _reserve_slot(self, slot: int) -> None:
        self._check_slot(slot)
        if slot in self._reserved:
            raise SlotError(f"PCI slot {slot} of segment {self.id} is requested twice")
        self._reserved.add(slot)

    def _free_slot(self) -> int:
        for slot in range(NUM_SLOTS):
            if slot not in self._slots and slot not in self._reserved:
                return slot
        raise SlotError(f"PCI segment {self.id} has no free slot")

    def add_device(self, device: PciDevice, slot: int | None = None) -> int:
        """Plug `device` in (explicit or lowest free slot), place its BARs and set its INTx line."""
        with self.lock:
            return self._add_device(device, slot)

    def _add_device(self, device: PciDevice, slot: int | None) -> int:
        if slot is None:
            slot = self._free_slot()
        else:
            self._check_slot(slot)
        placements = self._allocate_bars(device)
        for p in placements.values():
            device.assign_bar(p.index, p.address)
        device.assign_intx(self.intx_irq(slot))
        self._reserved.discard(slot)
        self._slots[slot] = device
        self._placements[slot] = placements
        return slot

    def remove_device(self, slot: int) -> PciDevice:
        """Unplug the device in `slot` and release its BARs."""
        with self.lock:
            return self._remove_device(slot)

    def _remove_device(self, slot: int) -> PciDevice:
        if slot not in self._slots or (slot == 0 and self.id == 0):
            raise SlotError(f"no removable device in PCI slot {slot} of segment {self.id}")
        for p in self._placements.pop(slot).values():
            self._allocator(p.kind).free(p.address)
        return self._slots.pop(slot)

    def device(self, slot: int) -> PciDevice | None:
        return self._slots.get(slot)

    def devices(self) -> dict[int, PciDevice]:
        return dict(sorted(self._slots.items()))

    def slot_of(self, device: PciDevice) -> int:
        for slot, dev in self._slots.items():
            if dev is device:
                return slot
        raise SlotError(f"{device.name} is not on PCI segment {self.id}")

    def placements(self, slot: int) -> list[BarPlacement]:
        """Current guest addresses of the BARs of the device in `slot`."""
        with self.lock:
            return sorted(self._placements.get(slot, {}).values(), key=lambda p: p.index)

    @staticmethod
    def intx_irq(slot: int) -> int:
        return layout.PCI_INTX_IRQS[slot % len(layout.PCI_INTX_IRQS)]

    # ---- BAR placement ------------------------------------------------------------------------------

    def _allocator(self, kind: BarKind) -> AddressAllocator:
        if kind == BarKind.IO:
            if self.io is None:
                raise PciError(f"PCI segment {self.id} has no I/O port allocator for I/O BARs")
            return self.io
        return self.mmio64 if kind == BarKind.MEM64 else self.mmio32

    def bar_alignment(self, bar: BarInfo) -> int:
        if bar.kind == BarKind.IO:
            # Naturally aligned, as the address bits below an I/O BAR's size are hard-wired to zero.
            align = max(IO_BAR_ALIGN, bar.size)
        elif bar.kind == BarKind.MEM64:
            align = max(self.page_size, bar.size)
        else:
            align = bar.size
        return max(align, bar.align)

    def _allocate_bars(self, device: PciDevice) -> dict[int, BarPlacement]:
        placed: dict[int, BarPlacement] = {}
        try:
            for bar in sorted(device.bars(), key=lambda b: b.index):
                allocator = self._allocator(bar.kind)
                align = self.bar_alignment(bar)
                address = allocator.allocate(bar.size, align)
                if address is None:
                    window = {
                        BarKind.IO: "I/O port space",
                        BarKind.MEM64: "64-bit window",
                    }.get(bar.kind, "32-bit window")
                    raise BarAllocationError(
                        device.name,
                        bar,
                        align,
                        self.id,
                        window,
                        AddressRange(allocator.start, allocator.size),
                        allocator.largest_free_aligned(align),
                    )
                placed[bar.index] = BarPlacement(bar.index, bar.kind, address, bar.size)
        except PciError:
            for p in placed.values():
                self._allocator(p.kind).free(p.address)
            raise
        return placed

    def _execute_move(self, slot: int, device: PciDevice, move: BarMove) -> bool:
        placement = self._placements[slot].get(move.bar_index)
        if placement is None or placement.address != move.old or placement.size != move.length:
            log.warning(
                "%s: BAR%d move %#x -> %#x does not match its placement, keeping old BAR",
                device.name,
                move.bar_index,
                move.old,
                move.new,
            )
            device.bar_move_refused(move)
            return False
        allocator = self._allocator(placement.kind)
        align = max(IO_BAR_ALIGN, move.length)
        allocator.free(move.old)
        if not allocator.allocate_at(move.new, move.length, align):
            allocator.allocate_at(move.old, move.length)
            log.warning(
                "%s: cannot move BAR%d from %#x to %#x (outside its window, misaligned or "
                "in use), keeping old BAR",
                device.name,
                move.bar_index,
                move.old,
                move.new,
            )
            device.bar_move_refused(move)
            return False
        if self.on_bar_move is not None and not self._call_on_bar_move(device, move):
            allocator.free(move.new)
            allocator.allocate_at(move.old, move.length)
            log.warning(
                "%s: failed moving BAR%d from %#x to %#x, keeping old BAR",
                device.name,
                move.bar_index,
                move.old,
                move.new,
            )
            device.bar_move_refused(move)
            return False
        self._placements[slot][move.bar_index] = BarPlacement(
            placement.index, placement.kind, move.new, placement.size
        )
        device.bar_moved(move)
        return True

    def _call_on_bar_move(self, device: PciDevice, move: BarMove) -> bool:
        """The callback's verdict; one that raises (e.g. a bus refusing an overlap) refuses the move, since
        the guest's config write must not fail."""
        assert self.on_bar_move is not None
        try:
            return bool(self.on_bar_move(device, move))
        except Exception:
            log.warning(
                "%s: moving BAR%d to %#x failed", device.name, move.bar_index, move.new, exc_info=True
            )
            return False

    # ---- configuration access -----------------------------------------------------------------------

    def config_read(self, slot: int, function: int, offset: int, size: int) -> int:
        device = self._slots.get(slot)
        if device is None or function != 0:
            return _ones(size)
        return device.config_read(offset, size)

    def config_write(self, slot: int, function: int, offset: int, size: int, value: int) -> None:
        device = self._slots.get(slot)
        if device is None or function != 0:
            log.debug("config write to empty %02x.%x dropped", slot, function)
            return
        for move in device.config_write(offset, size, value):
            with self.lock:
                if self._slots.get(slot) is not device:  # unplugged meanwhile (an eject on another vCPU)
                    device.bar_move_refused(move)
                    continue
                self._execute_move(slot, device, move)


class PciConfigMmio:
    """The ECAM window of one segment as a bus device (offsets from the window base)."""

    def __init__(self, segment: PciSegment) -> None:
        self.segment = segment

    @staticmethod
    def _decode(offset: int, size: int) -> tuple[int, int, int] | None:
        if size not in (1, 2, 4) or offset < 0 or offset % 4 + size > 4:
            return None
        if (offset >> 20) & 0xFF:  # bus number: only bus 0 exists
            return None
        return (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, size: int) -> int:
        # _decode inlined: every config read of the guest's PCI probing (and of a passed-through device's
        # extended capabilities) is one MMIO exit through here.
        if size not in (1, 2, 4) or offset < 0 or offset % 4 + size > 4 or offset & 0x0FF0_0000:
            log.debug("ECAM read %#x+%d not served", offset, size)
            return _ones(size)
        return self.segment.config_read((offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF, size)

    def write(self, offset: int, size: int, value: int) -> None:
        decoded = self._decode(offset, size)
        if decoded is None:
            log.debug("ECAM write %#x+%d dropped", offset, size)
            return
        slot, function, register = decoded
        self.segment.config_write(slot, function, register, size, value & _ones(size))


CONFIG_ADDRESS_ENABLE = 1 << 31
_CONFIG_ADDRESS_MASK = 0x80FF_FFFC  # enable, bus, device, function, register; reserved bits read 0


class PciConfigIo:
    """Configuration mechanism #1 (ports 0xCF8-0xCFF) for segment 0: the first 256 bytes per function."""

    def __init__(self, segment: PciSegment) -> None:
        self.segment = segment
        self.address = 0

    def _target(self, data_offset: int, size: int) -> tuple[int, int] | None:
        """(slot, register) addressed by the data port, or None when nothing answers."""
        if not self.address & CONFIG_ADDRESS_ENABLE or data_offset + size > 4:
            return None
        bus = (self.address >> 16) & 0xFF
        function = (self.address >> 8) & 0x7
        if bus != 0 or function != 0:
            return None
        return (self.address >> 11) & 0x1F, (self.address & 0xFC) + data_offset

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0:
            return _ones(max(size, 0))
        if offset + size <= 4:
            return (self.address >> (8 * offset)) & _ones(size)
        target = self._target(offset - 4, size) if offset >= 4 else None
        if target is None:
            return _ones(size)
        slot, register = target
        return self.segment.config_read(slot, 0, register, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0:
            return
        value &= _ones(size)
        if offset + size <= 4:
            shift = 8 * offset
            merged = (self.address & ~(_ones(size) << shift)) | (value << shift)
            self.address = merged & _CONFIG_ADDRESS_MASK
            return
        target = self._target(offset - 4, size) if offset >= 4 else None
        if target is None:
            log.debug("config write through 0xCF8/0xCFC dropped (address %#x)", self.address)
            return
        slot, register = target
        self.segment.config_write(slot, 0, register, size, value)
