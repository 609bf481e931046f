"""Regression tests for what the VFIO and virtqueue fuzz targets (tests/fuzz/vfio.py, tests/fuzz/virtqueue.py)
found: one test per finding, smallest reproducer."""

from __future__ import annotations

from pyvmm.pci.bar import BarKind
from pyvmm.vfio.areas import mappable_areas
from pyvmm.vfio.device import SparseArea

PAGE = 4096


def test_overlapping_sparse_areas_map_once() -> None:
    """Found by fuzz.vfio (build): a region whose sparse-mmap capability lists overlapping areas gave two
    mappings of the same pages, i.e. two KVM slots at one guest address; KVM refuses the second (EEXIST) and
    the exception escaped VfioPciDevice.assign_bar while the device was being plugged in."""
    twice = (SparseArea(0, PAGE), SparseArea(0, PAGE))
    assert mappable_areas(PAGE, True, twice, False, [], PAGE) == [SparseArea(0, PAGE)]
    crossing = (SparseArea(0, 3 * PAGE), SparseArea(2 * PAGE, 2 * PAGE), SparseArea(6 * PAGE, PAGE))
    assert mappable_areas(8 * PAGE, True, crossing, False, [], PAGE) == [
        SparseArea(0, 4 * PAGE),
        SparseArea(6 * PAGE, PAGE),
    ]


def test_subpage_bar_slot_covers_a_neighbour() -> None:
    """Found by fuzz.vfio (kvm_slots_inside_their_bars): a 32-byte memory BAR is page-aligned and mapped into
    the guest as a whole page (one KVM slot), but its placement is 32 bytes, so the allocator puts the next
    BAR (here the device's own 2 KiB ROM) in the same page and the slot shadows it: the guest's ROM reads
    reach the BAR's page instead. Fixed: sub-page BARs are shown to the guest as one page."""
    from fuzz.pci_platform import Platform
    from fuzz.vfio import FakeMapper, FakeVm, HostBar, HostFunction, StandInDevice
    from pyvmm.interrupts import MsiRouter
    from pyvmm.vfio.pci import VfioPciDevice

    config = bytearray(256)
    config[0:4] = bytes([0x36, 0x1B, 0x10, 0x00])
    config[0x10:0x14] = (0xFEB0_0000).to_bytes(4, "little")  # BAR0: 32-bit memory
    fn = HostFunction(config, [HostBar(0, BarKind.MEM32, 32, False, True, None, False)], 2048, {}, False)
    platform = Platform.build(256 << 20, [1], [1])
    vm, mapper = FakeVm(), FakeMapper()
    model = VfioPciDevice(StandInDevice(fn), vm, MsiRouter(vm), memory_slots=mapper, page_size=PAGE)  # type: ignore[arg-type]
    attached = platform.attach_device(platform.segments[0], model)
    assert attached is not None
    try:
        model.config_write(4, 2, 2)  # Memory Space Enable: only then are BAR pages mapped into the guest
        placed = {p.index: p for p in attached.segment.placements(attached.slot)}
        (gpa, size, _host), = mapper.slots.values()
        rom = placed[6]
        assert not (gpa < rom.address + rom.size and rom.address < gpa + size), (
            f"BAR0's slot [{gpa:#x}+{size:#x}] covers the ROM at {rom.address:#x}"
        )
    finally:
        model.close()


def test_access_straddling_the_msix_table() -> None:
    """Found by fuzz.vfio (device_untouched_where_emulated): a misaligned 4-byte write 3 bytes before the
    PBA (the table likewise) is not a PBA access by its start offset, so VfioPciDevice.bar_write hands all 4
    bytes to the device and the last one lands in the device's PBA. When this passes, set
    STRADDLING_MSIX_ACCESSES_HANDLED in fuzz/vfio.py. Fixed: such accesses are dropped (reads all-ones)."""
    import struct

    from fuzz.vfio import FakeMapper, FakeVm, HostBar, HostFunction, StandInDevice
    from pyvmm.interrupts import MsiRouter
    from pyvmm.vfio.pci import VfioPciDevice

    config = bytearray(256)
    config[0:4] = bytes([0x36, 0x1B, 0x10, 0x00])
    struct.pack_into("<H", config, 6, 0x10)  # capability list
    config[0x34] = 0x40
    config[0x40:0x42] = bytes([0x11, 0x00])  # MSI-X, 1 entry: table BAR0 0x0, PBA BAR0 0x800
    struct.pack_into("<HII", config, 0x42, 0, 0x0, 0x800)
    fn = HostFunction(config, [HostBar(0, BarKind.MEM32, 4096, False, False, None, False)], 0, {2: 1}, False)
    dev = StandInDevice(fn)
    vm = FakeVm()
    model = VfioPciDevice(dev, vm, MsiRouter(vm), memory_slots=FakeMapper(), page_size=PAGE)  # type: ignore[arg-type]
    try:
        pba = dev.raw(0, 0x800, 8)
        model.bar_write(0, 0x7FD, 4, 0xAABBCCDD)
        assert dev.raw(0, 0x800, 8) == pba, "the guest wrote the device's PBA"
    finally:
        model.close()


def test_bar_pages_leave_the_guest_while_memory_decoding_is_off() -> None:
    """Found by the hostile-guest lab test: a guest that clears Memory Space Enable and then touches its BAR
    made KVM_RUN fail with EFAULT, because vfio-pci revokes its mmaps while decoding is off but the memslot
    stayed. The BAR's pages must leave the guest with decoding and come back with it."""
    from fuzz.pci_platform import Platform
    from fuzz.vfio import FakeMapper, FakeVm, HostBar, HostFunction, StandInDevice
    from pyvmm.interrupts import MsiRouter
    from pyvmm.vfio.pci import VfioPciDevice

    config = bytearray(256)
    config[0:4] = bytes([0x36, 0x1B, 0x10, 0x00])
    fn = HostFunction(config, [HostBar(0, BarKind.MEM32, 2 * PAGE, False, True, None, False)], 0, {}, False)
    platform = Platform.build(256 << 20, [1], [1])
    vm, mapper = FakeVm(), FakeMapper()
    model = VfioPciDevice(StandInDevice(fn), vm, MsiRouter(vm), memory_slots=mapper, page_size=PAGE)  # type: ignore[arg-type]
    attached = platform.attach_device(platform.segments[0], model)
    assert attached is not None
    try:
        assert mapper.slots == {}  # decoding is off after reset: nothing mapped yet
        model.config_write(4, 2, 2)
        bar0 = next(p for p in attached.segment.placements(attached.slot) if p.index == 0)
        assert [(gpa, size) for gpa, size, _ in mapper.slots.values()] == [(bar0.address, 2 * PAGE)]
        model.config_write(4, 2, 0)
        assert mapper.slots == {}
        model.bar_read(0, 0, 4)  # traps now (vfio-pci itself answers all-ones while decoding is off)
        model.config_write(4, 1, 2)  # a byte write enables it again
        assert [(gpa, size) for gpa, size, _ in mapper.slots.values()] == [(bar0.address, 2 * PAGE)]
    finally:
        model.close()
