"""Fuzz target: the VFIO PCI device model (pyvmm.vfio.pci.VfioPciDevice) in the PCI platform, driven by a
hostile guest through ECAM, 0xCF8 and its BAR ranges.

The device fd is a stand-in: a memfd laid out like vfio-pci's regions (BARs, ROM, config space, each at
the offset its region info reports), built from a drawn host function: every BAR kind and size (sub-page
BARs included), mmappable or not, sparse areas, MSI-X mappable or not, a ROM, config space of 256 or 4096
bytes whose capability list holds MSI (every control word), MSI-X (table and PBA in any BAR, sharing pages,
pointing at a missing or I/O BAR, past the BAR), power management, PCI Express with extended capabilities
(hidden ones included), vendor capabilities, and hostile pointers (loops, into the header, past the end),
the rest filled with garbage. SET_IRQS and reset are recorded; the VM is a stand-in that encodes every
GSI routing table with the real `encode_routes`; the real MsiRouter and IrqfdMsiVectors sit in between.

Guest actions: raw config accesses of every width and offset, Linux BAR sizing (one BAR, all BARs),
relocations (decode on/off, upper half first, hostile targets over RAM, ECAM, the MSI window, outside the
window, unaligned), command games, capability walks, MSI and MSI-X programming (config space and the table
through the BAR), and BAR/ROM accesses of every width at any offset.

Invariants, after every step (plus check_platform's window/overlap/bus invariants):
- shadow BAR and ROM values never reach the device: the config region's BAR/ROM dwords never change;
- the device's own MSI-X table and PBA (where the guest sees them) are never written by the guest;
- every MSI route in the KVM table targets the MSI window; a GSI has an irqfd only with a route;
- every KVM memory slot of a BAR area lies inside that BAR's current placement (or its page, for a
  sub-page BAR placed alone in it), inside the segment's window and never over RAM, and slots never overlap
  each other or another BAR; the mmapped host area is the device's region;
- no exception escapes; on close, every slot, irqfd and route is gone and the fd is closed.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fuzz.pci_platform import (
    Attached,
    FuzzDevice,
    MiB,
    Platform,
    bar_register,
    check_platform,
    device_specs,
    ram_end,
)
from fuzz.sinks import in_msi_window
from pyvmm import layout
from pyvmm.interrupts import MsiRouter
from pyvmm.kvm.routing import MsiRoute, Route, default_irqchip_routes, encode_routes
from pyvmm.pci.bar import ROM_BAR_INDEX, BarKind
from pyvmm.pci.config import Command, Reg
from pyvmm.vfio.bindings import VfioDeviceFlag, VfioIrqInfoFlag, VfioIrqSetFlag, VfioRegionInfoFlag
from pyvmm.vfio.device import IrqInfo, RegionInfo, SparseArea, VfioDevice
from pyvmm.vfio.pci import VfioPciDevice

KiB, GiB = 1 << 10, 1 << 30
PAGE = 4096
U32 = 0xFFFF_FFFF
STRIDE = 1 << 32  # region i at i * STRIDE in the memfd (sparse)
CONFIG_INDEX, ROM_INDEX = 7, 6
RW = VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_READ | VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_WRITE
MMAP = VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_MMAP
DECODE = Command.IO_SPACE | Command.MEMORY_SPACE
BAR_DWORDS = [Reg.BAR0 + 4 * i for i in range(6)] + [Reg.ROM_ADDRESS]
CAP_MSI, CAP_MSIX, CAP_PM, CAP_PCIE, CAP_VENDOR = 0x05, 0x11, 0x01, 0x10, 0x09
# Found by this target, not fixed yet (the fix belongs in pyvmm/vfio/pci.py, under rework by others): a
# memory BAR smaller than a page is mapped into the guest as a whole page (a KVM slot of PAGE bytes) but is
# placed, and shown to the guest, with its own size, so other BARs - of this device or another - can be
# placed in the rest of that page and the slot then covers them. Until the guest-visible size of such a BAR
# is raised to a page, the slot-over-other-BARs check skips sub-page BARs.
# tests/unit/test_fuzz_vfio_regressions.py::test_subpage_bar_slot_covers_a_neighbour is the strict xfail
# that flips (and fails) when the fix lands: then set this to True.
SUBPAGE_BARS_RESERVE_THEIR_PAGE = True
# Found by this target, not fixed yet (same file): a trapped BAR access that starts just before the MSI-X
# table or PBA and runs into it is not recognised as a table/PBA access and goes to the device whole, so
# its last bytes land in the device's own table or PBA (the host kernel drops region writes to the table,
# so the host is safe, but the emulated entry misses them). Until bar_write/bar_read split or drop such
# accesses, the target only makes naturally aligned BAR accesses (which never straddle: the table and PBA
# are 8-byte aligned). test_fuzz_vfio_regressions.py::test_access_straddling_the_msix_table is the xfail.
STRADDLING_MSIX_ACCESSES_HANDLED = True
EXT_IDS = [0x0001, 0x0002, 0x000E, 0x0010, 0x0013, 0x0015, 0x001B, 0x0023, 0x0B, 0xFFFF]


# ---- the host function ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostBar:
    index: int
    kind: BarKind  # IO, MEM32, MEM64
    size: int  # region size (may be under a page)
    prefetchable: bool
    mmap: bool
    sparse: tuple[SparseArea, ...] | None
    msix_mappable: bool


@dataclass
class HostFunction:
    config: bytearray
    bars: list[HostBar]
    rom: int  # ROM region size (0: none)
    irqs: dict[int, int]
    can_reset: bool
    msi_offset: int | None = None
    msix_offset: int | None = None
    caps: list[int] = field(default_factory=list)


def _pow2(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo.bit_length() - 1, hi.bit_length() - 1).map(lambda b: 1 << b)


def _spells_msi(config: bytearray, pointer: int, drawn: list[int]) -> bool:
    """Whether following `pointer` through config bytes that are not drawn capabilities (random ones) meets
    an MSI or MSI-X id, as a capability walk reads them (pointers masked to dwords)."""
    seen: set[int] = set()
    while pointer and pointer not in seen and len(seen) < 64:
        seen.add(pointer)
        at = pointer & 0xFC
        if at in drawn:
            return False  # from here on the chain is the drawn one
        if config[at] in (CAP_MSI, CAP_MSIX):
            return True
        pointer = config[at + 1]
    return False


@st.composite
def host_functions(draw: st.DrawFn) -> HostFunction:
    rng = random.Random(draw(st.integers(0, 1 << 32)))
    pcie = draw(st.booleans())
    config = bytearray(rng.getrandbits(8) for _ in range(4096 if pcie else 256))  # garbage everywhere
    struct.pack_into("<HH", config, 0, draw(st.integers(0, 0xFFFE)), draw(st.integers(0, 0xFFFF)))
    struct.pack_into("<H", config, 4, draw(st.integers(0, 0xFFFF)))  # command: anything the host left
    status = draw(st.integers(0, 0xFFFF)) | (0x10 if draw(st.integers(0, 5)) else 0)
    struct.pack_into("<H", config, 6, status)
    config[0x0E] = draw(st.sampled_from([0x00, 0x80, 0x01, 0x7F]))
    config[0x3D] = draw(st.sampled_from([0, 1, 2, 4, 0xFF]))

    bars: list[HostBar] = []
    index = 0
    while index < 6:
        choice = draw(st.sampled_from(["none", "io", "mem32", "mem64", "mem32", "mem64"]))
        if choice == "none":
            # An absent BAR's register may still hold anything (a 64-bit type that swallows the next one).
            struct.pack_into("<I", config, Reg.BAR0 + 4 * index, draw(st.sampled_from([0, 0x4, U32, 0x1])))
            index += 1
            continue
        if choice == "io":
            kind, size = BarKind.IO, draw(_pow2(4, 256))
        elif choice == "mem64" and index < 5:
            kind, size = BarKind.MEM64, draw(_pow2(16, 1 * GiB))
        else:
            kind, size = BarKind.MEM32, draw(_pow2(16, 64 * MiB))
        if draw(st.integers(0, 9)) == 0:
            size += draw(st.sampled_from([1, 16, 0x1000]))  # a region size that is not a power of two
        prefetchable = kind != BarKind.IO and draw(st.booleans())
        host_address = draw(st.integers(0, U32)) & ~0xF
        low = (
            (1 if kind == BarKind.IO else 0)
            | (0x4 if kind == BarKind.MEM64 else 0)
            | (0x8 if prefetchable else 0)
        )
        struct.pack_into("<I", config, Reg.BAR0 + 4 * index, (host_address & ~0xF) | low)
        if kind == BarKind.MEM64:
            struct.pack_into("<I", config, Reg.BAR0 + 4 * index + 4, draw(st.integers(0, U32)))
        sparse = None
        if kind != BarKind.IO and draw(st.integers(0, 3)) == 0:
            pages = max(size // PAGE, 1)
            sparse = tuple(
                SparseArea(p * PAGE, n * PAGE)
                for p, n in draw(st.lists(st.tuples(st.integers(0, pages), st.integers(0, 4)), max_size=3))
            )
        bars.append(
            HostBar(
                index,
                kind,
                size,
                prefetchable,
                kind != BarKind.IO and draw(st.booleans()),
                sparse,
                draw(st.booleans()),
            )
        )
        index += 2 if kind == BarKind.MEM64 else 1
    rom = draw(st.sampled_from([0, 0, 2 * KiB, 64 * KiB, 1 * MiB]))
    # The ROM's enable bit is left off: the shadow copies it, and check_platform expects it off.
    struct.pack_into("<I", config, Reg.ROM_ADDRESS, draw(st.integers(0, U32)) & ~1)

    # Capabilities at distinct dword-aligned offsets, linked in a drawn order.
    fn = HostFunction(config, bars, rom, {}, draw(st.booleans()))
    kinds = draw(
        st.lists(st.sampled_from([CAP_MSI, CAP_MSIX, CAP_PM, CAP_VENDOR, CAP_PCIE]), max_size=5, unique=True)
    )
    if pcie and CAP_PCIE not in kinds:
        kinds.append(CAP_PCIE)
    slots = draw(st.permutations(list(range(0x40, 0x100, 0x40))))  # 0x40, 0x80, 0xC0: room for 0x3C
    offsets = []
    for kind, off in zip(kinds, slots, strict=False):
        off += draw(st.sampled_from([0, 0, 4, 8]))
        offsets.append(off)
        config[off] = kind
        if kind == CAP_MSI:
            mmc = draw(st.integers(0, 7))  # 6 and 7 are reserved encodings
            control = mmc << 1 | draw(st.sampled_from([0, 0x80])) | draw(st.sampled_from([0, 0x100]))
            control |= draw(st.sampled_from([0, 0, 0x1, 0x70]))  # a host that left it enabled
            struct.pack_into("<H", config, off + 2, control)
            fn.msi_offset = off
        elif kind == CAP_MSIX:
            table_size = draw(st.sampled_from([1, 2, 3, 16, 64, 2048])) - 1
            mems = [b for b in bars if b.kind != BarKind.IO]
            tbir = (
                draw(st.sampled_from([b.index for b in mems] + [0, 5, 6, 7]))
                if mems
                else draw(st.integers(0, 7))
            )
            pbir = draw(st.sampled_from([tbir, tbir, *[b.index for b in mems], 7]))
            toff = draw(st.sampled_from([0, 0x800, 0x1000, 0x2000, 0x2008, 0x10000])) if mems else 0
            poff = draw(st.sampled_from([0x800, 0x1000, 0x3000, toff + 16 * (table_size + 1), 0x3FFF8]))
            struct.pack_into(
                "<HII",
                config,
                off + 2,
                table_size | draw(st.sampled_from([0, 0, 0xC000])),
                toff | tbir,
                (poff & ~7) | pbir,
            )
            fn.msix_offset = off
        elif kind == CAP_PM:
            struct.pack_into("<HH", config, off + 2, 0x0003, draw(st.sampled_from([0, 3, 0x8])))
        elif kind == CAP_VENDOR:
            config[off + 2] = draw(st.sampled_from([4, 8, 12, 0, 0xFF]))
        elif kind == CAP_PCIE:
            struct.pack_into("<H", config, off + 2, 0x0002)
    for i, off in enumerate(offsets):
        nxt = offsets[i + 1] if i + 1 < len(offsets) else 0
        config[off + 1] = nxt
    if offsets and draw(st.integers(0, 4)) == 0:  # hostile: a loop, a pointer into the header or off the end
        target = draw(st.sampled_from([offsets[0], 0x10, 0xFC, 0xFF, 0x41]))
        if _spells_msi(config, target, offsets):  # the oracle knows only the capabilities drawn above
            target = offsets[0]
        config[offsets[-1] + 1] = target
    config[0x34] = offsets[0] if offsets else draw(st.sampled_from([0, 0x40, 0xFF]))
    if not offsets:  # the random bytes 0x34 may point at must not spell an MSI or MSI-X capability
        config[0x40], config[0x41] = draw(st.sampled_from([0x00, CAP_PM, 0xFF])), 0
        config[0xFC], config[0xFD] = draw(st.sampled_from([0x00, CAP_PM, 0xFF])), 0  # 0xFF reads as 0xFC
    fn.caps = offsets
    if pcie:
        ext = draw(st.lists(st.sampled_from(EXT_IDS), max_size=5))
        where = [0x100 + 0x40 * i for i in range(len(ext))]
        for i, (cid, off) in enumerate(zip(ext, where, strict=True)):
            nxt = where[i + 1] if i + 1 < len(where) else 0
            if i == len(where) - 1 and draw(st.integers(0, 3)) == 0:
                nxt = draw(st.sampled_from([0x100, 0xFFC, 0x40]))  # loop or out of bounds
            struct.pack_into("<I", config, off, cid | 1 << 16 | nxt << 20)
        if not ext:
            struct.pack_into("<I", config, 0x100, draw(st.sampled_from([0, U32])))
    fn.irqs = {
        0: draw(st.sampled_from([0, 1])),
        1: draw(st.sampled_from([0, 1, 4, 32])),
        2: draw(st.sampled_from([0, 1, 16, 2048])),
    }
    return fn


class StandInDevice(VfioDevice):
    """A vfio-pci device fd stood in for by a memfd (no ioctls: SET_IRQS and reset are recorded)."""

    def __init__(self, fn: HostFunction) -> None:
        self.fd = os.memfd_create("vfio-fuzz", os.MFD_CLOEXEC)
        self.name = "0000:01:00.0"
        self.flags = VfioDeviceFlag.VFIO_DEVICE_FLAGS_PCI
        if fn.can_reset:
            self.flags |= VfioDeviceFlag.VFIO_DEVICE_FLAGS_RESET
        self.num_regions, self.num_irqs = 9, 5
        self.regions: dict[int, RegionInfo] = {}
        for bar in fn.bars:
            self.regions[bar.index] = RegionInfo(
                bar.index,
                RW | (MMAP if bar.mmap else 0),
                bar.size,
                bar.index * STRIDE,
                bar.sparse,
                bar.msix_mappable,
            )
        if fn.rom:
            self.regions[ROM_INDEX] = RegionInfo(
                ROM_INDEX, VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_READ, fn.rom, ROM_INDEX * STRIDE
            )
        self.regions[CONFIG_INDEX] = RegionInfo(CONFIG_INDEX, RW, len(fn.config), CONFIG_INDEX * STRIDE)
        os.ftruncate(self.fd, 9 * STRIDE)
        os.pwrite(self.fd, bytes(fn.config), CONFIG_INDEX * STRIDE)
        rng = random.Random(len(fn.config))
        for bar in fn.bars:  # recognisable contents the guest may read back
            os.pwrite(
                self.fd, bytes(rng.getrandbits(8) for _ in range(min(bar.size, 0x4000))), bar.index * STRIDE
            )
        if fn.rom:
            os.pwrite(self.fd, b"\x55\xaa" + bytes(min(fn.rom, 256) - 2), ROM_INDEX * STRIDE)
        self.irqs = {i: IrqInfo(i, VfioIrqInfoFlag.VFIO_IRQ_INFO_EVENTFD, n) for i, n in fn.irqs.items() if n}
        self.calls: list[tuple[int, str, int]] = []

    def _set_irqs(
        self,
        index: int,
        flags: VfioIrqSetFlag,
        start: int = 0,
        data: list[int] | None = None,
        count: int | None = None,
    ) -> None:
        assert index in self.irqs, f"SET_IRQS on index {index}, which the device does not have"
        n = len(data) if data else (count or 0)
        assert n <= self.irqs[index].count, f"SET_IRQS of {n} vectors on index {index}"
        self.calls.append((index, VfioIrqSetFlag(flags).name or str(int(flags)), n))

    def raw(self, index: int, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, index * STRIDE + offset)


class FakeVm:
    """irqfd and GSI routing, checked as they arrive."""

    def __init__(self) -> None:
        self.table: list[Route] = list(default_irqchip_routes(layout.IOAPIC_NUM_PINS))
        self.irqfds: dict[int, int] = {}  # gsi -> eventfd

    def set_gsi_routing(self, routes: Sequence[Route]) -> None:
        encode_routes(routes)
        for r in routes:
            if isinstance(r, MsiRoute):
                assert in_msi_window(r.address), f"MSI route of GSI {r.gsi} to {r.address:#x}"
        self.table = list(routes)

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        if deassign:
            assert self.irqfds.pop(gsi, None) == fd, f"deassigning irqfd of GSI {gsi} that is not assigned"
        else:
            assert gsi not in self.irqfds, f"GSI {gsi} gets a second irqfd"
            self.irqfds[gsi] = fd


@dataclass
class FakeMapper:
    slots: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    next: int = 0

    def map_memory(self, gpa: int, size: int, host_address: int) -> int:
        assert gpa % PAGE == 0 and size % PAGE == 0 and size > 0, f"slot {gpa:#x}+{size:#x}"
        for start, length, _ in self.slots.values():
            if gpa < start + length and start < gpa + size:  # KVM refuses overlapping memory slots
                raise OSError(errno.EEXIST, "overlapping KVM memory slot")
        self.next += 1
        self.slots[self.next] = (gpa, size, host_address)
        return self.next

    def unmap_memory(self, handle: int) -> None:
        assert handle in self.slots, f"unmapping slot {handle} twice"
        del self.slots[handle]


# ---- the machine ----------------------------------------------------------------------------------------


class VfioPciMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.p: Platform | None = None
        self.a: Attached | None = None
        self.dev: StandInDevice | None = None
        self.model: VfioPciDevice | None = None
        self._logs = [logging.getLogger(n) for n in ("pyvmm.pci", "pyvmm.vfio", "pyvmm.interrupts")]
        self._levels = [log.level for log in self._logs]
        for log in self._logs:
            log.setLevel(logging.CRITICAL)

    def teardown(self) -> None:
        try:
            if self.model is not None:
                self.model.close()
                assert self.mapper.slots == {}, "KVM slots left after close"
                assert self.vm.irqfds == {}, "irqfds left after close"
                default = default_irqchip_routes(layout.IOAPIC_NUM_PINS)
                assert self.vm.table == default, "MSI routes left after close"
                assert self.dev is not None and self.dev.fd == -1
        finally:
            for log, level in zip(self._logs, self._levels, strict=True):
                log.setLevel(level)
            if self.dev is not None and self.dev.fd >= 0:
                os.close(self.dev.fd)

    @initialize(
        fn=host_functions(),
        ram=st.sampled_from([256 * MiB, 3 << 30, 6 << 30]),
        segments=st.integers(1, 2),
        seg=st.integers(0, 1),
        neighbours=st.lists(device_specs(), max_size=2),
        neighbours_first=st.booleans(),
    )
    def build(
        self, fn: HostFunction, ram: int, segments: int, seg: int, neighbours: list, neighbours_first: bool
    ) -> None:
        self.fn = fn
        self.p = Platform.build(ram, [1] * segments, [1] * segments)
        segment = self.p.segments[seg % segments]
        if neighbours_first:
            for spec in neighbours:
                self.p.attach(segment, spec)
        self.dev = StandInDevice(fn)
        self.vm = FakeVm()
        self.mapper = FakeMapper()
        self.model = VfioPciDevice(
            self.dev,
            self.vm,
            MsiRouter(self.vm),
            memory_slots=self.mapper,  # type: ignore[arg-type]
            page_size=PAGE,
        )
        self.a = self.p.attach_device(segment, self.model)
        if not neighbours_first:
            for spec in neighbours:
                self.p.attach(segment, spec)
        self.original_bars = self.dev.raw(CONFIG_INDEX, Reg.BAR0, 0x18) + self.dev.raw(
            CONFIG_INDEX, Reg.ROM_ADDRESS, 4
        )
        self.msix_phys = self._msix_physical()
        if self.a is not None and self.model.intx_gsi is None:
            self.model.assign_intx(layout.IOAPIC_NUM_PINS - 1)

    def _msix_physical(self) -> list[tuple[int, int, bytes]]:
        """(region, offset, bytes) of the device's MSI-X table and PBA where the guest sees them (a relocated
        table is in the BAR's upper half in the guest: the physical one is then the guest's to write)."""
        m = self.model
        if m is None or m.msix is None:
            return []
        out = []
        x = m.msix
        size = self.dev.regions[x.table_bir].size if self.dev and x.table_bir in self.dev.regions else 0
        config = self.fn.config
        table_off = struct.unpack_from("<I", config, self.fn.msix_offset + 4)[0] & ~7  # type: ignore[operator]
        pba_off = struct.unpack_from("<I", config, self.fn.msix_offset + 8)[0] & ~7  # type: ignore[operator]
        assert self.dev is not None
        if x.table_offset == table_off and table_off < size:
            n = min(x.table_length, size - table_off)
            out.append((x.table_bir, table_off, self.dev.raw(x.table_bir, table_off, n)))
        psize = self.dev.regions[x.pba_bir].size if x.pba_bir in self.dev.regions else 0
        if x.pba_offset == pba_off and pba_off < psize:
            n = min(x.pba_length, psize - pba_off)
            out.append((x.pba_bir, pba_off, self.dev.raw(x.pba_bir, pba_off, n)))
        return out

    # ---- helpers -----------------------------------------------------------------------------------

    def _attached(self) -> bool:
        return self.a is not None

    @property
    def platform(self) -> Platform:
        assert self.p is not None
        return self.p

    @property
    def att(self) -> Attached:
        assert self.a is not None
        return self.a

    def cfg_read(self, reg: int, size: int) -> int:
        return self.platform.cfg_read(self.att, reg, size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.platform.cfg_write(self.att, reg, size, value & ((1 << (8 * size)) - 1))

    def _placements(self) -> dict[int, tuple[BarKind, int, int]]:
        return {pl.index: (pl.kind, pl.address, pl.size) for pl in self.att.segment.placements(self.att.slot)}

    def _pick_bar(self, pick: int) -> tuple[int, BarKind, int, int] | None:
        placed = sorted(self._placements().items())
        if not placed:
            return None
        index, (kind, address, size) = placed[pick % len(placed)]
        return index, kind, address, size

    # ---- raw accesses ------------------------------------------------------------------------------

    @precondition(_attached)
    @rule(
        register=st.one_of(st.integers(0, 0x40), st.integers(0, 0xFFF), st.sampled_from(BAR_DWORDS)),
        size=st.sampled_from([1, 2, 4, 4, 3, 8]),
        value=st.integers(0, (1 << 64) - 1),
        write=st.booleans(),
        function=st.sampled_from([0, 0, 0, 1]),
    )
    def ecam(self, register: int, size: int, value: int, write: bool, function: int) -> None:
        p, a = self.platform, self.att
        address = p.ecam_address(a.segment, a.slot, register, function)
        if write:
            p.mmio.write(address, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= p.mmio.read(address, size) < 1 << (8 * size)

    @precondition(_attached)
    @rule(
        register=st.integers(0, 0xFF),
        data_offset=st.integers(0, 3),
        size=st.sampled_from([1, 2, 4]),
        value=st.integers(0, U32),
        write=st.booleans(),
    )
    def cf8(self, register: int, data_offset: int, size: int, value: int, write: bool) -> None:
        p, a = self.platform, self.att
        if a.segment is not p.segments[0]:
            return
        p.pio.write(layout.PCI_CONFIG_IO_PORT, 4, 1 << 31 | a.slot << 11 | register)
        port = layout.PCI_CONFIG_IO_PORT + 4 + data_offset
        if write:
            p.pio.write(port, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= p.pio.read(port, size) < 1 << (8 * size)

    @precondition(_attached)
    @rule(
        pick=st.integers(0, 16),
        offset=st.integers(0, 1 << 30),
        size=st.sampled_from([1, 2, 4, 8, 3]),
        value=st.integers(0, (1 << 64) - 1),
        write=st.booleans(),
        near_msix=st.booleans(),
    )
    def bar_access(self, pick: int, offset: int, size: int, value: int, write: bool, near_msix: bool) -> None:
        """An access through a BAR's bus range: anywhere, or around the MSI-X table and PBA."""
        chosen = self._pick_bar(pick)
        if chosen is None:
            return
        index, kind, address, bar_size = chosen
        m = self.model
        if near_msix and m is not None and m.msix is not None:
            x = m.msix
            targets = [
                x.table_offset,
                x.table_offset + x.table_length,
                x.pba_offset,
                x.pba_offset + x.pba_length,
            ]
            index = x.table_bir if offset & 1 else x.pba_bir
            if index not in self._placements():
                return
            kind, address, bar_size = self._placements()[index]
            offset = targets[offset % 4] + (offset >> 2) % 24 - 12
        offset %= bar_size
        if not STRADDLING_MSIX_ACCESSES_HANDLED:
            offset -= offset % (4 if size == 3 else size)
        bus = self.platform.bus_for(kind)
        width = min(size, bar_size - offset) if size != 3 else size
        if write:
            bus.write(address + offset, width, value & ((1 << (8 * width)) - 1))
        else:
            assert 0 <= bus.read(address + offset, width) < 1 << (8 * width)

    # ---- Linux-like sequences ----------------------------------------------------------------------

    @precondition(_attached)
    @rule(decode_off=st.booleans(), rom_value=st.sampled_from([0xFFFF_FFFE, U32]))
    def size_all_bars(self, decode_off: bool, rom_value: int) -> None:
        # A lower half written alone waits for its upper half (as Linux always writes both): complete any
        # such write first, so that the sizing below starts from registers that say where the BARs are.
        for index, (kind, _, _) in self._placements().items():
            if kind == BarKind.MEM64:
                reg = bar_register(index) + 4
                self.cfg_write(reg, 4, self.cfg_read(reg, 4))
        command = self.cfg_read(Reg.COMMAND, 2)
        if decode_off:
            self.cfg_write(Reg.COMMAND, 2, command & ~DECODE)
        placed = self._placements()
        saved = [self.cfg_read(r, 4) for r in BAR_DWORDS]
        for r in BAR_DWORDS:
            self.cfg_write(r, 4, rom_value if r == Reg.ROM_ADDRESS else U32)
        sizing = [self.cfg_read(r, 4) for r in BAR_DWORDS]
        for r, value in zip(BAR_DWORDS, saved, strict=True):
            self.cfg_write(r, 4, value)
        self.cfg_write(Reg.COMMAND, 2, command)
        for r, before, answer in zip(BAR_DWORDS, saved, sizing, strict=True):
            # A register the guest left holding its own sizing answer (a hostile move to ~(size-1)) is in
            # the sizing state: restoring that value is a move attempt, refused and rolled back.
            assert self.cfg_read(r, 4) == before or before == answer, f"register {r:#x} not restored"
        assert self._placements() == placed
        # The sizing answer is the shadow BAR's size, type bits kept.
        for index, (kind, _address, size) in placed.items():
            answer = sizing[6 if index == ROM_BAR_INDEX else index]
            if kind == BarKind.IO:
                assert answer & ~0x3 & 0xFFFF == ~(size - 1) & 0xFFFC, f"BAR{index} sizing {answer:#x}"
            elif kind == BarKind.ROM:
                assert answer & ~0x7FF == ~(size - 1) & U32 & ~0x7FF, f"ROM sizing {answer:#x}"
            else:
                assert answer & ~0xF == ~(size - 1) & U32 & ~0xF, f"BAR{index} sizing {answer:#x}"

    def _targets(self, kind: BarKind, size: int) -> st.SearchStrategy[int]:
        s = self.att.segment
        w = s.windows.mmio64 if kind == BarKind.MEM64 else s.windows.mmio32
        if kind == BarKind.IO:
            return st.one_of(
                st.integers(0, 0xFFFF).map(lambda a: a & ~(size - 1)), st.sampled_from([0x3F8, 0xCF8, 0])
            )
        hostile = [
            0,
            PAGE,
            layout.LOW_RAM_END - size,
            layout.PCI_MMCONFIG_START,
            layout.MSI_WINDOW_START,
            w.start - size,
            w.start + w.size,
            ram_end(self.platform.ram_size) - size,
            1 << 40,
            U32 & ~0xF,
        ]
        aligned = st.integers(w.start // size, (w.start + w.size - size) // size).map(lambda n: n * size)
        return st.one_of(aligned, aligned, st.sampled_from(hostile), st.integers(0, (1 << 64) - 1))

    @precondition(_attached)
    @rule(pick=st.integers(0, 16), data=st.data(), decode_off=st.booleans(), upper_first=st.booleans())
    def move_bar(self, pick: int, data: st.DataObject, decode_off: bool, upper_first: bool) -> None:
        chosen = self._pick_bar(pick)
        if chosen is None:
            return
        index, kind, _address, size = chosen
        target = data.draw(self._targets(kind, size), label="target")
        command = self.cfg_read(Reg.COMMAND, 2)
        if decode_off:
            self.cfg_write(Reg.COMMAND, 2, command & ~DECODE)
        reg = bar_register(index)
        if kind == BarKind.ROM:
            writes = [(reg, (target & U32 & ~0x7FF) | data.draw(st.sampled_from([0, 1]), label="enable"))]
        elif kind == BarKind.MEM64:
            writes = [(reg, target & U32), (reg + 4, target >> 32 & U32)]
            if upper_first:
                writes.reverse()
        else:
            writes = [(reg, target & U32)]
        for r, v in writes:
            self.cfg_write(r, 4, v)
        self.cfg_write(Reg.COMMAND, 2, command | (DECODE if decode_off else 0))

    @precondition(_attached)
    @rule(value=st.integers(0, 0xFFFF))
    def command(self, value: int) -> None:
        self.cfg_write(Reg.COMMAND, 2, value)

    @rule()
    def walk_capabilities(self) -> None:
        """What the guest kernel's pci_find_capability does (bounded like Linux: 48 steps)."""
        if self.a is None:
            return  # the device did not fit its segment: nothing for the guest to do
        if not self.cfg_read(Reg.STATUS, 2) & 0x10:
            return
        ptr = self.cfg_read(0x34, 1)
        for _ in range(48):
            if ptr < 0x40:
                break
            ptr &= ~3
            header = self.cfg_read(ptr, 2)
            if header & 0xFF == 0xFF:
                break
            ptr = header >> 8
        ext = 0x100
        for _ in range(480):
            header = self.cfg_read(ext, 4)
            if header in (0, U32):
                break
            ext = header >> 20 & 0xFFC
            if ext < 0x100:
                break

    # ---- interrupts --------------------------------------------------------------------------------

    @precondition(lambda self: self.a is not None and self.fn.msi_offset is not None)
    @rule(
        reg=st.sampled_from([0x2, 0x4, 0x8, 0xC, 0x10, 0x14]),
        size=st.sampled_from([1, 2, 4]),
        value=st.integers(0, U32),
        address=st.sampled_from(
            [layout.MSI_WINDOW_START, layout.MSI_WINDOW_START + 0x1000, 0, 0xFEDF_FFFC, 0xFEF0_0000, U32]
        ),
        enable=st.integers(0, 0x7F),
    )
    def program_msi(self, reg: int, size: int, value: int, address: int, enable: int) -> None:
        base = self.fn.msi_offset
        assert base is not None
        self.cfg_write(base + 4, 4, address)
        if reg + size <= 0x18:
            self.cfg_write(base + reg, size, value)
        self.cfg_write(base + 2, 2, enable << 0 | (enable & 0x70))

    @precondition(lambda self: self.a is not None and self.model is not None and self.model.msix is not None)
    @rule(
        entry=st.integers(0, 2047),
        address=st.one_of(
            st.integers(layout.MSI_WINDOW_START, layout.MSI_WINDOW_START + layout.MSI_WINDOW_SIZE - 1),
            st.sampled_from(
                [
                    0,
                    layout.MSI_WINDOW_START - 4,
                    layout.MSI_WINDOW_START + layout.MSI_WINDOW_SIZE,
                    layout.MSI_WINDOW_START | 1 << 32,
                    U32,
                ]
            ),
            st.integers(0, (1 << 64) - 1),
        ),
        data=st.integers(0, U32),
        masked=st.booleans(),
        control=st.sampled_from([0x8000, 0xC000, 0x4000, 0]),
    )
    def program_msix(self, entry: int, address: int, data: int, masked: bool, control: int) -> None:
        """Through the table in its BAR (where the guest finds it from the capability), then the control."""
        m = self.model
        assert m is not None and m.msix is not None
        x = m.msix
        off = self.fn.msix_offset
        assert off is not None
        table = self.cfg_read(off + 4, 4)
        bir, toff = table & 7, table & ~7
        placed = self._placements()
        if bir in placed:
            kind, base, size = placed[bir]
            e = toff + 16 * (entry % x.table_size)
            if e + 16 <= size and kind != BarKind.IO:
                bus = self.platform.bus_for(kind)
                bus.write(base + e, 8, address & ((1 << 64) - 1))
                bus.write(base + e + 8, 4, data)
                bus.write(base + e + 12, 4, int(masked))
        self.cfg_write(off + 2, 2, control)

    # ---- invariants --------------------------------------------------------------------------------

    @invariant()
    def platform_invariants(self) -> None:
        if self.p is not None:
            check_platform(self.p)

    @invariant()
    def device_untouched_where_emulated(self) -> None:
        if self.dev is None or self.model is None:
            return
        now = self.dev.raw(CONFIG_INDEX, Reg.BAR0, 0x18) + self.dev.raw(CONFIG_INDEX, Reg.ROM_ADDRESS, 4)
        assert now == self.original_bars, "a shadow BAR/ROM value reached the device's config space"
        for index, offset, data in self.msix_phys:
            assert self.dev.raw(index, offset, len(data)) == data, (
                f"the guest wrote the device's MSI-X {'table' if offset == self.msix_phys[0][1] else 'PBA'} "
                f"in BAR{index} at {offset:#x}"
            )

    @invariant()
    def interrupts_in_the_msi_window(self) -> None:
        if self.model is None:
            return
        default = default_irqchip_routes(layout.IOAPIC_NUM_PINS)
        assert self.vm.table[: len(default)] == default
        msi = {r.gsi for r in self.vm.table[len(default) :] if isinstance(r, MsiRoute)}
        for gsi in self.vm.irqfds:
            assert gsi in msi or gsi < layout.IOAPIC_NUM_PINS, f"irqfd on GSI {gsi} without a route"

    @invariant()
    def kvm_slots_inside_their_bars(self) -> None:
        if self.model is None or self.a is None:
            return
        s = self.a.segment
        placed = self._placements()
        others = [
            (pl.address, pl.size, (a.device.name, pl.index))
            for a in self.platform.devices
            for pl in a.segment.placements(a.slot)
            if pl.kind != BarKind.IO
        ]
        areas = {(m.bar, m.offset): m for m in self.model.mapped_areas}
        spans = []
        for gpa, size, host in self.mapper.slots.values():
            area = next((m for m in areas.values() if m.host_address == host and m.size == size), None)
            assert area is not None, f"KVM slot {gpa:#x}+{size:#x} maps no BAR area"
            kind, base, bar_size = placed[area.bar]
            assert gpa == base + area.offset, f"slot at {gpa:#x}, BAR{area.bar} at {base:#x}+{area.offset:#x}"
            region = self.dev.regions[area.bar] if self.dev else None
            assert region is not None and area.offset + size <= max(region.size, PAGE)
            if bar_size >= PAGE:
                assert gpa + size <= base + bar_size, f"slot {gpa:#x}+{size:#x} outside BAR{area.bar}"
            window = s.windows.mmio64 if kind == BarKind.MEM64 else s.windows.mmio32
            assert window.contains(gpa, size), f"slot {gpa:#x}+{size:#x} outside {window}"
            assert gpa >= ram_end(self.platform.ram_size) or gpa >= layout.LOW_RAM_END, "slot over RAM"
            if bar_size < PAGE and not SUBPAGE_BARS_RESERVE_THEIR_PAGE:
                continue  # the known open bug: see SUBPAGE_BARS_RESERVE_THEIR_PAGE
            for start, length, who in others:
                if who == (self.model.name, area.bar):
                    continue
                assert not (gpa < start + length and start < gpa + size), (
                    f"KVM slot of BAR{area.bar} [{gpa:#x}+{size:#x}] covers {who} at [{start:#x}+{length:#x}]"
                )
            spans.append((gpa, size))
        spans.sort()
        for (a0, s0), (a1, _) in itertools.pairwise(spans):
            assert a0 + s0 <= a1, "two KVM slots overlap"


__all__ = ["FuzzDevice", "VfioPciMachine"]
