"""The VFIO PCI device model against a stand-in device: a memfd laid out like a vfio-pci device fd (one
region per index at a fixed stride), with SET_IRQS and reset recorded instead of issued, and a fake VM that
records irqfds and GSI routes (the real MsiRouter and IrqfdMsiVectors run on top of it)."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.interrupts import MsiRouter
from pyvmm.pci.bar import BarMove
from pyvmm.vfio.bindings import VfioDeviceFlag, VfioIrqInfoFlag, VfioIrqSetFlag, VfioRegionInfoFlag
from pyvmm.vfio.device import IrqInfo, RegionInfo, SparseArea, VfioDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.pci import VfioPciDevice

STRIDE = 1 << 24  # region i lives at i * STRIDE in the stand-in fd
RW = VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_READ | VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_WRITE
MMAP = VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_MMAP


@dataclass
class BarSpec:
    size: int
    mmap: bool = True
    msix_mappable: bool = False
    sparse: tuple[SparseArea, ...] | None = None


class StandInDevice(VfioDevice):
    def __init__(self, config: bytes, bars: dict[int, BarSpec], irqs: dict[int, int], can_reset: bool = True):
        self.fd = os.memfd_create("vfio-standin", os.MFD_CLOEXEC)
        self.name = "0000:01:00.0"
        self.flags = VfioDeviceFlag.VFIO_DEVICE_FLAGS_PCI
        if can_reset:
            self.flags |= VfioDeviceFlag.VFIO_DEVICE_FLAGS_RESET
        self.num_regions, self.num_irqs = 9, 5
        self.regions = {}
        for index, spec in bars.items():
            flags = RW | (MMAP if spec.mmap else 0)
            self.regions[index] = RegionInfo(
                index, flags, spec.size, index * STRIDE, spec.sparse, spec.msix_mappable
            )
        self.regions[7] = RegionInfo(7, RW, len(config), 7 * STRIDE)
        os.ftruncate(self.fd, 8 * STRIDE)
        os.pwrite(self.fd, config, 7 * STRIDE)
        self.irqs = {i: IrqInfo(i, VfioIrqInfoFlag.VFIO_IRQ_INFO_EVENTFD, n) for i, n in irqs.items()}
        self.calls: list[tuple] = []
        self.sets: list[tuple[int, int, list[int]]] = []  # (index, start, fds) of every SET_IRQS
        self.refuse_from = 1 << 30  # SET_IRQS covering a vector from this one fails (host out of vectors)

    def _set_irqs(self, index, flags, start=0, data=None, count=None) -> None:
        action = flags & ~(VfioIrqSetFlag.VFIO_IRQ_SET_DATA_NONE | VfioIrqSetFlag.VFIO_IRQ_SET_DATA_EVENTFD)
        if data and start + len(data) > self.refuse_from:
            raise VfioError("VFIO_DEVICE_SET_IRQS failed: No space left on device")
        self.calls.append(
            ("set_irqs", int(index), VfioIrqSetFlag(action).name, len(data) if data else (count or 0))
        )
        self.sets.append((int(index), start, list(data or [])))

    def raw(self, index: int, offset: int, size: int) -> bytes:
        """What the 'device' holds, bypassing the model."""
        return os.pread(self.fd, size, index * STRIDE + offset)

    def poke(self, index: int, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, index * STRIDE + offset)


@dataclass
class FakeVm:
    irqfds: list[tuple] = field(default_factory=list)
    routing: list[list] = field(default_factory=list)
    assigned: dict[int, int] = field(default_factory=dict)  # eventfd -> gsi

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        self.irqfds.append((fd, gsi, resample_fd, deassign))
        if deassign:
            self.assigned.pop(fd, None)
        else:
            self.assigned[fd] = gsi

    def set_gsi_routing(self, routes: list) -> None:
        self.routing.append(list(routes))


@dataclass
class FakeMapper:
    slots: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    next: int = 10

    def map_memory(self, gpa: int, size: int, host_address: int) -> int:
        self.next += 1
        self.slots[self.next] = (gpa, size, host_address)
        return self.next

    def unmap_memory(self, handle: int) -> None:
        del self.slots[handle]


def nvme_like_config() -> bytearray:
    """A PCIe function: BAR0 64-bit 16 KiB (MSI-X table 0x2000, PBA 0x3000), BAR2 I/O 32 bytes, BAR4 32-bit
    prefetchable 4 KiB, a 2 KiB ROM; caps MSI-X 0x40 → PM 0x60 → PCIe 0x80 → MSI 0x90; extended ARI 0x100
    → SR-IOV 0x140 → AER 0x180; multi-function bit set; INTA."""
    c = bytearray(4096)
    struct.pack_into("<HHHH", c, 0, 0x1B36, 0x0010, 0x0006, 0x0010)  # ids, command (mem + bus master), status
    c[0x08:0x0C] = bytes([0x02, 0x02, 0x08, 0x01])  # revision, prog-if, subclass, class
    c[0x0E] = 0x80  # header type 0, multi-function
    struct.pack_into("<I", c, 0x10, 0xFEB0_0004)  # BAR0: 64-bit memory, host address (must never be seen)
    struct.pack_into("<I", c, 0x14, 0x0000_0000)
    struct.pack_into("<I", c, 0x18, 0x0000_C001)  # BAR2: I/O
    struct.pack_into("<I", c, 0x20, 0xFEA0_0008)  # BAR4: 32-bit prefetchable
    struct.pack_into("<I", c, 0x30, 0xFE90_0000)  # ROM, disabled
    struct.pack_into("<HH", c, 0x2C, 0x1AF4, 0x1100)
    c[0x34] = 0x40
    c[0x3C], c[0x3D] = 0x0B, 0x01
    # MSI-X: 64 entries, table BIR0 0x2000, PBA BIR0 0x3000
    c[0x40:0x42] = bytes([0x11, 0x60])
    struct.pack_into("<HII", c, 0x42, 63, 0x2000, 0x3000)
    c[0x60:0x62] = bytes([0x01, 0x80])
    struct.pack_into("<H", c, 0x62, 0x0003)
    c[0x80:0x82] = bytes([0x10, 0x90])
    struct.pack_into("<H", c, 0x82, 0x0002)
    # MSI: 4 vectors capable (MMC=2), 64-bit, per-vector masking
    c[0x90:0x92] = bytes([0x05, 0x00])
    struct.pack_into("<H", c, 0x92, (2 << 1) | 0x80 | 0x100)
    struct.pack_into("<I", c, 0x100, (0x140 << 20) | (1 << 16) | 0x000E)
    struct.pack_into("<I", c, 0x140, (0x180 << 20) | (1 << 16) | 0x0010)
    struct.pack_into("<I", c, 0x180, (0 << 20) | (2 << 16) | 0x0001)
    return c


def nvme_like_bars(msix_mappable: bool = True) -> dict[int, BarSpec]:
    return {
        0: BarSpec(0x4000, msix_mappable=msix_mappable),
        2: BarSpec(0x20, mmap=False),
        4: BarSpec(0x1000),
        6: BarSpec(0x800, mmap=False),
    }


# ---- tests ------------------------------------------------------------------------------------------------

BAR2, BAR4 = 0x2000, 0xC000_0000
ROM = 0xC010_0000


def host_bars(dev: StandInDevice) -> bytes:
    """The device's own BAR0-5 and ROM registers."""
    return dev.raw(7, 0x10, 0x18) + dev.raw(7, 0x30, 4)


def make(
    msix_mappable: bool = True,
    exclude: tuple[int, ...] = (),
    irqs: dict[int, int] | None = None,
    config: bytearray | None = None,
):
    dev = StandInDevice(
        bytes(config or nvme_like_config()),
        nvme_like_bars(msix_mappable),
        irqs if irqs is not None else {0: 1, 1: 4, 2: 64},
    )
    vm = FakeVm()
    mapper = FakeMapper()
    model = VfioPciDevice(dev, vm, MsiRouter(vm), memory_slots=mapper, exclude_mmap_bars=exclude)
    for index, address in ((0, 0x1_0000_0000), (2, BAR2), (4, BAR4), (6, ROM)):
        model.assign_bar(index, address)
    return dev, vm, mapper, model


def read_all_widths(model: VfioPciDevice, offset: int) -> tuple[int, int, int]:
    dword = model.config_read(offset, 4)
    words = model.config_read(offset, 2) | model.config_read(offset + 2, 2) << 16
    data = bytes(model.config_read(offset + i, 1) for i in range(4))
    return dword, words, int.from_bytes(data, "little")


def test_identity_passes_through() -> None:
    _, _, _, model = make()
    assert model.config_read(0, 4) == 0x0010_1B36
    assert model.config_read(0x08, 4) == 0x0108_0202


def test_multifunction_bit_reads_clear_at_every_width() -> None:
    _, _, _, model = make()
    dword, words, data = read_all_widths(model, 0x0C)
    assert dword == words == data and not dword & (1 << 23)
    assert model.config_read(0x0E, 1) == 0x00


def test_bars_read_the_shadow_and_sizing_never_reaches_the_device() -> None:
    dev, _, _, model = make()
    before = host_bars(dev)
    assert model.config_read(0x10, 4) == 0x0000_0004 and model.config_read(0x14, 4) == 0x1
    assert model.config_read(0x18, 4) == BAR2 | 1
    assert model.config_read(0x20, 4) == BAR4 | 0x8
    assert model.config_read(0x30, 4) == ROM
    for reg in (0x10, 0x14, 0x18, 0x20, 0x30):
        model.config_write(reg, 4, 0xFFFF_FFFF)
    assert model.config_read(0x10, 4) == 0xFFFF_C004  # 16 KiB, 64-bit type bits kept
    assert model.config_read(0x14, 4) == 0xFFFF_FFFF
    assert model.config_read(0x18, 4) == 0xFFFF_FFE1  # 32 bytes of I/O
    assert model.config_read(0x20, 4) == 0xFFFF_F008
    assert model.config_read(0x30, 4) == 0xFFFF_F800
    assert host_bars(dev) == before  # the host's BAR registers were never touched


def test_guest_relocation_returns_moves_and_mappings_follow() -> None:
    dev, _, mapper, model = make()
    before = host_bars(dev)
    assert model.config_write(0x20, 4, 0xC020_0000) == [BarMove(4, BAR4, 0xC020_0000, 0x1000)]
    assert model.config_read(0x20, 4) == 0xC020_0008
    # 64-bit BAR: nothing until the high dword is written.
    assert model.config_write(0x10, 4, 0x4000_0000) == []
    moves = model.config_write(0x14, 4, 0x2)
    assert moves == [BarMove(0, 0x1_0000_0000, 0x2_4000_0000, 0x4000)]
    model.bar_moved(moves[0])
    assert (0x2_4000_0000, 0x2000) in [(gpa, size) for gpa, size, _ in mapper.slots.values()]
    assert host_bars(dev) == before


def test_moves_wait_for_memory_space_enable() -> None:
    _, _, _, model = make()
    model.config_write(0x04, 2, 0x0000)
    assert model.config_write(0x20, 4, 0xC020_0000) == []
    assert model.config_write(0x04, 2, 0x0002) == [BarMove(4, BAR4, 0xC020_0000, 0x1000)]


def test_bar_moves_refused_roll_back() -> None:
    _, _, _, model = make()
    (move,) = model.config_write(0x20, 4, 0xC020_0000)
    model.bar_move_refused(move)
    assert model.config_read(0x20, 4) == BAR4 | 0x8


def test_mmapped_areas_skip_msix_pages_and_excluded_bars() -> None:
    dev, _, mapper, model = make()
    areas = {(a.bar, a.offset, a.size) for a in model.mapped_areas}
    assert areas == {(0, 0, 0x2000), (4, 0, 0x1000)}  # BAR0 without its table/PBA pages; I/O and ROM trap
    assert sorted((g, s) for g, s, _ in mapper.slots.values()) == [(BAR4, 0x1000), (0x1_0000_0000, 0x2000)]
    # The host address is the device: a store through it lands in the region.
    (area,) = [a for a in model.mapped_areas if a.bar == 4]
    ctypes.memmove(area.host_address + 0x10, b"\xaa\xbb", 2)
    assert dev.raw(4, 0x10, 2) == b"\xaa\xbb"
    _, _, _, excluded = make(exclude=(0,))
    assert {a.bar for a in excluded.mapped_areas} == {4}
    _, _, _, unmappable = make(msix_mappable=False)
    assert {a.bar for a in unmappable.mapped_areas} == {4}  # the table's BAR traps entirely


def test_trapped_bar_accesses_reach_the_device_at_every_width() -> None:
    dev, _, _, model = make()
    dev.poke(0, 0x100, bytes(range(16)))
    assert model.bar_read(0, 0x100, 1) == 0x00
    assert model.bar_read(0, 0x101, 2) == 0x0201
    assert model.bar_read(0, 0x104, 4) == 0x0706_0504
    assert model.bar_read(0, 0x108, 8) == 0x0F0E_0D0C_0B0A_0908
    model.bar_write(0, 0x200, 8, 0x1122_3344_5566_7788)
    model.bar_write(2, 0x4, 2, 0xBEEF)
    assert dev.raw(0, 0x200, 8) == (0x1122_3344_5566_7788).to_bytes(8, "little")
    assert dev.raw(2, 0x4, 2) == b"\xef\xbe"
    assert model.bar_read(2, 0x1F, 2) == 0xFFFF  # crosses the end of the BAR
    assert model.bar_read(9, 0, 4) == 0xFFFF_FFFF


def test_msix_table_is_emulated_and_never_written_to_the_device() -> None:
    dev, vm, _, model = make()
    dev.poke(0, 0x2000, b"\x5a" * 64 * 16)
    dev.poke(0, 0x3000, (0x4).to_bytes(8, "little"))
    assert model.bar_read(0, 0x200C, 4) == 1  # entry 0 starts masked (emulated, not the 0x5a pattern)
    model.bar_write(0, 0x2000, 8, 0xFEE0_0000)
    model.bar_write(0, 0x2008, 4, 0x41)
    assert dev.raw(0, 0x2000, 64 * 16) == b"\x5a" * 64 * 16
    assert model.bar_read(0, 0x3000, 8) == 0x4  # the PBA is the device's
    assert model.bar_read(0, 0x2000, 2) == 0xFFFF  # 2-byte table accesses are not served
    assert vm.routing == []  # not enabled yet


def test_msix_enable_orders_intx_off_before_set_irqs_and_honours_vector_masks() -> None:
    dev, vm, _, model = make()
    model.assign_intx(10)
    assert dev.calls == [
        ("set_irqs", 0, "VFIO_IRQ_SET_ACTION_TRIGGER", 1),
        ("set_irqs", 0, "VFIO_IRQ_SET_ACTION_MASK", 1),
        ("set_irqs", 0, "VFIO_IRQ_SET_ACTION_UNMASK", 1),
        ("set_irqs", 0, "VFIO_IRQ_SET_ACTION_UNMASK", 1),
    ]
    _trigger, gsi, resample, deassign = vm.irqfds[0]
    assert gsi == 10 and resample is not None and not deassign
    del dev.calls[:]
    model.bar_write(0, 0x2010, 8, 0xFEE0_1000)
    model.bar_write(0, 0x2018, 4, 0x42)
    model.bar_write(0, 0x201C, 4, 0)  # entry 1 unmasked
    before = len(vm.irqfds)
    model.config_write(0x43, 1, 0x80)  # MSI-X enable with a byte write
    assert dev.calls == [
        ("set_irqs", 0, "VFIO_IRQ_SET_ACTION_TRIGGER", 0),
        ("set_irqs", 2, "VFIO_IRQ_SET_ACTION_TRIGGER", 2),  # vectors 0-1: only 1 unmasked (0 gets fd -1)
    ]
    assert dev.sets[-1][2][0] == -1 and dev.sets[-1][2][1] >= 0
    assert model.config_read(0x40, 4) >> 16 == 0x8000 | 63
    new = vm.irqfds[before:]
    assert len(new) == 1 and not new[0][3]
    msix_gsi = new[0][1]
    assert any(getattr(r, "gsi", None) == msix_gsi and r.data == 0x42 for r in vm.routing[-1])
    # Masking entry 1: irqfd off first, then the route goes.
    model.bar_write(0, 0x201C, 4, 1)
    assert vm.irqfds[-1][1:] == (msix_gsi, None, True)
    assert not any(getattr(r, "gsi", None) == msix_gsi for r in vm.routing[-1])
    # Disable: VFIO MSI-X off, INTx back.
    del dev.calls[:]
    model.config_write(0x42, 2, 63)
    assert dev.calls[0] == ("set_irqs", 2, "VFIO_IRQ_SET_ACTION_TRIGGER", 0)
    assert dev.calls[1] == ("set_irqs", 0, "VFIO_IRQ_SET_ACTION_TRIGGER", 1)


def unmask(model: VfioPciDevice, vector: int, data: int = 0x40, table: int = 0x2000) -> None:
    at = table + 16 * vector
    model.bar_write(0, at, 8, 0xFEE0_0000)
    model.bar_write(0, at + 8, 4, data + vector)
    model.bar_write(0, at + 12, 4, 0)


def msix_sets(dev: StandInDevice) -> list[tuple[int, list[bool]]]:
    """(start, which vectors got an eventfd) of each MSI-X SET_IRQS; an empty list is a disable."""
    return [(start, [fd >= 0 for fd in fds]) for index, start, fds in dev.sets if index == 2]


def noresize(dev: StandInDevice, on: bool) -> None:
    flags = VfioIrqInfoFlag.VFIO_IRQ_INFO_EVENTFD | (VfioIrqInfoFlag.VFIO_IRQ_INFO_NORESIZE if on else 0)
    dev.irqs[2] = IrqInfo(2, flags, dev.irqs[2].count)


def test_msix_vectors_reach_vfio_as_the_guest_unmasks_them_noresize() -> None:
    dev, _, _, model = make()
    noresize(dev, True)  # Linux before 6.5: the count cannot grow while enabled
    unmask(model, 2)
    model.config_write(0x42, 2, 0x8000 | 63)  # enable: vectors 0-2 at the host, only 2 with an eventfd
    assert msix_sets(dev) == [(0, [False, False, True])]
    dev.sets.clear()
    unmask(model, 1)  # inside the range: set alone
    assert msix_sets(dev) == [(1, [True])]
    dev.sets.clear()
    unmask(model, 5)  # beyond it: disable, enable again with every eventfd given so far
    assert msix_sets(dev) == [(0, []), (0, [False, True, True, False, False, True])]
    dev.sets.clear()
    model.bar_write(0, 0x2000 + 16 * 5 + 12, 4, 1)  # masking keeps the eventfd at VFIO (pending waits there)
    unmask(model, 5)
    assert msix_sets(dev) == []
    model.config_write(0x42, 2, 63)  # disable: all gone; enabling again starts from what is unmasked
    model.config_write(0x42, 2, 0x8000 | 63)
    assert msix_sets(dev)[-2:] == [(0, []), (0, [False, True, True, False, False, True])]


def test_msix_vectors_added_in_place_without_noresize() -> None:
    dev, _, _, model = make()
    noresize(dev, False)  # Linux 6.5+ with dynamic MSI-X
    model.config_write(0x42, 2, 0x8000 | 63)  # nothing unmasked: MSI-X on at the host with no vector
    assert msix_sets(dev) == [(0, [False])]
    unmask(model, 7)
    assert msix_sets(dev)[1:] == [(7, [True])]


def test_function_mask_release_is_one_routing_call_and_one_set_irqs() -> None:
    dev, vm, _, model = make()
    noresize(dev, True)
    model.config_write(0x42, 2, 0xC000 | 63)  # enabled, function masked
    for vector in range(64):
        unmask(model, vector)
    calls_before, sets_before = len(vm.routing), len(dev.sets)
    model.config_write(0x42, 2, 0x8000 | 63)  # function mask off: 64 vectors at once
    assert len(vm.routing) == calls_before + 1
    assert sum(1 for r in vm.routing[-1] if hasattr(r, "data")) == 64
    assert msix_sets(dev)[len(msix_sets(dev)) - 2:] == [(0, []), (0, [True] * 64)]
    assert len(dev.sets) == sets_before + 2


def test_vectors_vfio_refuses_stay_off_and_the_rest_keeps_working() -> None:
    dev, _, _, model = make()
    noresize(dev, True)
    model.config_write(0x42, 2, 0x8000 | 63)
    unmask(model, 0)
    dev.refuse_from = 4  # the host has interrupts for 4 vectors only
    unmask(model, 9)  # refused: back to the range that worked
    assert msix_sets(dev)[-2:] == [(0, []), (0, [True])]
    unmask(model, 3)  # still fits
    assert msix_sets(dev)[-2:] == [(0, []), (0, [True, False, False, True])]


def test_gsi_pool_exhaustion_leaves_vectors_masked_and_the_device_working(caplog) -> None:
    dev = StandInDevice(bytes(nvme_like_config()), nvme_like_bars(), {0: 1, 1: 4, 2: 64})
    noresize(dev, True)
    vm = FakeVm()
    model = VfioPciDevice(dev, vm, MsiRouter(vm, max_routes=3), memory_slots=FakeMapper())
    model.assign_bar(0, 0x1_0000_0000)
    model.config_write(0x42, 2, 0x8000 | 63)
    for vector in range(10):
        unmask(model, vector)
    msi_routes = [r for r in vm.routing[-1] if hasattr(r, "data")]
    assert sorted(r.data for r in msi_routes) == [0x40, 0x41, 0x42]
    assert len(vm.assigned) == 3
    assert msix_sets(dev)[-1] == (0, [True, True, True])  # the others never reach the host
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "stays masked" in r.message]
    assert len(warnings) == 1, warnings  # once per device, not once per vector
    # Masking a routed vector frees nothing (a vector keeps its GSI) but its route goes.
    model.bar_write(0, 0x2000 + 12, 4, 1)
    assert sorted(r.data for r in vm.routing[-1] if hasattr(r, "data")) == [0x41, 0x42]


def relocated_config() -> bytearray:
    """nvme_like_config with the MSI-X table at 0x2800 (sharing a page with registers) and PBA at 0x3800."""
    c = nvme_like_config()
    struct.pack_into("<HII", c, 0x42, 63, 0x2800, 0x3800)
    return c


def test_relocated_table_leaves_the_physical_table_page_unmapped() -> None:
    dev = StandInDevice(bytes(relocated_config()), nvme_like_bars(), {0: 1, 1: 4, 2: 64})
    vm, mapper = FakeVm(), FakeMapper()
    model = VfioPciDevice(dev, vm, MsiRouter(vm), memory_slots=mapper)
    assert model.msix is not None and model.msix.table_offset == 0x4000  # the guest's BAR0 doubled
    model.assign_bar(0, 0x1_0000_0000)
    areas = {(a.bar, a.offset, a.size) for a in model.mapped_areas}
    assert areas == {(0, 0, 0x2000), (4, 0, 0x1000)}  # pages 0x2000 (table) and 0x3000 (PBA) trap
    assert (0x1_0000_0000, 0x2000) in [(g, s) for g, s, _ in mapper.slots.values()]
    # The guest's table is the emulated one above; the physical one below is never the device's.
    dev.poke(0, 0x2800, b"\x5a" * 16)
    assert model.bar_read(0, 0x2800, 4) == 0xFFFF_FFFF
    model.bar_write(0, 0x2800, 4, 0x1234)
    assert dev.raw(0, 0x2800, 4) == b"\x5a" * 4
    dev.poke(0, 0x2000, b"\x11\x22\x33\x44")
    assert model.bar_read(0, 0x2000, 4) == 0x4433_2211  # registers sharing that page still reach the device
    assert model.bar_read(0, 0x400C, 4) == 1  # emulated entry 0, masked


def test_x_msix_relocation_moves_a_page_aligned_table() -> None:
    # nvme_like_config's table starts a page (0x2000): left in place unless x_msix_relocation=on asks.
    dev = StandInDevice(bytes(nvme_like_config()), nvme_like_bars(), {0: 1, 1: 4, 2: 64})
    vm, mapper = FakeVm(), FakeMapper()
    plain = VfioPciDevice(dev, vm, MsiRouter(vm), memory_slots=mapper)
    assert plain.msix is not None and (plain.msix.table_offset, plain.msix.pba_offset) == (0x2000, 0x3000)
    plain.close()
    dev = StandInDevice(bytes(nvme_like_config()), nvme_like_bars(), {0: 1, 1: 4, 2: 64})
    vm, mapper = FakeVm(), FakeMapper()
    model = VfioPciDevice(dev, vm, MsiRouter(vm), memory_slots=mapper, msix_relocation=True)
    assert model.msix is not None and (model.msix.table_offset, model.msix.pba_offset) == (0x4000, 0x5000)
    assert model.shadow.bar_info(0).size == 0x8000
    assert model.config_read(0x44, 4) == 0x4000 and model.config_read(0x48, 4) == 0x5000
    model.assign_bar(0, 0x1_0000_0000)
    # The physical table's and PBA's pages stay out of the guest; the emulated table is above them.
    assert {(a.bar, a.offset, a.size) for a in model.mapped_areas} == {(0, 0, 0x2000), (4, 0, 0x1000)}
    dev.poke(0, 0x2000, b"\x5a" * 16)
    assert model.bar_read(0, 0x2000, 4) == 0xFFFF_FFFF
    assert model.bar_read(0, 0x400C, 4) == 1  # emulated entry 0, masked


def test_x_msix_relocation_refused_where_it_cannot_apply() -> None:
    from pyvmm.vfio.pci import MsixRelocationError

    # The table in a 32-bit BAR (BAR4 here): only 64-bit BARs are enlarged for a table; exit 2, one line.
    config = nvme_like_config()
    struct.pack_into("<II", config, 0x44, 0x0004, 0x0804)
    dev = StandInDevice(bytes(config), nvme_like_bars(), {0: 1, 1: 4, 2: 64})
    vm = FakeVm()
    with pytest.raises(MsixRelocationError, match="relocation=on: its MSI-X table is in BAR4, a 32-bit") as e:
        VfioPciDevice(dev, vm, MsiRouter(vm), msix_relocation=True)
    assert e.value.exit_status == 2
    # No MSI-X vectors from VFIO: nothing to relocate.
    dev = StandInDevice(bytes(nvme_like_config()), nvme_like_bars(), {0: 1, 1: 4, 2: 0})
    with pytest.raises(MsixRelocationError, match="VFIO offers no MSI-X vectors"):
        VfioPciDevice(dev, vm, MsiRouter(vm), msix_relocation=True)


def test_d3hot_takes_the_bar_pages_out_like_memory_space_disable() -> None:
    dev, _, mapper, model = make()
    mapped = len(mapper.slots)
    assert mapped == 2
    model.config_write(0x64, 2, 0x0003)  # PMCSR: D3hot
    assert mapper.slots == {}
    assert model.bar_read(0, 0x10, 4) == dev.read_int(0, 0x10, 4)  # trapped now
    model.config_write(0x04, 2, 0x0000)  # memory space off too, then on again: still D3hot
    model.config_write(0x04, 2, 0x0006)
    assert mapper.slots == {}
    model.config_write(0x64, 2, 0x0000)  # D0
    assert len(mapper.slots) == mapped


def test_msi_with_several_vectors_and_per_vector_mask() -> None:
    dev, vm, _, model = make()
    assert model.config_read(0x92, 2) == (2 << 1) | 0x80 | 0x100
    model.config_write(0x94, 4, 0xFEE0_0000)
    model.config_write(0x98, 4, 0)
    model.config_write(0x9C, 2, 0x30)
    model.config_write(0xA0, 4, 0b0010)  # vector 1 masked
    model.config_write(0x92, 2, (2 << 4) | 1)  # 4 vectors, enable
    assert ("set_irqs", 1, "VFIO_IRQ_SET_ACTION_TRIGGER", 4) in dev.calls
    datas = sorted(r.data for r in vm.routing[-1] if hasattr(r, "data"))
    assert datas == [0x30, 0x32, 0x33]  # each vector its own data value; vector 1 masked
    assert model.config_read(0x92, 2) & 1
    # The guest's bytes reach the device after SET_IRQS.
    assert dev.raw(7, 0x92, 2) == ((2 << 4) | 1).to_bytes(2, "little")


def test_interrupt_line_and_pin_follow_the_slot() -> None:
    _, _, _, model = make()
    assert model.config_read(0x3D, 1) == 0  # no INTx until the segment wires it
    model.assign_intx(7)
    assert model.config_read(0x3C, 2) == 0x0107
    _, _, _, no_intx = make(irqs={0: 0, 2: 64})
    no_intx.assign_intx(7)
    assert no_intx.config_read(0x3D, 1) == 0 and no_intx.intx_gsi is None


def test_hidden_extended_capabilities_keep_the_chain() -> None:
    _, _, _, model = make()
    assert model.config_read(0x100, 4) == (0x140 << 20) | (1 << 16)
    assert model.config_read(0x140, 4) == (0x180 << 20) | (1 << 16)
    assert model.config_read(0x180, 4) & 0xFFFF == 0x0001  # AER stays


def test_msix_without_vfio_vectors_passes_through() -> None:
    _dev, _, _, model = make(irqs={0: 1, 1: 0, 2: 0})
    assert model.msix is None and model.msi is None
    assert model.config_read(0x44, 4) == 0x2000
    assert {(a.bar, a.offset, a.size) for a in model.mapped_areas} >= {(0, 0, 0x4000)}


def test_close_releases_everything() -> None:
    _dev, vm, mapper, model = make()
    model.assign_intx(5)
    model.config_write(0x42, 2, 0x8000 | 63)
    model.close()
    assert mapper.slots == {}
    assert vm.assigned == {}
    assert model.device.fd == -1


SIZES = st.sampled_from([0, 1, 2, 3, 4, 8, 16])
VALUES = st.integers(0, 2**64 - 1)
config_accesses = st.tuples(st.integers(-8, 4200), SIZES, VALUES)
bar_accesses = st.tuples(st.integers(-1, 7), st.integers(-8, 0x4010), SIZES, VALUES)


@settings(max_examples=200, deadline=None)
@given(st.lists(config_accesses, max_size=40), st.lists(bar_accesses, max_size=20))
def test_guest_accesses_never_raise_and_bars_never_reach_the_device(config_ops, bar_ops) -> None:
    dev, _, _, model = make()
    before = host_bars(dev)
    for offset, size, value in config_ops:
        model.config_write(offset, size, value)
        model.config_read(offset, size)
    for index, offset, size, value in bar_ops:
        model.bar_write(index, offset, size, value)
        model.bar_read(index, offset, size)
    assert host_bars(dev) == before
    model.close()
