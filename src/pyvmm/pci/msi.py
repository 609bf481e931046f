"""Emulation of the MSI capability and of MSI-X (capability, vector table, PBA) (docs/interrupts.md).

Pure logic: guest register accesses go in, routing changes come out through an MsiVectorSink. Unlike
cloud-hypervisor, byte writes are accepted everywhere, masking one MSI-X vector removes its route (and
latches the pending bit when it fires), and each MSI vector gets its own data value. A message whose
address lies outside the MSI window is never routed: it behaves as if masked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntFlag
from typing import Protocol

from pyvmm import layout

log = logging.getLogger(__name__)

MSI_CAP_ID = 0x05
MSIX_CAP_ID = 0x11
MSI_MAX_VECTORS = 32
MSIX_MAX_TABLE_SIZE = 2048
MSIX_ENTRY_SIZE = 16
MSIX_CAP_LENGTH = 12


@dataclass(frozen=True)
class MsiMessage:
    address: int  # 64-bit
    data: int

    @property
    def address_lo(self) -> int:
        return self.address & 0xFFFF_FFFF

    @property
    def address_hi(self) -> int:
        return self.address >> 32


def address_is_routable(address: int) -> bool:
    """Whether `address` targets the local-APIC MSI window (anything else is never routed)."""
    return layout.MSI_WINDOW_START <= address < layout.MSI_WINDOW_START + layout.MSI_WINDOW_SIZE


class MsiVectorSink(Protocol):
    """Receives routing changes. Order: vector changes first, then enable_changed."""

    def vector_changed(self, vector: int, message: MsiMessage | None) -> None:
        """`vector` now delivers `message`; None means masked, disabled or unroutable.

        A sink may also offer `vectors_changed(changes)`, called instead when one register write changes
        several vectors (MSI-X enable, function mask), so that it can update its routes in one go."""

    def enable_changed(self, enabled: bool, count: int) -> None:
        """MSI/MSI-X was turned on with `count` vectors, or off (count 0)."""

    def signal(self, vector: int, message: MsiMessage) -> None:
        """Deliver a pending interrupt now (released by unmasking)."""


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class _Router:
    """Remembers what the sink was told and only reports differences."""

    def __init__(self, sink: MsiVectorSink, vectors: int) -> None:
        self.sink = sink
        self.routes: list[MsiMessage | None] = [None] * vectors
        self.pending = [False] * vectors
        self.enabled = False
        self.count = 0

    def sync(self, routes: dict[int, MsiMessage | None], enabled: bool, count: int) -> None:
        changed = [(vector, message) for vector, message in routes.items() if message != self.routes[vector]]
        for vector, message in changed:
            self.routes[vector] = message
        batch = getattr(self.sink, "vectors_changed", None) if len(changed) > 1 else None
        if batch is not None:
            batch(changed)  # a sink that can: one routing-table update for all of them
        else:
            for vector, message in changed:
                self.sink.vector_changed(vector, message)
        if (enabled, count) != (self.enabled, self.count):
            self.enabled, self.count = enabled, count
            self.sink.enable_changed(enabled, count)
        for vector, message in routes.items():
            if message is not None and self.pending[vector]:
                self.pending[vector] = False
                self.sink.signal(vector, message)

    def fire(self, vector: int) -> MsiMessage | None:
        if not 0 <= vector < len(self.routes) or not self.enabled or vector >= self.count:
            log.debug("MSI vector %d fired while not enabled: dropped", vector)
            return None
        message = self.routes[vector]
        if message is None:
            self.pending[vector] = True
        return message


class MsiControl(IntFlag):
    ENABLE = 1 << 0
    ADDRESS_64 = 1 << 7
    PER_VECTOR_MASK = 1 << 8


_MMC_SHIFT = 1
_MME_SHIFT = 4
_MSI_CONTROL_WRITABLE = 0x0071  # enable and multiple-message-enable


class MsiCapability:
    """The MSI capability (id 0x05). Offsets are from the capability start."""

    cap_id = MSI_CAP_ID

    def __init__(
        self,
        sink: MsiVectorSink,
        vectors: int = 1,
        address_64: bool = True,
        per_vector_mask: bool = True,
    ) -> None:
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"MSI vector count {vectors} is not a power of two up to 32")
        self.vectors = vectors
        self.address_64 = address_64
        self.per_vector_mask = per_vector_mask
        self._data_off = 0x0C if address_64 else 0x08
        self._mask_off = self._data_off + 4
        self.length = self._data_off + (12 if per_vector_mask else 2)
        self._router = _Router(sink, vectors)
        self._mask = bytearray(self.length)
        self._set(self._mask, 2, 2, _MSI_CONTROL_WRITABLE)
        self._set(self._mask, 4, 4, 0xFFFF_FFFC)  # address must be dword aligned
        if address_64:
            self._set(self._mask, 8, 4, 0xFFFF_FFFF)
        self._set(self._mask, self._data_off, 2, 0xFFFF)
        if per_vector_mask:
            self._set(self._mask, self._mask_off, 4, (1 << vectors) - 1)
        self._regs = bytearray(self.length)
        self.reset()

    @classmethod
    def from_control(cls, control: int, sink: MsiVectorSink) -> MsiCapability:
        """Build from a device's message-control word (capable vectors, 64-bit, per-vector mask)."""
        mmc = min((control >> _MMC_SHIFT) & 0x7, 5)
        return cls(
            sink,
            1 << mmc,
            bool(control & MsiControl.ADDRESS_64),
            bool(control & MsiControl.PER_VECTOR_MASK),
        )

    @staticmethod
    def _set(buf: bytearray, offset: int, size: int, value: int) -> None:
        buf[offset : offset + size] = value.to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._regs[offset : offset + size], "little")

    def reset(self) -> None:
        """Back to power-on state: disabled, nothing programmed, nothing pending."""
        control = (self.vectors.bit_length() - 1) << _MMC_SHIFT
        if self.address_64:
            control |= MsiControl.ADDRESS_64
        if self.per_vector_mask:
            control |= MsiControl.PER_VECTOR_MASK
        self._regs[:] = bytes(self.length)
        self._regs[0] = MSI_CAP_ID
        self._set(self._regs, 2, 2, control)
        self._router.pending = [False] * self.vectors
        self._update()

    @property
    def enabled(self) -> bool:
        return bool(self._get(2, 2) & MsiControl.ENABLE)

    @property
    def enabled_vectors(self) -> int:
        """Vectors granted by Multiple Message Enable (clamped to the capable count)."""
        mme = (self._get(2, 2) >> _MME_SHIFT) & 0x7
        return min(1 << mme, self.vectors)

    def message(self, vector: int) -> MsiMessage:
        """The message `vector` sends when unmasked (valid or not)."""
        address = self._get(4, 4) | (self._get(8, 4) << 32 if self.address_64 else 0)
        count = self.enabled_vectors
        data = (self._get(self._data_off, 2) & ~(count - 1)) | (vector & (count - 1))
        return MsiMessage(address, data)

    def masked(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self._get(self._mask_off, 4) >> vector & 1)

    def read(self, offset: int, size: int) -> int:
        if size <= 0 or offset < 0 or offset + size > self.length:
            log.debug("MSI capability read %#x+%d out of range", offset, size)
            return _ones(max(size, 0))
        image = bytearray(self._regs)
        if self.per_vector_mask:
            bits = sum(1 << v for v, p in enumerate(self._router.pending) if p)
            self._set(image, self._mask_off + 4, 4, bits)
        return int.from_bytes(image[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size <= 0 or offset < 0 or offset + size > self.length:
            log.debug("MSI capability write %#x+%d out of range dropped", offset, size)
            return
        for i in range(size):
            pos = offset + i
            mask = self._mask[pos]
            byte = (value >> (8 * i)) & 0xFF
            self._regs[pos] = (self._regs[pos] & ~mask & 0xFF) | (byte & mask)
        self._update()

    def _update(self) -> None:
        enabled = self.enabled
        count = self.enabled_vectors if enabled else 0
        routes: dict[int, MsiMessage | None] = {}
        for vector in range(self.vectors):
            message = self.message(vector)
            routable = vector < count and not self.masked(vector) and address_is_routable(message.address)
            routes[vector] = message if routable else None
        self._router.sync(routes, enabled, count)

    def fire(self, vector: int) -> MsiMessage | None:
        """The device raises `vector`: the message to send now, or None (dropped, or latched as pending)."""
        return self._router.fire(vector)


class MsixControl(IntFlag):
    FUNCTION_MASK = 1 << 14
    ENABLE = 1 << 15


_VECTOR_CONTROL_MASKED = 1
_MSIX_ENABLE = int(MsixControl.ENABLE)  # tested for every interrupt a device raises


class MsixCapability:
    """The MSI-X capability (id 0x11) with its vector table and pending-bit array.

    read/write take offsets from the capability start; table_* and pba_* take offsets from the start of
    the table and of the PBA inside their BARs.
    """

    cap_id = MSIX_CAP_ID
    length = MSIX_CAP_LENGTH

    def __init__(
        self,
        sink: MsiVectorSink,
        table_size: int,
        table_bir: int = 0,
        table_offset: int = 0,
        pba_bir: int | None = None,
        pba_offset: int | None = None,
    ) -> None:
        if not 1 <= table_size <= MSIX_MAX_TABLE_SIZE:
            raise ValueError(f"MSI-X table size {table_size} is not within 1-{MSIX_MAX_TABLE_SIZE}")
        pba_bir = table_bir if pba_bir is None else pba_bir
        pba_offset = table_offset + table_size * MSIX_ENTRY_SIZE if pba_offset is None else pba_offset
        for name, bir, off in (("table", table_bir, table_offset), ("PBA", pba_bir, pba_offset)):
            if not 0 <= bir <= 5:
                raise ValueError(f"MSI-X {name} BIR {bir} is not a BAR index")
            if off < 0 or off % 8 or off >= 1 << 32:
                raise ValueError(f"MSI-X {name} offset {off:#x} is not a 32-bit multiple of 8")
        self.table_size = table_size
        self.table_bir = table_bir
        self.table_offset = table_offset
        self.pba_bir = pba_bir
        self.pba_offset = pba_offset
        self._router = _Router(sink, table_size)
        self._control = 0
        self._entries: list[list[int]] = []
        self.reset()

    @property
    def table_length(self) -> int:
        return self.table_size * MSIX_ENTRY_SIZE

    @property
    def pba_length(self) -> int:
        return (self.table_size + 63) // 64 * 8

    @property
    def enabled(self) -> bool:
        return bool(self._control & _MSIX_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._control & MsixControl.FUNCTION_MASK)

    def reset(self) -> None:
        """Back to power-on state: disabled, every entry masked, nothing pending."""
        self._control = 0
        self._entries = [[0, 0, 0, _VECTOR_CONTROL_MASKED] for _ in range(self.table_size)]
        self._router.pending = [False] * self.table_size
        self._update(range(self.table_size))

    def message(self, vector: int) -> MsiMessage:
        lo, hi, data, _ = self._entries[vector]
        return MsiMessage(lo | hi << 32, data)

    def vector_masked(self, vector: int) -> bool:
        return bool(self._entries[vector][3] & _VECTOR_CONTROL_MASKED)

    # ---- capability registers -----------------------------------------------------------------------

    def _image(self) -> bytes:
        control = (self.table_size - 1) | self._control
        return (
            bytes([MSIX_CAP_ID, 0])
            + control.to_bytes(2, "little")
            + (self.table_offset | self.table_bir).to_bytes(4, "little")
            + (self.pba_offset | self.pba_bir).to_bytes(4, "little")
        )

    def read(self, offset: int, size: int) -> int:
        if size <= 0 or offset < 0 or offset + size > self.length:
            log.debug("MSI-X capability read %#x+%d out of range", offset, size)
            return _ones(max(size, 0))
        return int.from_bytes(self._image()[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size <= 0 or offset < 0 or offset + size > self.length:
            log.debug("MSI-X capability write %#x+%d out of range dropped", offset, size)
            return
        # Only the upper byte of message control (function mask, enable) is writable.
        if offset <= 3 < offset + size:
            high = (value >> (8 * (3 - offset))) & 0xFF
            writable = MsixControl.FUNCTION_MASK | MsixControl.ENABLE
            self._control = (high << 8) & writable
            self._update(range(self.table_size))

    # ---- vector table -------------------------------------------------------------------------------

    def _table_fields(self, offset: int, size: int) -> tuple[int, int, int] | None:
        """(entry, first field, field count) of a 4- or 8-byte naturally aligned table access."""
        if size not in (4, 8) or offset < 0 or offset % size or offset + size > self.table_length:
            return None
        return offset // MSIX_ENTRY_SIZE, (offset % MSIX_ENTRY_SIZE) // 4, size // 4

    def table_read(self, offset: int, size: int) -> int:
        fields = self._table_fields(offset, size)
        if fields is None:
            log.debug("MSI-X table read %#x+%d not served", offset, size)
            return _ones(max(size, 0))
        entry, first, count = fields
        value = 0
        for i in range(count):
            value |= self._entries[entry][first + i] << (32 * i)
        return value

    def table_write(self, offset: int, size: int, value: int) -> None:
        fields = self._table_fields(offset, size)
        if fields is None:
            log.debug("MSI-X table write %#x+%d dropped", offset, size)
            return
        entry, first, count = fields
        row = self._entries[entry]
        was_masked = row[3] & _VECTOR_CONTROL_MASKED
        for i in range(count):
            field = first + i
            dword = (value >> (32 * i)) & 0xFFFF_FFFF
            if field == 0:
                dword &= 0xFFFF_FFFC  # message address is dword aligned
            elif field == 3:
                dword &= _VECTOR_CONTROL_MASKED
            row[field] = dword
        if was_masked and row[3] & _VECTOR_CONTROL_MASKED:
            return  # masked before and after: no route either way (guests program entries masked)
        self._update((entry,))

    # ---- pending-bit array --------------------------------------------------------------------------

    def pba_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset < 0 or offset % size or offset + size > self.pba_length:
            log.debug("MSI-X PBA read %#x+%d not served", offset, size)
            return _ones(max(size, 0))
        first = offset * 8
        bits = 0
        for i in range(size * 8):
            vector = first + i
            if vector < self.table_size and self._router.pending[vector]:
                bits |= 1 << i
        return bits

    def pba_write(self, offset: int, size: int, value: int) -> None:
        log.debug("MSI-X PBA write %#x+%d ignored (read-only)", offset, size)

    # ---- routing ------------------------------------------------------------------------------------

    def _update(self, vectors: range | tuple[int, ...]) -> None:
        enabled = self.enabled
        live = enabled and not self.function_masked
        routes: dict[int, MsiMessage | None] = {}
        for vector in vectors:
            message = self.message(vector)
            routable = live and not self.vector_masked(vector) and address_is_routable(message.address)
            routes[vector] = message if routable else None
        self._router.sync(routes, enabled, self.table_size if enabled else 0)

    def fire(self, vector: int) -> MsiMessage | None:
        """The device raises `vector`: the message to send now, or None (dropped, or latched as pending)."""
        return self._router.fire(vector)
