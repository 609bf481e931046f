"""Fuzz targets: the MSI capability and MSI-X (capability, vector table, PBA) against a register model.

Each capability sits in a real PciConfiguration and is reached the way a guest reaches it: config reads and
writes of every width at every offset (the configuration splits them into per-dword pieces), table and PBA
accesses of every width at every offset. The model is written from the PCI spec, not from the code, and
predicts every read-back, every route the sink must hold, and every pending bit.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fuzz.sinks import RecordingSink, in_msi_window
from pyvmm.pci.config import PciConfiguration
from pyvmm.pci.msi import MsiCapability, MsiMessage, MsixCapability

U32 = 0xFFFF_FFFF
VALUES = st.one_of(
    st.integers(0, (1 << 64) - 1), st.sampled_from([0, U32, 0xFEE0_0000, 0xFEE0_1000 | 1 << 32])
)
ADDRESSES = st.one_of(
    st.integers(0xFEE0_0000, 0xFEEF_FFFF),
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0xFEDF_FFFC, 0xFEF0_0000, 0xFEE0_0000 | 1 << 32, 0]),
)


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


def _host() -> PciConfiguration:
    return PciConfiguration(0x1B36, 0x0011, 0xFF, 0x00)


class MsiMachine(RuleBasedStateMachine):
    """MSI: control (enable, multiple message enable), address (32/64), data, mask and pending bits."""

    def __init__(self) -> None:
        super().__init__()
        self.cap: MsiCapability | None = None

    @initialize(
        vectors=st.sampled_from([1, 2, 4, 8, 16, 32]), address_64=st.booleans(), masking=st.booleans()
    )
    def build(self, vectors: int, address_64: bool, masking: bool) -> None:
        self.sink = RecordingSink("msi")
        self.cap = MsiCapability(self.sink, vectors, address_64, masking)
        self.config = _host()
        self.base = self.config.add_capability_handler(self.cap)
        self.vectors, self.address_64, self.masking = vectors, address_64, masking
        self.data_off = 0x0C if address_64 else 0x08
        self.length = self.data_off + (12 if masking else 2)
        # Model registers (spec): control bits 0 and 6:4 writable, address bits 31:2, data 15:0.
        self.control = 0
        self.address = 0
        self.data = 0
        self.mask = 0
        self.pending = [False] * vectors

    def _control_image(self) -> int:
        mmc = self.vectors.bit_length() - 1
        return self.control | mmc << 1 | (0x80 if self.address_64 else 0) | (0x100 if self.masking else 0)

    def _image(self) -> bytes:
        image = bytearray(self.length)
        image[0] = 0x05
        image[1] = 0
        image[2:4] = self._control_image().to_bytes(2, "little")
        image[4:8] = (self.address & U32).to_bytes(4, "little")
        if self.address_64:
            image[8:12] = (self.address >> 32).to_bytes(4, "little")
        image[self.data_off : self.data_off + 2] = self.data.to_bytes(2, "little")
        if self.masking:
            image[self.data_off + 4 : self.data_off + 8] = self.mask.to_bytes(4, "little")
            pending = sum(1 << v for v, p in enumerate(self.pending) if p)
            image[self.data_off + 8 : self.data_off + 12] = pending.to_bytes(4, "little")
        return bytes(image)

    def _model_write(self, offset: int, size: int, value: int) -> None:
        """Apply a guest write to the model (capability-relative offset, any bytes of it)."""
        image = bytearray(self._image())
        for i in range(size):
            pos = offset + i
            if 2 <= pos < self.length:
                image[pos] = (value >> (8 * i)) & 0xFF
        control = int.from_bytes(image[2:4], "little")
        self.control = control & 0x71
        lo = int.from_bytes(image[4:8], "little") & 0xFFFF_FFFC
        hi = int.from_bytes(image[8:12], "little") if self.address_64 else 0
        self.address = lo | hi << 32
        self.data = int.from_bytes(image[self.data_off : self.data_off + 2], "little")
        if self.masking:
            self.mask = (
                int.from_bytes(image[self.data_off + 4 : self.data_off + 8], "little")
                & _ones(4)
                & ((1 << self.vectors) - 1)
            )

    def _count(self) -> int:
        return min(1 << ((self.control >> 4) & 7), self.vectors) if self.control & 1 else 0

    def _message(self, vector: int) -> MsiMessage:
        count = max(self._count(), 1)
        return MsiMessage(self.address, (self.data & ~(count - 1)) | (vector & (count - 1)))

    def _route(self, vector: int) -> MsiMessage | None:
        live = vector < self._count() and not (self.mask >> vector & 1) and in_msi_window(self.address)
        return self._message(vector) if live else None

    def _release(self) -> None:
        for v in range(self.vectors):
            if self.pending[v] and self._route(v) is not None:
                self.pending[v] = False

    @precondition(lambda self: self.cap is not None)
    @rule(offset=st.integers(-4, 0x40), size=st.sampled_from([1, 2, 4, 3, 8]), value=VALUES)
    def config_write(self, offset: int, size: int, value: int) -> None:
        value &= _ones(size)
        self.config.write(self.base + offset, size, value)
        self._model_write(offset, size, value)
        self._release()

    @precondition(lambda self: self.cap is not None)
    @rule(
        address=ADDRESSES,
        data=st.integers(0, 0xFFFF),
        mme=st.integers(0, 7),
        enable=st.booleans(),
        mask=st.integers(0, U32),
    )
    def program(self, address: int, data: int, mme: int, enable: bool, mask: int) -> None:
        """A driver's sequence: address, data, mask, then control."""
        self.config_write(4, 4, address & U32)
        if self.address_64:
            self.config_write(8, 4, address >> 32)
        self.config_write(self.data_off, 2, data)
        if self.masking:
            self.config_write(self.data_off + 4, 4, mask)
        self.config_write(2, 2, mme << 4 | int(enable))

    @precondition(lambda self: self.cap is not None)
    @rule(offset=st.integers(-4, 0x40), size=st.sampled_from([1, 2, 4, 3, 8]))
    def config_read(self, offset: int, size: int) -> None:
        got = self.config.read(self.base + offset, size)
        image = self._image()
        for i in range(size):
            pos = offset + i
            if 0 <= pos < self.length:
                assert (got >> (8 * i)) & 0xFF == image[pos], (
                    f"MSI byte {pos:#x}: {got:#x} vs model {image.hex()}"
                )

    @precondition(lambda self: self.cap is not None)
    @rule(vector=st.integers(-1, 40))
    def fire(self, vector: int) -> None:
        assert self.cap is not None
        got = self.cap.fire(vector)
        if not 0 <= vector < self.vectors or vector >= self._count():
            assert got is None
            return
        route = self._route(vector)
        assert got == route
        if route is None:
            self.pending[vector] = True

    @invariant()
    def routes_match_model(self) -> None:
        if self.cap is None:
            return
        for v in range(self.vectors):
            assert self.sink.routes.get(v) == self._route(v), f"vector {v}"
        assert (self.sink.enabled, self.sink.count) == (bool(self.control & 1), self._count())
        if self.masking:
            pending = self.cap.read(self.data_off + 8, 4)
            assert pending == sum(1 << v for v, p in enumerate(self.pending) if p)


class MsixMachine(RuleBasedStateMachine):
    """MSI-X: control (enable, function mask), vector table of any size, PBA."""

    def __init__(self) -> None:
        super().__init__()
        self.cap: MsixCapability | None = None

    @initialize(table_size=st.one_of(st.integers(1, 70), st.just(2048)), bir=st.integers(0, 5))
    def build(self, table_size: int, bir: int) -> None:
        self.sink = RecordingSink("msix")
        self.cap = MsixCapability(self.sink, table_size, bir, 0x2000, bir, 0x3000)
        self._model_init(table_size)

    def _model_init(self, table_size: int) -> None:
        assert self.cap is not None
        self.config = _host()
        self.base = self.config.add_capability_handler(self.cap)
        self.n = table_size
        self.control = 0  # bits 15:14
        self.entries = [[0, 0, 0, 1] for _ in range(table_size)]
        self.pending = [False] * table_size

    def _route(self, v: int) -> MsiMessage | None:
        lo, hi, data, ctrl = self.entries[v]
        live = self.control == 0x8000 and not ctrl & 1
        message = MsiMessage(lo | hi << 32, data)
        return message if live and in_msi_window(message.address) else None

    def _release(self) -> None:
        for v in range(self.n):
            if self.pending[v] and self._route(v) is not None:
                self.pending[v] = False

    @precondition(lambda self: self.cap is not None)
    @rule(offset=st.integers(-2, 16), size=st.sampled_from([1, 2, 4, 3]), value=VALUES)
    def config_write(self, offset: int, size: int, value: int) -> None:
        value &= _ones(size)
        self.config.write(self.base + offset, size, value)
        if offset <= 3 < offset + size and offset >= 0:
            self.control = ((value >> (8 * (3 - offset))) & 0xC0) << 8
        self._release()

    @precondition(lambda self: self.cap is not None)
    @rule(offset=st.integers(-2, 16), size=st.sampled_from([1, 2, 4, 3]))
    def config_read(self, offset: int, size: int) -> None:
        got = self.config.read(self.base + offset, size)
        image = (
            bytes([0x11, 0])
            + ((self.n - 1) | self.control).to_bytes(2, "little")
            + (0x2000 | self.cap.table_bir).to_bytes(4, "little")  # type: ignore[union-attr]
            + (0x3000 | self.cap.pba_bir).to_bytes(4, "little")  # type: ignore[union-attr]
        )
        for i in range(size):
            pos = offset + i
            if 0 <= pos < 12:
                assert (got >> (8 * i)) & 0xFF == image[pos], f"MSI-X cap byte {pos}"

    @precondition(lambda self: self.cap is not None)
    @rule(
        vector=st.integers(0, 4096),
        field=st.integers(0, 3),
        value=VALUES,
        size=st.sampled_from([4, 8, 4, 8, 1, 2]),
        misalign=st.sampled_from([0, 0, 0, 1, 2, 4]),
    )
    def table_write(self, vector: int, field: int, value: int, size: int, misalign: int) -> None:
        assert self.cap is not None
        offset = vector * 16 + field * 4 + misalign
        value &= _ones(size)
        self.cap.table_write(offset, size, value)
        if size in (4, 8) and offset % size == 0 and offset + size <= self.n * 16:
            entry, first = offset // 16, (offset % 16) // 4
            for i in range(size // 4):
                dword = (value >> (32 * i)) & U32
                f = first + i
                self.entries[entry][f] = dword & (0xFFFF_FFFC if f == 0 else 1 if f == 3 else U32)
        self._release()

    @precondition(lambda self: self.cap is not None)
    @rule(vector=st.integers(0, 2048), address=ADDRESSES, data=st.integers(0, U32), masked=st.booleans())
    def program_entry(self, vector: int, address: int, data: int, masked: bool) -> None:
        v = vector % self.n
        for field, dword in enumerate((address & U32, address >> 32, data, int(masked))):
            self.table_write(v, field, dword, 4, 0)

    @precondition(lambda self: self.cap is not None)
    @rule(offset=st.integers(-8, 2048 * 16 + 16), size=st.sampled_from([4, 8, 1, 2, 3]))
    def table_read(self, offset: int, size: int) -> None:
        assert self.cap is not None
        got = self.cap.table_read(offset, size)
        if size in (4, 8) and offset >= 0 and offset % size == 0 and offset + size <= self.n * 16:
            entry, first = offset // 16, (offset % 16) // 4
            expected = sum(self.entries[entry][first + i] << (32 * i) for i in range(size // 4))
            assert got == expected
        else:
            assert got == _ones(max(size, 0))

    @precondition(lambda self: self.cap is not None)
    @rule(offset=st.integers(-8, 272), size=st.sampled_from([4, 8, 1, 2]), value=VALUES, write=st.booleans())
    def pba(self, offset: int, size: int, value: int, write: bool) -> None:
        assert self.cap is not None
        if write:
            self.cap.pba_write(offset, size, value & _ones(size))  # read-only: ignored
            return
        got = self.cap.pba_read(offset, size)
        length = (self.n + 63) // 64 * 8
        if size in (4, 8) and offset >= 0 and offset % size == 0 and offset + size <= length:
            bits = sum(
                1 << (v - offset * 8)
                for v in range(offset * 8, offset * 8 + size * 8)
                if v < self.n and self.pending[v]
            )
            assert got == bits
        else:
            assert got == _ones(size)

    @precondition(lambda self: self.cap is not None)
    @rule(vector=st.integers(-1, 2100))
    def fire(self, vector: int) -> None:
        assert self.cap is not None
        got = self.cap.fire(vector)
        if not 0 <= vector < self.n or not self.control & 0x8000:
            assert got is None
            return
        route = self._route(vector)
        assert got == route
        if route is None:
            self.pending[vector] = True

    @invariant()
    def routes_match_model(self) -> None:
        if self.cap is None:
            return
        for v in range(self.n):
            route = self.sink.routes.get(v)
            assert route == self._route(v), f"vector {v}: sink {route}, model {self._route(v)}"
            if self.entries[v][3] & 1 or self.control & 0x4000:
                assert route is None, f"masked vector {v} has a route"
        enabled = bool(self.control & 0x8000)
        assert (self.sink.enabled, self.sink.count) == (enabled, self.n if enabled else 0)


__all__ = ["MsiMachine", "MsixMachine"]
