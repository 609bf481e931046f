"""PciSegment slots and BAR placement, guest BAR moves, ECAM and 0xCF8 config access, BarBusAdapter."""

from __future__ import annotations

import pytest

from pyvmm import layout
from pyvmm.pci.allocator import AddressAllocator, AddressRange, io_allocator
from pyvmm.pci.apertures import Window, mmio64_aperture, segment_windows
from pyvmm.pci.bar import BarKind, BarMove
from pyvmm.pci.bus import (
    BarAllocationError,
    BarPlacement,
    PciConfigIo,
    PciConfigMmio,
    PciError,
    PciSegment,
    SlotError,
)
from pyvmm.pci.config import Command, InterruptPin, PciConfiguration, Reg
from pyvmm.pci.device import BarBusAdapter, ConfigSpaceDevice, PciDevice

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096


class Dev(ConfigSpaceDevice):
    """A test device with the given BARs; BAR accesses are recorded."""

    def __init__(
        self,
        name: str = "dev",
        bars: tuple[tuple[int, BarKind, int], ...] = (),
        pin: InterruptPin = InterruptPin.INTA,
    ) -> None:
        config = PciConfiguration(0x1AF4, 0x1000, 0x02, 0x00, interrupt_pin=pin)
        for index, kind, size in bars:
            config.add_bar(index, kind, size)
        super().__init__(config, name)
        self.accesses: list[tuple] = []
        self.moved: list[BarMove] = []

    def bar_read(self, index: int, offset: int, size: int) -> int:
        self.accesses.append(("r", index, offset, size))
        return 0x1234

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", index, offset, size, value))

    def bar_moved(self, move: BarMove) -> None:
        self.moved.append(move)


def segments(n: int = 1, weights32: list[int] | None = None) -> list[PciSegment]:
    io = io_allocator()
    windows = segment_windows(weights32 or [1] * n, [1] * n, mmio64_aperture(2 * GiB))
    return [PciSegment(w.segment, w, io, page_size=PAGE) for w in windows]


def ecam_offset(slot: int, function: int = 0, register: int = 0, bus: int = 0) -> int:
    return bus << 20 | slot << 15 | function << 12 | register


# ---- slots -----------------------------------------------------------------------------------------------


def test_segment0_has_host_bridge_in_slot0() -> None:
    seg = segments()[0]
    ecam = PciConfigMmio(seg)
    assert ecam.read(ecam_offset(0), 4) == 0x0D57_8086
    assert ecam.read(ecam_offset(0, register=0x08), 4) >> 16 == 0x0600
    assert ecam.read(ecam_offset(0, register=Reg.HEADER_TYPE), 1) == 0
    assert seg.placements(0) == []


def test_other_segments_have_no_host_bridge() -> None:
    seg1 = segments(2)[1]
    assert PciConfigMmio(seg1).read(ecam_offset(0), 4) == 0xFFFF_FFFF
    assert seg1.add_device(Dev()) == 0


def test_slot_allocation() -> None:
    seg = segments()[0]
    seg.reserve_slot(2)
    assert seg.add_device(Dev("a")) == 1
    assert seg.add_device(Dev("b")) == 3
    assert seg.add_device(Dev("c"), slot=2) == 2
    assert seg.add_device(Dev("d"), slot=31) == 31
    assert seg.add_device(Dev("e")) == 4
    assert [d.name for d in seg.devices().values()] == ["host-bridge", "a", "c", "b", "e", "d"]


@pytest.mark.parametrize(
    ("slot", "message"), [(0, "host bridge"), (32, "out of range"), (-1, "out of range"), (1, "in use")]
)
def test_bad_slots(slot: int, message: str) -> None:
    seg = segments()[0]
    seg.add_device(Dev(), slot=1)
    with pytest.raises(SlotError, match=message):
        seg.add_device(Dev(), slot=slot)


def test_reserving_twice_and_full_segment() -> None:
    seg = segments()[0]
    seg.reserve_slot(5)
    with pytest.raises(SlotError, match="twice"):
        seg.reserve_slot(5)
    for _ in range(30):
        seg.add_device(Dev())
    with pytest.raises(SlotError, match="no free slot"):
        seg.add_device(Dev())
    assert seg.add_device(Dev(), slot=5) == 5


def test_intx_line_follows_slot() -> None:
    seg = segments()[0]
    with_pin = Dev("a")
    without = Dev("b", pin=InterruptPin.NONE)
    seg.add_device(with_pin, slot=9)
    seg.add_device(without, slot=3)
    assert seg.intx_irq(9) == layout.PCI_INTX_IRQS[1]
    assert with_pin.config_read(Reg.INTERRUPT_LINE, 1) == layout.PCI_INTX_IRQS[1]
    assert without.config_read(Reg.INTERRUPT_LINE, 1) == 0


# ---- BAR placement ---------------------------------------------------------------------------------------


def test_bar_placement_per_kind() -> None:
    seg = segments()[0]
    dev = Dev(
        bars=(
            (0, BarKind.MEM32, 16 * MiB),
            (1, BarKind.IO, 0x20),
            (2, BarKind.MEM64, 1024),
            (4, BarKind.MEM64, 16 * GiB),
            (6, BarKind.ROM, 0x10000),
        )
    )
    slot = seg.add_device(dev)
    top64 = seg.windows.mmio64.end + 1
    assert seg.placements(slot) == [
        BarPlacement(0, BarKind.MEM32, 0xE700_0000, 16 * MiB),
        BarPlacement(1, BarKind.IO, 0xFFE0, 0x20),
        BarPlacement(2, BarKind.MEM64, top64 - PAGE, 1024),  # page aligned
        BarPlacement(4, BarKind.MEM64, (top64 - PAGE - 16 * GiB) & ~(16 * GiB - 1), 16 * GiB),
        BarPlacement(6, BarKind.ROM, 0xE6FF_0000, 0x10000),
    ]
    ecam = PciConfigMmio(seg)
    assert ecam.read(ecam_offset(slot, register=0x10), 4) == 0xE700_0000
    assert ecam.read(ecam_offset(slot, register=0x14), 4) == 0xFFE1
    assert ecam.read(ecam_offset(slot, register=0x30), 4) == 0xE6FF_0000


def test_virtio_style_alignment_request() -> None:
    seg = segments()[0]
    dev = Dev()
    dev.config.add_bar(0, BarKind.MEM64, 0x4000, align=8 * MiB)
    slot = seg.add_device(dev)
    assert seg.placements(slot)[0].address % (8 * MiB) == 0


def test_exhaustion_error_names_everything_and_rolls_back() -> None:
    seg = segments(96)[5]
    window = seg.windows.mmio32
    dev = Dev("gpu", bars=((0, BarKind.MEM64, 1 * GiB), (2, BarKind.MEM32, 16 * MiB)))
    with pytest.raises(BarAllocationError) as info:
        seg.add_device(dev)
    err = info.value
    assert (err.device, err.bar.index, err.bar.size, err.segment) == ("gpu", 2, 16 * MiB, 5)
    assert err.window_range == AddressRange(window.start, window.size)
    assert err.largest_free is None or err.largest_free.size < 16 * MiB
    text = str(err)
    assert "gpu" in text and "BAR2" in text and "16777216" in text and "segment 5" in text
    assert "\n" not in text
    assert seg.mmio64.allocations() == []  # BAR0 was released again
    assert seg.devices() == {}


def test_2_to_1_split_segment1_holds_thirteen_16mib_bars() -> None:
    seg1 = segments(2, [2, 1])[1]
    addrs = []
    for i in range(13):
        slot = seg1.add_device(Dev(f"d{i}", bars=((0, BarKind.MEM32, 16 * MiB),)))
        addrs.append(seg1.placements(slot)[0].address)
    assert addrs[0] == 0xE700_0000 and addrs[-1] == 0xDB00_0000
    with pytest.raises(BarAllocationError, match="largest free aligned range: none"):
        seg1.add_device(Dev("d13", bars=((0, BarKind.MEM32, 16 * MiB),)))


def test_io_bar_without_io_allocator() -> None:
    windows = segment_windows([1], [1], mmio64_aperture(GiB))[0]
    seg = PciSegment(0, windows)
    with pytest.raises(PciError, match="I/O port allocator"):
        seg.add_device(Dev(bars=((0, BarKind.IO, 0x10),)))


def test_remove_device_frees_bars() -> None:
    seg = segments()[0]
    slot = seg.add_device(Dev(bars=((0, BarKind.MEM32, MiB), (1, BarKind.IO, 0x10))))
    seg.remove_device(slot)
    assert seg.mmio32.allocations() == [] and seg.io is not None and seg.io.allocations() == []
    assert seg.device(slot) is None
    with pytest.raises(SlotError):
        seg.remove_device(0)


# ---- guest BAR moves ---------------------------------------------------------------------------------------


def setup_move(
    callback_result: bool = True,
) -> tuple[PciSegment, PciConfigMmio, Dev, int, list[tuple[PciDevice, BarMove]]]:
    seg = segments()[0]
    calls: list[tuple[PciDevice, BarMove]] = []

    def on_move(device: PciDevice, move: BarMove) -> bool:
        calls.append((device, move))
        return callback_result

    seg.on_bar_move = on_move
    dev = Dev(bars=((0, BarKind.MEM32, MiB), (2, BarKind.MEM64, MiB)))
    slot = seg.add_device(dev)
    ecam = PciConfigMmio(seg)
    ecam.write(ecam_offset(slot, register=Reg.COMMAND), 2, int(Command.MEMORY_SPACE))
    return seg, ecam, dev, slot, calls


def test_guest_move_executes_and_updates_allocator() -> None:
    seg, ecam, dev, slot, calls = setup_move()
    ecam.write(ecam_offset(slot, register=0x10), 4, 0xD000_0000)
    move = BarMove(0, 0xE7F0_0000, 0xD000_0000, MiB)
    assert calls == [(dev, move)]
    assert dev.moved == [move]
    assert seg.placements(slot)[0].address == 0xD000_0000
    assert seg.mmio32.size_of(0xD000_0000) == MiB and seg.mmio32.size_of(0xE7F0_0000) is None


def test_guest_move_of_64bit_bar() -> None:
    seg, ecam, dev, slot, calls = setup_move()
    old = seg.placements(slot)[1].address
    new = seg.windows.mmio64.start
    ecam.write(ecam_offset(slot, register=0x18), 4, new & 0xFFFF_FFFF)
    assert calls == []
    ecam.write(ecam_offset(slot, register=0x1C), 4, new >> 32)
    assert calls == [(dev, BarMove(2, old, new, MiB))]


@pytest.mark.parametrize(
    "new",
    [
        0xB000_0000,  # outside the window (RAM)
        0xE7E0_0000,  # the other device's BAR
        0xE7E8_0000,  # inside the other device's BAR once the bits below 1 MiB read as zero
    ],
)
def test_refused_moves_roll_back(new: int) -> None:
    seg, ecam, dev, slot, calls = setup_move()
    other = seg.add_device(Dev("other", bars=((0, BarKind.MEM32, MiB),)))
    assert seg.placements(other)[0].address == 0xE7E0_0000
    before = seg.mmio32.allocations()
    ecam.write(ecam_offset(slot, register=0x10), 4, new)
    assert calls == []
    assert ecam.read(ecam_offset(slot, register=0x10), 4) == 0xE7F0_0000
    assert dev.config.bar_address(0) == 0xE7F0_0000
    assert seg.mmio32.allocations() == before


def test_misaligned_move_lands_size_aligned() -> None:
    # The address bits below a BAR's size are hard-wired to zero, as in hardware: a write of 0xD008_0000 to
    # a 1 MiB BAR points it at 0xD000_0000.
    _seg, ecam, dev, slot, calls = setup_move()
    ecam.write(ecam_offset(slot, register=0x10), 4, 0xD008_0000)
    assert calls == [(dev, BarMove(0, 0xE7F0_0000, 0xD000_0000, MiB))]
    assert ecam.read(ecam_offset(slot, register=0x10), 4) == 0xD000_0000


def test_callback_refusal_rolls_back() -> None:
    seg, ecam, dev, slot, calls = setup_move(callback_result=False)
    ecam.write(ecam_offset(slot, register=0x10), 4, 0xD000_0000)
    assert len(calls) == 1
    assert ecam.read(ecam_offset(slot, register=0x10), 4) == 0xE7F0_0000
    assert seg.mmio32.size_of(0xE7F0_0000) == MiB and seg.mmio32.size_of(0xD000_0000) is None
    assert dev.moved == []


# ---- config access mechanisms ------------------------------------------------------------------------------


def test_ecam_decoding() -> None:
    seg = segments()[0]
    dev = Dev()
    slot = seg.add_device(dev, slot=3)
    ecam = PciConfigMmio(seg)
    assert ecam.read(ecam_offset(slot), 4) == 0x1000_1AF4
    assert ecam.read(ecam_offset(slot, register=1), 2) == 0x001A
    assert ecam.read(ecam_offset(slot, register=3), 2) == 0xFFFF  # crosses a dword
    assert ecam.read(ecam_offset(slot), 8) == 2**64 - 1
    assert ecam.read(ecam_offset(slot, function=1), 4) == 0xFFFF_FFFF
    assert ecam.read(ecam_offset(slot, bus=1), 4) == 0xFFFF_FFFF
    assert ecam.read(ecam_offset(4), 2) == 0xFFFF
    assert ecam.read(ecam_offset(slot, register=0xFFC), 4) == 0  # extended space reachable
    ecam.write(ecam_offset(slot, function=2, register=Reg.INTERRUPT_LINE), 1, 0x77)
    ecam.write(ecam_offset(slot, register=Reg.INTERRUPT_LINE, bus=1), 1, 0x77)
    assert dev.config_read(Reg.INTERRUPT_LINE, 1) == layout.PCI_INTX_IRQS[3]
    ecam.write(ecam_offset(slot, register=Reg.INTERRUPT_LINE), 1, 0x77)
    assert dev.config_read(Reg.INTERRUPT_LINE, 1) == 0x77


def cf8(slot: int, register: int, function: int = 0, bus: int = 0, enable: bool = True) -> int:
    return int(enable) << 31 | bus << 16 | slot << 11 | function << 8 | register


def test_port_cf8_mechanism() -> None:
    seg = segments()[0]
    dev = Dev()
    seg.add_device(dev, slot=2)
    io = PciConfigIo(seg)
    io.write(0, 4, cf8(0, 0))
    assert io.read(0, 4) == cf8(0, 0)
    assert io.read(4, 4) == 0x0D57_8086
    io.write(0, 4, cf8(2, 0x08))
    assert io.read(4, 4) == 0x0200_0000
    assert io.read(6, 2) == 0x0200
    assert io.read(7, 1) == 0x02
    assert io.read(6, 4) == 0xFFFF_FFFF  # runs past 0xCFF
    io.write(0, 4, cf8(2, 0x3C))
    io.write(4, 1, 0x42)
    assert dev.config_read(0x3C, 1) == 0x42
    io.write(0, 4, cf8(2, 0x3C, function=1))
    assert io.read(4, 4) == 0xFFFF_FFFF
    io.write(4, 1, 0x99)  # function 1: dropped, not delivered to function 0
    assert dev.config_read(0x3C, 1) == 0x42
    io.write(0, 4, cf8(2, 0x3C, bus=1))
    assert io.read(4, 4) == 0xFFFF_FFFF
    io.write(0, 4, cf8(2, 0x3C, enable=False))
    assert io.read(4, 4) == 0xFFFF_FFFF
    io.write(4, 1, 0x99)
    assert dev.config_read(0x3C, 1) == 0x42
    io.write(0, 4, 0xFFFF_FFFF)
    assert io.read(0, 4) == 0x80FF_FFFC


def test_cf8_reaches_only_first_256_bytes_and_handles_moves() -> None:
    seg, _ecam, dev, slot, calls = setup_move()
    io = PciConfigIo(seg)
    io.write(0, 4, cf8(slot, 0x10))
    io.write(4, 4, 0xD000_0000)
    assert calls == [(dev, BarMove(0, 0xE7F0_0000, 0xD000_0000, MiB))]


def test_bar_bus_adapter_forwards_offsets() -> None:
    dev = Dev(bars=((0, BarKind.MEM32, 4096),))
    adapter = BarBusAdapter(dev, 0)
    assert adapter.read(0x10, 4) == 0x1234
    adapter.write(0x20, 2, 0xBEEF)
    assert dev.accesses == [("r", 0, 0x10, 4), ("w", 0, 0x20, 2, 0xBEEF)]


def test_config_space_device_without_bar_emulation_answers_all_ones() -> None:
    dev = ConfigSpaceDevice(PciConfiguration(1, 2, 3, 4))
    assert dev.bar_read(0, 0, 4) == 0xFFFF_FFFF
    dev.bar_write(0, 0, 4, 0)


def test_segment_windows_are_the_allocators() -> None:
    seg = segments()[0]
    assert (seg.mmio32.start, seg.mmio32.end) == (0xC000_0000, 0xE7FF_FFFF)
    assert isinstance(seg.mmio64, AddressAllocator)
    assert seg.ecam_base == 0xE800_0000
    assert Window(seg.mmio64.start, seg.mmio64.end) == seg.windows.mmio64


# ---- one lock: hot-plug against a guest's BAR move ---------------------------------------------------------


def test_a_hot_plug_waits_for_a_guest_bar_move_in_progress() -> None:
    """The move frees the BAR's old range before it takes the new one, and takes it back when the move is
    refused: a device plugged from another thread meanwhile could take that range and the BAR would roll back
    onto it. PciPlatform's one lock makes the plug wait."""
    import threading

    from pyvmm.devices.bus import IoBus
    from pyvmm.pci.platform import PciPlatform

    windows = segment_windows([1], [1], mmio64_aperture(2 * GiB))
    platform = PciPlatform(windows, pio_bus=IoBus("pio", 1 << 16), mmio_bus=IoBus("mmio"), page_size=PAGE)
    seg = platform.segments[0]
    dev = Dev(bars=((0, BarKind.MEM32, MiB),))
    address = platform.attach(dev)
    old = seg.placements(address.slot)[0].address
    in_move, release = threading.Event(), threading.Event()
    bus_move = platform._move_bar

    def held_move(device: PciDevice, move: BarMove) -> bool:
        in_move.set()  # the old range is free in the allocator now
        assert release.wait(5)
        return bus_move(device, move)

    seg.on_bar_move = held_move
    ecam = PciConfigMmio(seg)
    ecam.write(ecam_offset(address.slot, register=Reg.COMMAND), 2, int(Command.MEMORY_SPACE))
    bar0 = ecam_offset(address.slot, register=0x10)
    guest = threading.Thread(target=ecam.write, args=(bar0, 4, 0xD000_0000))
    guest.start()
    assert in_move.wait(5)
    plugged: list[int] = []
    other = Dev("hot", bars=((0, BarKind.MEM32, MiB),))
    api = threading.Thread(target=lambda: plugged.append(platform.attach(other).slot))
    api.start()
    api.join(0.3)
    assert api.is_alive() and plugged == []  # waits for the move to finish
    release.set()
    guest.join(5)
    api.join(5)
    assert seg.placements(address.slot)[0].address == 0xD000_0000
    assert seg.placements(plugged[0])[0].address == old  # free once the move is done


def test_a_bar_move_of_a_device_unplugged_meanwhile_is_refused() -> None:
    seg, ecam, dev, slot, calls = setup_move()
    write = dev.config_write

    def write_then_ejected(offset: int, size: int, value: int) -> list[BarMove]:
        moves = write(offset, size, value)
        seg.remove_device(slot)  # as an eject on another vCPU between the write and the move
        return moves

    dev.config_write = write_then_ejected  # type: ignore[method-assign]
    ecam.write(ecam_offset(slot, register=0x10), 4, 0xD000_0000)
    assert calls == [] and seg.mmio32.size_of(0xD000_0000) is None
