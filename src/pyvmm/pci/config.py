"""A type-0 PCI configuration space (4 KiB) with shadow BAR registers
(docs/pci.md#shadow-bar-registers, docs/pci.md#bar-relocation-by-the-guest).

Every byte has a writable mask; BAR and expansion-ROM dwords follow the sizing protocol and report guest
relocations as BarMove objects; capability bodies can be plain bytes or delegated to a handler object
(MSI/MSI-X emulation). Guest accesses never raise: out-of-range reads answer all-ones, writes are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Protocol

from pyvmm.pci.bar import (
    IO_BAR_MIN_SIZE,
    MEM_BAR_MIN_SIZE,
    NUM_BARS,
    ROM_BAR_INDEX,
    ROM_BAR_MIN_SIZE,
    BarInfo,
    BarKind,
    BarMove,
)

log = logging.getLogger(__name__)

CONFIG_SPACE_SIZE = 4096
LEGACY_CONFIG_SIZE = 256
CAPABILITY_LIST_START = 0x40

_U32 = 0xFFFF_FFFF
_MEM_ADDR_MASK = 0xFFFF_FFF0
_IO_ADDR_MASK = 0xFFFF_FFFC
_ROM_ADDR_MASK = 0xFFFF_F800


class Reg(IntEnum):
    """Byte offsets of type-0 header fields."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    PROG_IF = 0x09
    SUBCLASS = 0x0A
    CLASS_CODE = 0x0B
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BAR0 = 0x10
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM_ADDRESS = 0x30
    CAPABILITIES_POINTER = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


class Command(IntFlag):
    IO_SPACE = 1 << 0
    MEMORY_SPACE = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY_ERROR_RESPONSE = 1 << 6
    SERR_ENABLE = 1 << 8
    INTX_DISABLE = 1 << 10


class Status(IntFlag):
    INTERRUPT_STATUS = 1 << 3
    CAPABILITIES_LIST = 1 << 4


class InterruptPin(IntEnum):
    NONE = 0
    INTA = 1
    INTB = 2
    INTC = 3
    INTD = 4


# Command bits a guest may change on an emulated device.
_COMMAND_WRITABLE = (
    Command.IO_SPACE
    | Command.MEMORY_SPACE
    | Command.BUS_MASTER
    | Command.PARITY_ERROR_RESPONSE
    | Command.SERR_ENABLE
    | Command.INTX_DISABLE
)


class CapabilityHandler(Protocol):
    """Emulates the body of one capability; offsets are from the capability start (the id byte).

    Only offsets 2 and up (after the id and next-pointer bytes, which the configuration keeps) are passed,
    with sizes 1 to 4 that never cross a dword.
    """

    @property
    def cap_id(self) -> int: ...

    @property
    def length(self) -> int: ...  # bytes, including the 2-byte header

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass
class _Bar:
    info: BarInfo
    address: int = 0  # where the device currently is (last assigned or guest-programmed)
    rom_enable: bool = False

    @property
    def low_reg(self) -> int:
        i = self.info.index
        return Reg.ROM_ADDRESS // 4 if i == ROM_BAR_INDEX else Reg.BAR0 // 4 + i


@dataclass
class _HandlerRegion:
    start: int  # capability offset
    end: int  # exclusive
    handler: CapabilityHandler


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class PciConfiguration:
    """Configuration space of one PCI function (type-0 header)."""

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        subclass: int,
        prog_if: int = 0,
        revision_id: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: InterruptPin = InterruptPin.NONE,
    ) -> None:
        for name, value, bits in (
            ("vendor id", vendor_id, 16),
            ("device id", device_id, 16),
            ("class code", class_code, 8),
            ("subclass", subclass, 8),
            ("programming interface", prog_if, 8),
            ("revision id", revision_id, 8),
            ("subsystem vendor id", subsystem_vendor_id, 16),
            ("subsystem id", subsystem_id, 16),
        ):
            if not 0 <= value < 1 << bits:
                raise ValueError(f"PCI {name} {value:#x} does not fit in {bits} bits")
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._mask = bytearray(CONFIG_SPACE_SIZE)
        self._bars: dict[int, _Bar] = {}
        self._bar_regs: dict[int, tuple[int, bool]] = {}  # dword index -> (bar index, is upper half)
        self._pending: dict[int, BarMove] = {}
        self._handlers: list[_HandlerRegion] = []
        self._last_cap: int | None = None
        self._next_cap = CAPABILITY_LIST_START

        self.poke(Reg.VENDOR_ID, 2, vendor_id)
        self.poke(Reg.DEVICE_ID, 2, device_id)
        self.poke(Reg.REVISION_ID, 1, revision_id)
        self.poke(Reg.PROG_IF, 1, prog_if)
        self.poke(Reg.SUBCLASS, 1, subclass)
        self.poke(Reg.CLASS_CODE, 1, class_code)
        self.poke(Reg.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.poke(Reg.SUBSYSTEM_ID, 2, subsystem_id)
        self.poke(Reg.INTERRUPT_PIN, 1, int(interrupt_pin))
        self._set_mask(Reg.COMMAND, 2, int(_COMMAND_WRITABLE))
        self._set_mask(Reg.CACHE_LINE_SIZE, 1, 0xFF)
        self._set_mask(Reg.LATENCY_TIMER, 1, 0xFF)
        self._set_mask(Reg.INTERRUPT_LINE, 1, 0xFF)

    # ---- plain fields -------------------------------------------------------------------------------

    @property
    def vendor_id(self) -> int:
        return self.peek(Reg.VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.peek(Reg.DEVICE_ID, 2)

    @property
    def command(self) -> Command:
        return Command(self.peek(Reg.COMMAND, 2))

    @property
    def interrupt_pin(self) -> InterruptPin:
        return InterruptPin(self.peek(Reg.INTERRUPT_PIN, 1))

    def set_interrupt_line(self, irq: int) -> None:
        if not 0 <= irq <= 0xFF:
            raise ValueError(f"interrupt line {irq} does not fit in a byte")
        self.poke(Reg.INTERRUPT_LINE, 1, irq)

    def set_status(self, flags: Status, on: bool) -> None:
        """Set or clear device-owned status bits (e.g. INTx interrupt status)."""
        status = self.peek(Reg.STATUS, 2)
        self.poke(Reg.STATUS, 2, status | flags if on else status & ~flags)

    def peek(self, offset: int, size: int) -> int:
        """The stored bytes, ignoring capability handlers."""
        return int.from_bytes(self._data[offset : offset + size], "little")

    def poke(self, offset: int, size: int, value: int) -> None:
        """Store bytes regardless of the writable mask (device-side update, not a guest write)."""
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            raise ValueError(f"config offset {offset:#x}+{size} is outside the configuration space")
        self._data[offset : offset + size] = (value & _ones(size)).to_bytes(size, "little")

    def _set_mask(self, offset: int, size: int, mask: int) -> None:
        self._mask[offset : offset + size] = mask.to_bytes(size, "little")

    # ---- capabilities -------------------------------------------------------------------------------

    def _place_capability(self, cap_id: int, length: int) -> int:
        if not 0 <= cap_id <= 0xFF:
            raise ValueError(f"capability id {cap_id:#x} does not fit in a byte")
        if length < 2:
            raise ValueError(f"capability length {length} is shorter than its header")
        offset = self._next_cap
        if offset + length > LEGACY_CONFIG_SIZE:
            raise ValueError(f"capability {cap_id:#x} of {length} bytes does not fit in config space")
        self._data[offset] = cap_id
        self._data[offset + 1] = 0
        if self._last_cap is None:
            self.poke(Reg.CAPABILITIES_POINTER, 1, offset)
            self.set_status(Status.CAPABILITIES_LIST, True)
        else:
            self._data[self._last_cap + 1] = offset
        self._last_cap = offset
        self._next_cap = (offset + length + 3) & ~3
        return offset

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability whose body (bytes after id/next) is stored here; returns its offset."""
        if writable is not None and len(writable) != len(body):
            raise ValueError("capability writable mask and body differ in length")
        offset = self._place_capability(cap_id, 2 + len(body))
        self._data[offset + 2 : offset + 2 + len(body)] = body
        if writable is not None:
            self._mask[offset + 2 : offset + 2 + len(body)] = writable
        return offset

    def add_capability_handler(self, handler: CapabilityHandler) -> int:
        """Append a capability whose body is emulated by `handler`; returns its offset."""
        offset = self._place_capability(handler.cap_id, handler.length)
        self._handlers.append(_HandlerRegion(offset, offset + handler.length, handler))
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability in list order."""
        caps = []
        ptr = self.peek(Reg.CAPABILITIES_POINTER, 1) if self._last_cap is not None else 0
        while ptr:
            caps.append((ptr, self._data[ptr]))
            ptr = self._data[ptr + 1]
        return caps

    # ---- BARs ---------------------------------------------------------------------------------------

    def add_bar(
        self,
        index: int,
        kind: BarKind,
        size: int,
        prefetchable: bool = False,
        address: int = 0,
        rom_enable: bool = False,
        align: int = 0,
    ) -> None:
        """Declare BAR `index` (ROM: index 6). A 64-bit BAR also takes register `index + 1`."""
        if kind == BarKind.ROM:
            if index != ROM_BAR_INDEX:
                raise ValueError(f"expansion ROM must be BAR index {ROM_BAR_INDEX}, not {index}")
        elif not 0 <= index < NUM_BARS - (1 if kind == BarKind.MEM64 else 0):
            raise ValueError(f"invalid {kind.name} BAR index {index}")
        minimum = {
            BarKind.IO: IO_BAR_MIN_SIZE,
            BarKind.ROM: ROM_BAR_MIN_SIZE,
        }.get(kind, MEM_BAR_MIN_SIZE)
        if size < minimum or size & (size - 1):
            raise ValueError(f"BAR{index} size {size:#x} is not a power of two >= {minimum:#x}")
        if kind != BarKind.MEM64 and size >= 1 << 32:
            raise ValueError(f"BAR{index} size {size:#x} does not fit a 32-bit BAR")
        if align < 0 or align & (align - 1):
            raise ValueError(f"BAR{index} alignment {align:#x} is not a power of two")
        bar = _Bar(BarInfo(index, kind, size, prefetchable and kind != BarKind.IO, align), 0, rom_enable)
        regs = [bar.low_reg, bar.low_reg + 1] if kind == BarKind.MEM64 else [bar.low_reg]
        if any(r in self._bar_regs for r in regs):
            raise ValueError(f"BAR{index} overlaps a BAR register already in use")
        self._check_address(bar.info, address)
        self._bars[index] = bar
        for r in regs:
            self._bar_regs[r] = (index, r != bar.low_reg)
        self.set_bar_address(index, address)

    def bars(self) -> list[BarInfo]:
        return [self._bars[i].info for i in sorted(self._bars)]

    def bar_info(self, index: int) -> BarInfo:
        return self._bar(index).info

    def bar_address(self, index: int) -> int:
        return self._bar(index).address

    def _bar(self, index: int) -> _Bar:
        try:
            return self._bars[index]
        except KeyError:
            raise ValueError(f"BAR{index} is not implemented") from None

    def set_bar_address(self, index: int, address: int) -> None:
        """Place BAR `index` at `address` (VMM-side: initial assignment or rollback)."""
        bar = self._bar(index)
        self._check_address(bar.info, address)
        bar.address = address
        self._pending.pop(index, None)
        self._encode(bar, address)

    @staticmethod
    def _check_address(info: BarInfo, address: int) -> None:
        granule = {BarKind.IO: 4, BarKind.ROM: ROM_BAR_MIN_SIZE}.get(info.kind, MEM_BAR_MIN_SIZE)
        limit = 1 << 64 if info.kind == BarKind.MEM64 else 1 << 32
        if address < 0 or address % granule or address + info.size > limit:
            raise ValueError(f"BAR{info.index} ({info.size:#x} bytes) cannot be placed at {address:#x}")

    def _encode(self, bar: _Bar, address: int) -> None:
        kind = bar.info.kind
        reg = bar.low_reg * 4
        if kind == BarKind.IO:
            self.poke(reg, 4, (address & _IO_ADDR_MASK) | 0x1)
        elif kind == BarKind.ROM:
            self.poke(reg, 4, (address & _ROM_ADDR_MASK) | int(bar.rom_enable))
        else:
            self.poke(reg, 4, (address & _MEM_ADDR_MASK) | self._mem_type_bits(bar))
            if kind == BarKind.MEM64:
                self.poke(reg + 4, 4, address >> 32)

    @staticmethod
    def _mem_type_bits(bar: _Bar) -> int:
        return (0x8 if bar.info.prefetchable else 0) | (0x4 if bar.info.kind == BarKind.MEM64 else 0)

    def cancel_move(self, move: BarMove) -> None:
        """The platform refused `move`: the BAR goes back to `move.old`."""
        self.set_bar_address(move.bar_index, move.old)

    def _write_bar_dword(self, reg: int, value: int) -> None:
        index, upper = self._bar_regs[reg]
        bar = self._bars[index]
        kind, size = bar.info.kind, bar.info.size
        # Address bits below the BAR's size are hard-wired to zero, as in hardware: whatever the guest
        # writes, the register (and any move) holds a size-aligned address.
        sizing_answer = ~(size - 1)
        if kind == BarKind.MEM64:
            if not upper:
                sizing = value & _MEM_ADDR_MASK == _MEM_ADDR_MASK
                low = value & sizing_answer & _MEM_ADDR_MASK
                self.poke(reg * 4, 4, low | self._mem_type_bits(bar))
                if sizing or self.command & Command.MEMORY_SPACE:
                    # While decoding, the low half only takes effect with the next upper-half write.
                    return
                # Decoding is off: the address in the two registers is the target, whichever half
                # the guest writes last (or only), and it is carried out when decoding is enabled.
                new = (self.peek(reg * 4 + 4, 4) << 32) | low
            elif value == _U32:
                self.poke(reg * 4, 4, (sizing_answer >> 32) & _U32)
                return
            else:
                value &= (sizing_answer >> 32) & _U32
                self.poke(reg * 4, 4, value)
                new = (value << 32) | (self.peek((reg - 1) * 4, 4) & _MEM_ADDR_MASK)
        else:
            mask, fixed = {
                BarKind.IO: (_IO_ADDR_MASK, 0x1),
                BarKind.ROM: (_ROM_ADDR_MASK, int(bar.rom_enable)),
            }.get(kind, (_MEM_ADDR_MASK, self._mem_type_bits(bar)))
            if value & mask == mask:
                self.poke(reg * 4, 4, (sizing_answer & mask) | fixed)
                return
            new = value & mask & sizing_answer
            self.poke(reg * 4, 4, new | fixed)
        if new == bar.address:
            return
        origin = self._pending[index].old if index in self._pending else bar.address
        bar.address = new
        if new == origin:
            del self._pending[index]
        else:
            self._pending[index] = BarMove(index, origin, new, size)

    def take_ready_moves(self) -> list[BarMove]:
        """Pending BAR moves whose decoding is enabled (memory space for memory/ROM, I/O space for I/O)."""
        command = self.command
        ready = []
        for index, move in list(self._pending.items()):
            needed = Command.IO_SPACE if self._bars[index].info.kind == BarKind.IO else Command.MEMORY_SPACE
            if command & needed:
                ready.append(move)
                del self._pending[index]
        return ready

    @property
    def pending_moves(self) -> list[BarMove]:
        return list(self._pending.values())

    # ---- guest accesses -----------------------------------------------------------------------------

    @staticmethod
    def _chunks(offset: int, size: int) -> list[tuple[int, int]]:
        """Split an access into pieces that each stay within one dword."""
        pieces = []
        end = offset + size
        while offset < end:
            n = min(4 - offset % 4, end - offset)
            pieces.append((offset, n))
            offset += n
        return pieces

    def read(self, offset: int, size: int) -> int:
        """Guest read of `size` bytes at `offset` (little-endian)."""
        if size <= 0 or offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            log.debug("config read %#x+%d out of range", offset, size)
            return _ones(max(size, 0))
        value = 0
        for off, n in self._chunks(offset, size):
            value |= self._read_chunk(off, n) << (8 * (off - offset))
        return value

    def _read_chunk(self, offset: int, size: int) -> int:
        value = self.peek(offset, size)
        for region in self._handlers:
            lo = max(offset, region.start + 2)
            hi = min(offset + size, region.end)
            if lo < hi:
                part = region.handler.read(lo - region.start, hi - lo) & _ones(hi - lo)
                shift = 8 * (lo - offset)
                value = (value & ~(_ones(hi - lo) << shift)) | (part << shift)
        return value

    def write(self, offset: int, size: int, value: int) -> list[BarMove]:
        """Guest write; returns the BAR moves that are now due for execution."""
        if size <= 0 or offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            log.debug("config write %#x+%d out of range", offset, size)
            return []
        value &= _ones(size)
        for off, n in self._chunks(offset, size):
            self._write_chunk(off, n, (value >> (8 * (off - offset))) & _ones(n))
        return self.take_ready_moves() if self._pending else []

    def _write_chunk(self, offset: int, size: int, value: int) -> None:
        reg = offset // 4
        if Reg.BAR0 <= offset < Reg.BAR0 + 4 * NUM_BARS or reg == Reg.ROM_ADDRESS // 4:
            if reg not in self._bar_regs:
                return  # unimplemented BAR: reads as zero, ignores sizing
            if size != 4:
                # Only dword writes relocate; a partial one would desynchronise register and placement.
                log.debug("ignoring %d-byte write to BAR register at %#x", size, offset)
                return
            self._write_bar_dword(reg, value)
            return
        for region in self._handlers:
            lo = max(offset, region.start + 2)
            hi = min(offset + size, region.end)
            if lo < hi:
                part = (value >> (8 * (lo - offset))) & _ones(hi - lo)
                region.handler.write(lo - region.start, hi - lo, part)
        for i in range(size):
            pos = offset + i
            if any(r.start + 2 <= pos < r.end for r in self._handlers):
                continue
            byte = (value >> (8 * i)) & 0xFF
            mask = self._mask[pos]
            self._data[pos] = (self._data[pos] & ~mask & 0xFF) | (byte & mask)
