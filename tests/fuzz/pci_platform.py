"""A guest's view of the emulated PCI platform, the builder's own PciPlatform, plus its invariants.

Real pieces: IoBus (port and MMIO), PciPlatform (segments with the shared I/O allocator, the ECAM windows on
the MMIO bus, 0xCF8 on the port bus, attach and the BAR-move wiring), PciConfigMmio, PciConfigIo,
PciConfiguration, BarBusAdapter, MsiCapability and MsixCapability. The only test glue is FuzzDevice (a
ConfigSpaceDevice whose memory BAR serves its MSI-X table and PBA the way virtio-pci and VFIO devices do).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import strategies as st

from fuzz.sinks import RecordingSink, in_msi_window
from pyvmm import layout
from pyvmm.devices.bus import IoBus
from pyvmm.pci.allocator import AddressAllocator
from pyvmm.pci.apertures import mmio64_aperture, segment_windows
from pyvmm.pci.bar import ROM_BAR_INDEX, BarInfo, BarKind, BarMove
from pyvmm.pci.bus import PciError, PciSegment
from pyvmm.pci.config import Command, InterruptPin, PciConfiguration, Reg
from pyvmm.pci.device import BarBusAdapter, ConfigSpaceDevice, PciDevice
from pyvmm.pci.msi import MSIX_ENTRY_SIZE, MsiCapability, MsixCapability
from pyvmm.pci.platform import PciPlatform

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
IO_SPACE_SIZE = 1 << 16
VENDOR_CAP_ID = 0x09

# Fixed port ranges the platform owns (registered on the port bus as pyvmm.builder does).
FIXED_PORTS = (
    (layout.SERIAL_COM1_PORT, 8),
    (layout.ACPI_PM_PORT, layout.ACPI_PM_SIZE),
    (layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE),
)


# ---- device descriptions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BarSpec:
    index: int
    kind: BarKind
    size: int
    prefetchable: bool = False


@dataclass(frozen=True)
class MsiSpec:
    vectors: int
    address_64: bool
    per_vector_mask: bool


@dataclass(frozen=True)
class MsixSpec:
    table_size: int
    table_bir: int
    table_offset: int
    pba_bir: int
    pba_offset: int


@dataclass(frozen=True)
class DeviceSpec:
    bars: tuple[BarSpec, ...]
    msi: MsiSpec | None = None
    msix: MsixSpec | None = None
    vendor_cap: bytes | None = None  # body of a plain vendor-specific capability, writable where 0xFF
    slot: int | None = None


def _pow2(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo.bit_length() - 1, hi.bit_length() - 1).map(lambda b: 1 << b)


def _pba_length(table_size: int) -> int:
    return (table_size + 63) // 64 * 8


@st.composite
def device_specs(draw: st.DrawFn) -> DeviceSpec:
    bars: list[BarSpec] = []
    index = 0
    while index < 6:
        choice = draw(st.sampled_from(["none", "io", "mem32", "mem64", "mem32"]))
        if choice == "io":
            bars.append(BarSpec(index, BarKind.IO, draw(_pow2(4, 256))))
        elif choice == "mem32":
            bars.append(BarSpec(index, BarKind.MEM32, draw(_pow2(16, 16 * MiB)), draw(st.booleans())))
        elif choice == "mem64" and index < 5:
            bars.append(BarSpec(index, BarKind.MEM64, draw(_pow2(16, 16 * GiB)), draw(st.booleans())))
            index += 1
        index += 1
    if draw(st.booleans()):
        bars.append(BarSpec(ROM_BAR_INDEX, BarKind.ROM, draw(_pow2(2 * KiB, 1 * MiB))))
    msi = None
    if draw(st.booleans()):
        msi = MsiSpec(draw(st.sampled_from([1, 2, 4, 8, 16, 32])), draw(st.booleans()), draw(st.booleans()))
    msix = None
    hosts = [b for b in bars if b.kind in (BarKind.MEM32, BarKind.MEM64) and b.size >= 32]
    if hosts and draw(st.booleans()):
        table_bar = draw(st.sampled_from(hosts))
        pba_bar = draw(st.sampled_from(hosts))
        table_size = draw(st.integers(1, 2048))
        if pba_bar == table_bar:
            while table_size > 1 and table_size * MSIX_ENTRY_SIZE + _pba_length(table_size) > table_bar.size:
                table_size //= 2
            table_length = table_size * MSIX_ENTRY_SIZE
            if table_length + _pba_length(table_size) <= table_bar.size:
                # Offsets are 32-bit fields (low 3 bits: BIR); keep them well inside.
                room = min(table_bar.size - table_length - _pba_length(table_size), 1 << 20)
                table_offset = draw(st.integers(0, room // 8)) * 8
                pba_offset = (
                    table_offset + table_length + draw(st.integers(0, (room - table_offset) // 8)) * 8
                )
                msix = MsixSpec(table_size, table_bar.index, table_offset, pba_bar.index, pba_offset)
        else:
            while table_size > 1 and table_size * MSIX_ENTRY_SIZE > table_bar.size:
                table_size //= 2
            while table_size > 1 and _pba_length(table_size) > pba_bar.size:
                table_size //= 2
            msix = MsixSpec(table_size, table_bar.index, 0, pba_bar.index, 0)
    vendor_cap = draw(st.none() | st.binary(min_size=1, max_size=14))
    return DeviceSpec(tuple(bars), msi, msix, vendor_cap, draw(st.none() | st.integers(0, 31)))


class FuzzDevice(ConfigSpaceDevice):
    """An emulated PCI function built from a DeviceSpec; its MSI/MSI-X report to recording sinks."""

    def __init__(self, spec: DeviceSpec, name: str) -> None:
        config = PciConfiguration(0x1B36, 0x0010, 0xFF, 0x00, interrupt_pin=InterruptPin.INTA)
        for bar in spec.bars:
            config.add_bar(bar.index, bar.kind, bar.size, prefetchable=bar.prefetchable)
        super().__init__(config, name)
        self.spec = spec
        self.msi_sink = RecordingSink(f"{name}/msi")
        self.msix_sink = RecordingSink(f"{name}/msix")
        self.msi: MsiCapability | None = None
        self.msix: MsixCapability | None = None
        self.caps: dict[int, int] = {}  # offset -> id, in list order
        if spec.msi is not None:
            m = spec.msi
            self.msi = MsiCapability(self.msi_sink, m.vectors, m.address_64, m.per_vector_mask)
            self.caps[config.add_capability_handler(self.msi)] = self.msi.cap_id
        if spec.msix is not None:
            x = spec.msix
            self.msix = MsixCapability(
                self.msix_sink, x.table_size, x.table_bir, x.table_offset, x.pba_bir, x.pba_offset
            )
            self.caps[config.add_capability_handler(self.msix)] = self.msix.cap_id
        if spec.vendor_cap is not None:
            body = spec.vendor_cap
            offset = config.add_capability(VENDOR_CAP_ID, body, bytes(0xFF if b == 0xFF else 0 for b in body))
            self.caps[offset] = VENDOR_CAP_ID
        self.scratch: dict[tuple[int, int], int] = {}
        self.moves: list[BarMove] = []

    def bar_read(self, index: int, offset: int, size: int) -> int:
        x = self.msix
        if x is not None:
            if index == x.table_bir and 0 <= offset - x.table_offset < x.table_length:
                return x.table_read(offset - x.table_offset, size)
            if index == x.pba_bir and 0 <= offset - x.pba_offset < x.pba_length:
                return x.pba_read(offset - x.pba_offset, size)
        return self.scratch.get((index, offset), 0) & ((1 << (8 * size)) - 1)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        x = self.msix
        if x is not None:
            if index == x.table_bir and 0 <= offset - x.table_offset < x.table_length:
                x.table_write(offset - x.table_offset, size, value)
                return
            if index == x.pba_bir and 0 <= offset - x.pba_offset < x.pba_length:
                x.pba_write(offset - x.pba_offset, size, value)
                return
        if len(self.scratch) < 256:
            self.scratch[(index, offset)] = value

    def bar_moved(self, move: BarMove) -> None:
        self.moves.append(move)


# ---- the platform ----------------------------------------------------------------------------------------


class _Stub:
    """A fixed legacy device on the port bus (the real ones are fuzzed by their own targets)."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


@dataclass
class Attached:
    segment: PciSegment
    slot: int
    device: PciDevice  # a FuzzDevice, or any other model a target attaches (e.g. a VFIO device)


class Platform:
    """The VM's own PciPlatform (pyvmm.pci.platform), on real buses, with the fixed legacy ranges taken on the
    port bus, plus the bookkeeping the invariants need."""

    def __init__(self, ram_size: int, weights32: list[int], weights64: list[int]) -> None:
        self.ram_size = ram_size
        self.pio = IoBus("pio", IO_SPACE_SIZE)
        self.mmio = IoBus("mmio")
        for port, length in FIXED_PORTS[:2]:
            self.pio.insert(port, length, _Stub())
        windows = segment_windows(weights32, weights64, mmio64_aperture(ram_size))
        self.pci = PciPlatform(windows, pio_bus=self.pio, mmio_bus=self.mmio, page_size=PAGE)
        self.devices: list[Attached] = []

    @classmethod
    def build(cls, ram_size: int, weights32: list[int], weights64: list[int]) -> Platform:
        return cls(ram_size, weights32, weights64)

    @property
    def segments(self) -> list[PciSegment]:
        return self.pci.segments

    @property
    def io(self) -> AddressAllocator:
        return self.pci.io

    @property
    def refused_by_bus(self) -> int:
        return self.pci.refused_moves

    def attach(self, segment: PciSegment, spec: DeviceSpec) -> Attached | None:
        return self.attach_device(segment, FuzzDevice(spec, f"dev{len(self.devices)}"), spec.slot)

    def attach_device(
        self, segment: PciSegment, device: PciDevice, slot: int | None = None
    ) -> Attached | None:
        """Plug any PciDevice in through PciPlatform.attach, as the VMM does; None if it does not fit."""
        try:
            address = self.pci.attach(device, segment.id, slot)
        except PciError:  # a configuration error (window full, slot taken), not a guest action
            return None
        attached = Attached(segment, address.slot, device)
        self.devices.append(attached)
        return attached

    def bus_for(self, kind: BarKind) -> IoBus:
        return self.pio if kind == BarKind.IO else self.mmio

    # ---- guest accesses ----------------------------------------------------------------------------

    def ecam_address(self, segment: PciSegment, slot: int, register: int, function: int = 0) -> int:
        return segment.ecam_base + (slot << 15 | function << 12 | register)

    def cfg_read(self, a: Attached, register: int, size: int) -> int:
        return self.mmio.read(self.ecam_address(a.segment, a.slot, register), size)

    def cfg_write(self, a: Attached, register: int, size: int, value: int) -> None:
        self.mmio.write(self.ecam_address(a.segment, a.slot, register), size, value)


def bar_register(index: int) -> int:
    return Reg.ROM_ADDRESS if index == ROM_BAR_INDEX else Reg.BAR0 + 4 * index


def type_bits(bar: BarSpec | BarInfo) -> tuple[int, int]:
    """(mask, value) of the BAR register bits that never change."""
    if bar.kind == BarKind.IO:
        return 0x3, 0x1
    if bar.kind == BarKind.ROM:
        return 0x7FF, 0x0  # enable bit stays off (nothing enables it) and bits 10:1 are reserved zero
    return 0xF, (0x8 if bar.prefetchable else 0) | (0x4 if bar.kind == BarKind.MEM64 else 0)


def decode_needed(kind: BarKind) -> Command:
    return Command.IO_SPACE if kind == BarKind.IO else Command.MEMORY_SPACE


# ---- invariants ------------------------------------------------------------------------------------------


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def ram_end(ram_size: int) -> int:
    gpa, length = layout.ram_regions(ram_size)[-1]
    return gpa + length


def check_platform(p: Platform) -> None:
    """Every invariant of the PCI platform that can be checked at any time."""
    allocators = [p.io] + [a for s in p.segments for a in (s.mmio32, s.mmio64)]
    for alloc in allocators:
        previous_end = alloc.start
        for r in alloc.allocations():
            assert r.start >= previous_end and r.end <= alloc.end, (
                f"{alloc}: allocation {r} overlaps or leaks"
            )
            previous_end = r.start + r.size

    mem: list[tuple[int, int, str]] = []
    io: list[tuple[int, int, str]] = []
    expected_allocs: dict[int, list[tuple[int, int]]] = {id(a): [] for a in allocators}
    for a in p.devices:
        s, config = a.segment, getattr(a.device, "config", None)
        pending = (
            {m.bar_index: m for m in config.pending_moves} if isinstance(config, PciConfiguration) else {}
        )
        for pl in s.placements(a.slot):
            what = f"{a.device.name} BAR{pl.index} {pl.kind.name} [{pl.address:#x}+{pl.size:#x}]"
            if pl.kind == BarKind.IO:
                assert pl.address >= 0 and pl.address + pl.size <= IO_SPACE_SIZE, (
                    f"{what}: outside port space"
                )
                for port, length in FIXED_PORTS:
                    assert not _overlap((pl.address, pl.size), (port, length)), f"{what}: over port {port:#x}"
                io.append((pl.address, pl.size, what))
                expected_allocs[id(p.io)].append((pl.address, pl.size))
            elif pl.kind == BarKind.MEM64:
                assert s.windows.mmio64.contains(pl.address, pl.size), f"{what}: outside {s.windows.mmio64}"
                assert pl.address >= ram_end(p.ram_size), f"{what}: over RAM"
                mem.append((pl.address, pl.size, what))
                expected_allocs[id(s.mmio64)].append((pl.address, pl.size))
            else:
                assert s.windows.mmio32.contains(pl.address, pl.size), f"{what}: outside {s.windows.mmio32}"
                assert pl.address >= layout.LOW_RAM_END, f"{what}: over RAM"
                assert pl.address + pl.size <= layout.PCI_MMCONFIG_START, f"{what}: over ECAM"
                mem.append((pl.address, pl.size, what))
                expected_allocs[id(s.mmio32)].append((pl.address, pl.size))
            # The model address is the placement unless a move waits for decode to be enabled.
            move = pending.get(pl.index)
            if not isinstance(config, PciConfiguration):
                pass  # a model without an emulated configuration keeps its own shadow registers
            elif move is None:
                assert config.bar_address(pl.index) == pl.address, (
                    f"{what}: config says {config.bar_address(pl.index):#x}"
                )
            else:
                assert move.old == pl.address and config.bar_address(pl.index) == move.new, f"{what}: {move}"
            # The bus serves the BAR where it is placed.
            r = p.bus_for(pl.kind).find(pl.address)
            assert r is not None and r.base == pl.address and r.length == pl.size, f"{what}: bus has {r}"
            assert isinstance(r.device, BarBusAdapter) and r.device.device is a.device
            assert r.device.index == pl.index
        # Type bits, read as the guest reads them.
        for bar in a.device.bars():
            mask, value = type_bits(bar)
            reg = p.cfg_read(a, bar_register(bar.index), 4)
            assert reg & mask == value, (
                f"{a.device.name} BAR{bar.index}: register {reg:#010x} lost its type bits"
            )
        if isinstance(a.device, FuzzDevice):
            assert p.cfg_read(a, Reg.VENDOR_ID, 4) == 0x0010_1B36
            check_msi_routes(a.device)

    for group in (mem, io):
        group.sort()
        for (a0, s0, w0), (a1, _, w1) in itertools.pairwise(group):
            assert a0 + s0 <= a1, f"{w0} overlaps {w1}"
    for alloc in allocators:
        got = sorted((r.start, r.size) for r in alloc.allocations())
        assert got == sorted(expected_allocs[id(alloc)]), f"{alloc}: allocations {got} != placements"
    bars_on_buses = sum(1 for r in p.mmio.ranges() + p.pio.ranges() if isinstance(r.device, BarBusAdapter))
    assert bars_on_buses == len(mem) + len(io), "a BAR range was left behind on a bus"


def check_msi_routes(device: FuzzDevice) -> None:
    """The sinks hold exactly the routes the capabilities' registers call for (and nothing masked)."""
    if device.msi is not None:
        check_msi(device.msi, device.msi_sink)
    else:
        assert not device.msi_sink.calls
    if device.msix is not None:
        check_msix(device.msix, device.msix_sink)
    else:
        assert not device.msix_sink.calls


def check_msi(msi: MsiCapability, sink: RecordingSink) -> None:
    count = msi.enabled_vectors if msi.enabled else 0
    assert (sink.enabled, sink.count) == (msi.enabled, count)
    for vector in range(msi.vectors):
        message = msi.message(vector)
        live = vector < count and not msi.masked(vector) and in_msi_window(message.address)
        assert sink.routes.get(vector) == (message if live else None), f"MSI vector {vector}"
    assert all(v < msi.vectors for v in sink.routes)


def check_msix(msix: MsixCapability, sink: RecordingSink) -> None:
    assert (sink.enabled, sink.count) == (msix.enabled, msix.table_size if msix.enabled else 0)
    for vector in range(msix.table_size):
        message = msix.message(vector)
        masked = msix.function_masked or msix.vector_masked(vector) or not msix.enabled
        if masked:
            assert vector not in sink.routes, f"masked MSI-X vector {vector} has a route"
        else:
            expected = message if in_msi_window(message.address) else None
            assert sink.routes.get(vector) == expected, f"MSI-X vector {vector}"
    assert all(v < msix.table_size for v in sink.routes)
