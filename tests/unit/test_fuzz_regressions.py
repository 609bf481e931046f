"""Regression tests for bugs the fuzzers in tests/fuzz/ found (one test per bug, smallest reproducer)."""

from __future__ import annotations

from pyvmm.pci.bar import BarKind, BarMove
from pyvmm.pci.config import Command, PciConfiguration, Reg

MiB = 1 << 20


def _config() -> PciConfiguration:
    return PciConfiguration(0x1B36, 0x0010, 0xFF, 0x00)


def test_64bit_bar_upper_half_written_first_with_decode_off() -> None:
    """Found by fuzz.pci (move_bar, upper_first): the move used the stale low half and the later low-half
    write was ignored, so the BAR ended up where neither the old nor the new register value said."""
    c = _config()
    c.add_bar(0, BarKind.MEM64, 4096, address=0x3FFF_FFEE_F000)
    assert c.write(0x14, 4, 0x1) == []  # decoding is off: nothing moves yet
    assert c.write(0x10, 4, 0x0) == []
    moves = c.write(Reg.COMMAND, 2, Command.MEMORY_SPACE)
    assert moves == [BarMove(0, 0x3FFF_FFEE_F000, 0x1_0000_0000, 4096)]
    assert c.read(0x10, 8) == 0x1_0000_0004


def test_64bit_bar_low_half_only_with_decode_off() -> None:
    """A guest relocating within the same 4 GiB only writes the low dword; the BAR must follow it."""
    c = _config()
    c.add_bar(2, BarKind.MEM64, 1 * MiB, address=0x1_0000_0000)
    assert c.write(0x18, 4, 0x0020_0000) == []
    assert c.write(Reg.COMMAND, 2, Command.MEMORY_SPACE) == [BarMove(2, 0x1_0000_0000, 0x1_0020_0000, MiB)]


def test_64bit_bar_sizing_with_decode_off_moves_nothing() -> None:
    c = _config()
    c.add_bar(2, BarKind.MEM64, 1 * MiB, address=0x1_0000_0000)
    for reg in (0x18, 0x1C):
        saved = c.read(reg, 4)
        c.write(reg, 4, 0xFFFF_FFFF)
        c.write(reg, 4, saved)
    assert c.pending_moves == []
    assert c.write(Reg.COMMAND, 2, Command.MEMORY_SPACE) == []
    assert c.read(0x18, 8) == 0x1_0000_0004
