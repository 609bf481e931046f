"""PciConfiguration: header fields, masks, capabilities, shadow BARs, sizing and relocation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.pci.bar import BarInfo, BarKind, BarMove
from pyvmm.pci.config import (
    Command,
    InterruptPin,
    PciConfiguration,
    Reg,
    Status,
)

MiB = 1 << 20
GiB = 1 << 30
MSE = int(Command.MEMORY_SPACE)


def make() -> PciConfiguration:
    return PciConfiguration(
        0x1AF4,
        0x1042,
        0x01,
        0x80,
        prog_if=0x02,
        revision_id=0x07,
        subsystem_vendor_id=0x1AF4,
        subsystem_id=0x0002,
        interrupt_pin=InterruptPin.INTA,
    )


def test_header_fields() -> None:
    c = make()
    assert c.read(0x00, 4) == 0x1042_1AF4
    assert c.read(0x08, 4) == 0x0180_0207
    assert c.read(Reg.HEADER_TYPE, 1) == 0
    assert c.read(0x2C, 4) == 0x0002_1AF4
    assert c.read(Reg.INTERRUPT_PIN, 1) == 1
    assert c.read(Reg.CAPABILITIES_POINTER, 1) == 0
    assert c.read(Reg.STATUS, 2) & Status.CAPABILITIES_LIST == 0


def test_read_only_fields_ignore_writes() -> None:
    c = make()
    for offset, size in ((0, 4), (0x08, 4), (0x0E, 1), (0x2C, 4), (Reg.INTERRUPT_PIN, 1), (0x100, 4)):
        before = c.read(offset, size)
        c.write(offset, size, 0xFFFF_FFFF if size == 4 else 0xFF)
        assert c.read(offset, size) == before


def test_command_and_interrupt_line_are_writable() -> None:
    c = make()
    c.write(Reg.COMMAND, 2, 0xFFFF)
    assert c.read(Reg.COMMAND, 2) == 0x0547
    assert c.command & Command.BUS_MASTER
    c.write(Reg.INTERRUPT_LINE, 1, 11)
    assert c.read(0x3C, 4) & 0xFFFF == 0x010B
    c.set_interrupt_line(5)
    assert c.read(Reg.INTERRUPT_LINE, 1) == 5


def test_status_is_read_only_to_the_guest_but_device_settable() -> None:
    c = make()
    c.set_status(Status.INTERRUPT_STATUS, True)
    c.write(Reg.STATUS, 2, 0xFFFF)
    assert c.read(Reg.STATUS, 2) == Status.INTERRUPT_STATUS
    c.set_status(Status.INTERRUPT_STATUS, False)
    assert c.read(Reg.STATUS, 2) == 0


def test_every_access_width_and_alignment() -> None:
    c = make()
    dword = c.read(0, 4)
    for offset in range(4):
        assert c.read(offset, 1) == (dword >> (8 * offset)) & 0xFF
    for offset in range(3):
        assert c.read(offset, 2) == (dword >> (8 * offset)) & 0xFFFF
    # Crossing a dword boundary and 8-byte accesses are split into dword pieces.
    assert c.read(0x02, 4) == (c.read(0x04, 2) << 16) | 0x1042
    assert c.read(0, 8) == c.read(0, 4) | (c.read(4, 4) << 32)
    c.write(0x03, 2, 0x0600)  # byte 3 read-only, byte 4 = command low byte
    assert c.read(Reg.COMMAND, 1) == 0x06
    assert c.read(0, 4) == dword


def test_out_of_range_accesses_do_not_raise() -> None:
    c = make()
    assert c.read(0xFFE, 4) == 0xFFFF_FFFF
    assert c.read(-1, 1) == 0xFF
    assert c.write(0xFFF, 2, 0) == []
    assert c.read(0xFFC, 4) == 0


def test_capability_list() -> None:
    c = make()
    first = c.add_capability(0x09, bytes([0x05, 0xAA, 0xBB]))
    second = c.add_capability(0x10, bytes(8), writable=bytes([0xFF] + [0] * 7))
    assert (first, second) == (0x40, 0x48)
    assert c.read(Reg.STATUS, 2) & Status.CAPABILITIES_LIST
    assert c.read(Reg.CAPABILITIES_POINTER, 1) == 0x40
    assert c.read(0x40, 4) == 0xAA05_4809
    assert c.read(0x48, 2) == 0x0010
    c.write(0x4A, 2, 0xFFFF)
    assert c.read(0x4A, 2) == 0x00FF
    c.write(0x41, 1, 0)  # next pointers are read-only
    assert c.capabilities() == [(0x40, 0x09), (0x48, 0x10)]


def test_capability_must_fit_in_legacy_space() -> None:
    c = make()
    c.add_capability(0x09, bytes(0xB0))
    with pytest.raises(ValueError, match="does not fit"):
        c.add_capability(0x09, bytes(0x10))


class EchoHandler:
    """A capability handler that records accesses and answers with its offset bytes."""

    cap_id = 0x05
    length = 10

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(bytes(range(offset, offset + size)), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_capability_handler_sees_only_its_body() -> None:
    c = make()
    h = EchoHandler()
    off = c.add_capability_handler(h)
    nxt = c.add_capability(0x09, bytes(2))
    assert nxt == 0x4C
    assert c.read(off, 4) == 0x0302_4C05  # id, next, then handler bytes 2 and 3
    assert c.read(off + 8, 4) == 0x0000_0908  # handler ends at +10
    c.write(off, 4, 0x1234_5678)
    c.write(off + 8, 4, 0xAABB_CCDD)
    assert h.writes == [(2, 2, 0x1234), (8, 2, 0xCCDD)]
    assert c.read(off, 2) == 0x4C05


# ---- BARs ---------------------------------------------------------------------------------------------


def test_bar_register_encoding() -> None:
    c = make()
    c.add_bar(0, BarKind.MEM32, 1 * MiB, prefetchable=False, address=0xE000_0000)
    c.add_bar(1, BarKind.MEM32, 4096, prefetchable=True, address=0xE010_0000)
    c.add_bar(2, BarKind.MEM64, 16 * GiB, prefetchable=True, address=0x20_0000_0000)
    c.add_bar(4, BarKind.IO, 0x20, address=0xFFE0)
    c.add_bar(6, BarKind.ROM, 64 * 1024, address=0xE020_0000, rom_enable=True)
    assert c.read(0x10, 4) == 0xE000_0000
    assert c.read(0x14, 4) == 0xE010_0008
    assert c.read(0x18, 4) == 0x0000_000C
    assert c.read(0x1C, 4) == 0x20
    assert c.read(0x20, 4) == 0xFFE1
    assert c.read(0x24, 4) == 0
    assert c.read(0x30, 4) == 0xE020_0001
    assert c.bars() == [
        BarInfo(0, BarKind.MEM32, MiB),
        BarInfo(1, BarKind.MEM32, 4096, True),
        BarInfo(2, BarKind.MEM64, 16 * GiB, True),
        BarInfo(4, BarKind.IO, 0x20),
        BarInfo(6, BarKind.ROM, 64 * 1024),
    ]
    assert c.bar_address(2) == 0x20_0000_0000


@pytest.mark.parametrize(
    ("index", "kind", "size", "message"),
    [
        (0, BarKind.MEM32, 24, "power of two"),
        (0, BarKind.MEM32, 8, "power of two"),
        (0, BarKind.IO, 2, "power of two"),
        (6, BarKind.ROM, 1024, "power of two"),
        (5, BarKind.MEM64, 4096, "index"),
        (6, BarKind.MEM32, 4096, "index"),
        (0, BarKind.ROM, 4096, "BAR index 6"),
        (0, BarKind.MEM32, 8 * GiB, "32-bit"),
        (0, BarKind.MEM32, 4 * GiB, "32-bit"),
    ],
)
def test_bad_bars(index: int, kind: BarKind, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make().add_bar(index, kind, size)


def test_overlapping_bar_registers_refused() -> None:
    c = make()
    c.add_bar(0, BarKind.MEM64, 4096)
    with pytest.raises(ValueError, match="in use"):
        c.add_bar(1, BarKind.MEM32, 4096)
    with pytest.raises(ValueError, match="cannot be placed"):
        c.add_bar(2, BarKind.MEM32, 4096, address=0xFFFF_F008)
    with pytest.raises(ValueError, match="cannot be placed"):
        c.add_bar(3, BarKind.MEM32, 8192, address=0xFFFF_F000)
    assert [b.index for b in c.bars()] == [0]
    c.add_bar(2, BarKind.MEM32, 4096, address=0xFFFF_F000)
    assert c.read(0x18, 4) == 0xFFFF_F000


def test_sizing_protocol() -> None:
    c = make()
    c.add_bar(0, BarKind.MEM32, 1 * MiB, address=0xE000_0000)
    c.add_bar(1, BarKind.MEM64, 8 * GiB, prefetchable=True, address=0x40_0000_0000)
    c.add_bar(3, BarKind.IO, 0x40, address=0xFFC0)
    c.add_bar(6, BarKind.ROM, 0x8000, address=0xE010_0000)
    c.write(Reg.COMMAND, 2, MSE | Command.IO_SPACE)
    for reg in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x30):
        assert c.write(reg, 4, 0xFFFF_FFFF) == []
    assert c.read(0x10, 4) == 0xFFF0_0000
    assert c.read(0x14, 4) == 0x0000_000C
    assert c.read(0x18, 4) == 0xFFFF_FFFE
    assert c.read(0x1C, 4) == 0xFFFF_FFC1
    assert c.read(0x20, 4) == 0  # unimplemented BAR
    assert c.read(0x30, 4) == 0xFFFF_8000
    # OpenBSD-style probe: all address bits set, type bits clear.
    assert c.write(0x10, 4, 0xFFFF_FFF0) == []
    assert c.read(0x10, 4) == 0xFFF0_0000
    # Restoring the original addresses is not a relocation.
    for reg, value in ((0x10, 0xE000_0000), (0x14, 0xC), (0x18, 0x40), (0x1C, 0xFFC1), (0x30, 0xE010_0000)):
        assert c.write(reg, 4, value) == []
    assert c.read(0x14, 4) == 0x0000_000C
    assert c.read(0x18, 4) == 0x40
    assert c.pending_moves == []


def test_small_64bit_bar_sizing() -> None:
    c = make()
    c.add_bar(0, BarKind.MEM64, 64 * 1024, address=0x1_0000_0000)
    c.write(0x10, 4, 0xFFFF_FFFF)
    c.write(0x14, 4, 0xFFFF_FFFF)
    assert c.read(0x10, 8) == 0xFFFF_FFFF_FFFF_0004


def test_rom_enable_bit_is_read_only() -> None:
    c = make()
    c.add_bar(6, BarKind.ROM, 0x8000, address=0xE010_0000)
    c.write(Reg.COMMAND, 2, MSE)
    assert c.write(0x30, 4, 0xE010_0001) == []  # Linux enabling the ROM: same address, no move
    assert c.read(0x30, 4) == 0xE010_0000


def test_32bit_relocation_with_memory_enabled() -> None:
    c = make()
    c.add_bar(0, BarKind.MEM32, 1 * MiB, address=0xE000_0000)
    c.write(Reg.COMMAND, 2, MSE)
    assert c.write(0x10, 4, 0xD000_0000) == [BarMove(0, 0xE000_0000, 0xD000_0000, MiB)]
    assert c.read(0x10, 4) == 0xD000_0000
    assert c.bar_address(0) == 0xD000_0000
    assert c.write(0x10, 4, 0xD000_0000) == []


def test_relocation_deferred_until_memory_space_enable() -> None:
    c = make()
    c.add_bar(0, BarKind.MEM32, 1 * MiB, address=0xE000_0000)
    assert c.write(0x10, 4, 0xD000_0000) == []
    assert c.pending_moves == [BarMove(0, 0xE000_0000, 0xD000_0000, MiB)]
    assert c.write(0x10, 4, 0xD010_0000) == []
    assert c.write(Reg.CACHE_LINE_SIZE, 1, 0x10) == []
    assert c.write(Reg.COMMAND, 2, MSE) == [BarMove(0, 0xE000_0000, 0xD010_0000, MiB)]
    assert c.pending_moves == []


def test_moving_back_before_enable_cancels() -> None:
    c = make()
    c.add_bar(0, BarKind.MEM32, 1 * MiB, address=0xE000_0000)
    c.write(0x10, 4, 0xD000_0000)
    c.write(0x10, 4, 0xE000_0000)
    assert c.write(Reg.COMMAND, 2, MSE) == []


def test_io_bar_moves_are_gated_by_io_space_enable() -> None:
    c = make()
    c.add_bar(0, BarKind.IO, 0x20, address=0xFFE0)
    c.write(Reg.COMMAND, 2, MSE)
    assert c.write(0x10, 4, 0xC001) == []
    assert c.write(Reg.COMMAND, 2, MSE | Command.IO_SPACE) == [BarMove(0, 0xFFE0, 0xC000, 0x20)]


def test_64bit_moves_on_high_dword() -> None:
    c = make()
    c.add_bar(2, BarKind.MEM64, 1 * MiB, address=0x1_0000_0000)
    c.write(Reg.COMMAND, 2, MSE)
    assert c.write(0x18, 4, 0x0020_0004) == []
    assert c.bar_address(2) == 0x1_0000_0000
    assert c.write(0x1C, 4, 0x1) == [BarMove(2, 0x1_0000_0000, 0x1_0020_0000, MiB)]
    assert c.write(0x1C, 4, 0x2) == [BarMove(2, 0x1_0020_0000, 0x2_0020_0000, MiB)]
    # An 8-byte write is split into low then high dword.
    assert c.write(0x18, 8, 0x3_0000_0000) == [BarMove(2, 0x2_0020_0000, 0x3_0000_0000, MiB)]


def test_partial_bar_writes_are_ignored() -> None:
    c = make()
    c.add_bar(0, BarKind.MEM32, 4096, address=0xE000_0000)
    c.write(Reg.COMMAND, 2, MSE)
    assert c.write(0x12, 2, 0xD000) == []
    assert c.write(0x13, 1, 0xD0) == []
    assert c.read(0x10, 4) == 0xE000_0000


def test_cancel_move_restores_register() -> None:
    c = make()
    c.add_bar(2, BarKind.MEM64, 1 * MiB, address=0x1_0000_0000)
    c.write(Reg.COMMAND, 2, MSE)
    c.write(0x18, 4, 0)
    (move,) = c.write(0x1C, 4, 0x5)
    c.cancel_move(move)
    assert c.read(0x18, 8) == 0x1_0000_0004
    assert c.bar_address(2) == 0x1_0000_0000


# ---- properties -----------------------------------------------------------------------------------------

BAR_SPECS = [
    (0, BarKind.MEM32, 1 * MiB, False, 0xE000_0000),
    (1, BarKind.IO, 0x40, False, 0xFFC0),
    (2, BarKind.MEM64, 16 * GiB, True, 0x40_0000_0000),
    (4, BarKind.MEM64, 4096, False, 0x1_0000_0000),
    (6, BarKind.ROM, 0x10000, False, 0xE010_0000),
]


def _full() -> PciConfiguration:
    c = make()
    for index, kind, size, prefetch, address in BAR_SPECS:
        c.add_bar(index, kind, size, prefetchable=prefetch, address=address)
    c.add_capability(0x09, bytes(6), writable=bytes([0xFF] * 6))
    return c


def _type_bits(c: PciConfiguration) -> list[int]:
    return [
        c.read(0x10, 4) & 0xF,
        c.read(0x14, 4) & 0x3,
        c.read(0x18, 4) & 0xF,
        c.read(0x20, 4) & 0xF,
        c.read(0x30, 4) & 0x7FF,
        c.read(0x28, 4),
    ]


writes = st.lists(
    st.tuples(st.integers(-4, 4100), st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, (1 << 64) - 1)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=writes)
def test_random_writes_never_raise_and_keep_type_bits(ops: list[tuple[int, int, int]]) -> None:
    c = _full()
    types = _type_bits(c)
    ids = c.read(0, 4), c.read(0x08, 4)
    for offset, size, value in ops:
        for move in c.write(offset, size, value):
            assert move.old != move.new
        c.read(offset, size)
        assert _type_bits(c) == types
        assert (c.read(0, 4), c.read(0x08, 4)) == ids


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from([0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30]), st.integers(0, 0xFFFF_FFFF)),
        max_size=20,
    )
)
def test_sizing_answers_after_any_bar_writes(ops: list[tuple[int, int]]) -> None:
    c = _full()
    for reg, value in ops:
        c.write(reg, 4, value)
    for reg in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30):
        c.write(reg, 4, 0xFFFF_FFFF)
    # Decode sizes the way a guest does.
    assert (~(c.read(0x10, 4) & 0xFFFF_FFF0) + 1) & 0xFFFF_FFFF == 1 * MiB
    assert (~(c.read(0x14, 4) & 0xFFFF_FFFC) + 1) & 0xFFFF_FFFF == 0x40
    assert (~(c.read(0x18, 8) & ~0xF) + 1) & (2**64 - 1) == 16 * GiB
    assert (~(c.read(0x20, 8) & ~0xF) + 1) & (2**64 - 1) == 4096
    assert (~(c.read(0x30, 4) & 0xFFFF_F800) + 1) & 0xFFFF_FFFF == 0x10000
