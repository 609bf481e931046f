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


def test_bar_move_callback_that_raises_refuses_the_move() -> None:
    """IoBus.move raises BusError on an overlap (e.g. an I/O BAR moved onto the UART at 0x3F8); when the
    platform callback lets that through, the guest's config write must not fail: the move is refused and
    rolled back like a False verdict."""
    from pyvmm import layout
    from pyvmm.devices.bus import IoBus
    from pyvmm.pci.allocator import io_allocator
    from pyvmm.pci.apertures import mmio64_aperture, segment_windows
    from pyvmm.pci.bus import PciConfigMmio, PciSegment
    from pyvmm.pci.device import BarBusAdapter, ConfigSpaceDevice

    pio = IoBus("pio", 1 << 16)
    pio.insert(layout.SERIAL_COM1_PORT, 8, ConfigSpaceDevice(_config(), "uart stand-in"))  # any bus device

    def move(device: object, m: BarMove) -> bool:
        pio.move(m.old, m.new)  # raises BusError on overlap, returns None otherwise (as pyvmm.vmm does)
        return True

    (w,) = segment_windows([1], [1], mmio64_aperture(1 << 30))
    seg = PciSegment(0, w, io_allocator(), on_bar_move=move, page_size=4096)
    config = _config()
    config.add_bar(0, BarKind.IO, 8)
    device = ConfigSpaceDevice(config, "dev")
    slot = seg.add_device(device)
    (placement,) = seg.placements(slot)
    pio.insert(placement.address, 8, BarBusAdapter(device, 0))
    ecam = PciConfigMmio(seg)
    ecam.write(slot << 15 | Reg.COMMAND, 2, Command.IO_SPACE)
    ecam.write(slot << 15 | 0x10, 4, layout.SERIAL_COM1_PORT)  # must not raise
    assert seg.placements(slot) == [placement]
    assert ecam.read(slot << 15 | 0x10, 4) == placement.address | 1
    assert pio.find(placement.address) is not None
