"""The VFIO PCI device model: a host PCI function presented to the guest (docs/vfio.md).

Configuration space: BARs and the ROM live only in a shadow PciConfiguration (sized and relocated there,
never written to the device); MSI and MSI-X are emulated with pci/msi.py and routed with irqfds; the
multi-function bit reads clear, the interrupt pin reads INTA; everything else is the VFIO config region,
with read patches (hidden extended capabilities, the GPUDirect clique capability).

Data path: mmappable BAR areas become guest memory through MemorySlots (KVM slots); the MSI-X table and
PBA pages and non-mmappable BARs trap here and are served with pread/pwrite on the device fd. Interrupts
never pass through Python: VFIO signals eventfds that KVM injects (MSI/MSI-X: irqfd on an MSI route;
INTx: irqfd with a resample fd that unmasks the line at the guest's EOI).

Guest-controlled calls never raise: failures are logged and the access is dropped or reads all-ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyvmm import pci_sysfs
from pyvmm.errors import ExitStatus
from pyvmm.hypervisor import Irqfds, MemorySlots
from pyvmm.interrupts import IrqfdMsiVectors, MsiRouter
from pyvmm.pci.bar import NUM_BARS, ROM_BAR_INDEX, BarInfo, BarKind, BarMove
from pyvmm.pci.config import Command, PciConfiguration, Reg
from pyvmm.pci.device import PciDevice
from pyvmm.pci.msi import MsiCapability, MsiMessage, MsixCapability
from pyvmm.vfio import capabilities as caps
from pyvmm.vfio.areas import MsixLayout, mappable_areas, relocate_msix
from pyvmm.vfio.bindings import VfioIrqInfoFlag, VfioPciIrq, VfioPciRegion
from pyvmm.vfio.container import VfioContainer
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.hostmap import PAGE_SIZE, HostMapping

log = logging.getLogger(__name__)

_INTX = VfioPciIrq.VFIO_PCI_INTX_IRQ_INDEX
_MSI = VfioPciIrq.VFIO_PCI_MSI_IRQ_INDEX
_MSIX = VfioPciIrq.VFIO_PCI_MSIX_IRQ_INDEX
_HEADER_DWORD = 0x0C
_MULTI_FUNCTION = 1 << 23
_INTERRUPT_DWORD = 0x3C
_BAR_DWORDS = frozenset([*range(Reg.BAR0, Reg.BAR0 + 4 * NUM_BARS, 4), Reg.ROM_ADDRESS])


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


@dataclass(frozen=True)
class MappedArea:
    """One mmapped part of a BAR: `size` bytes at `offset` in the BAR, at host address `host_address`."""

    bar: int
    offset: int
    size: int
    host_address: int


@dataclass
class _Mapping:
    area: MappedArea
    host: HostMapping
    gpa: int | None = None
    handle: int | None = None
    dma_iova: int | None = None


@dataclass(frozen=True)
class HostBar:
    """A BAR of the host function as VFIO (region sizes) or sysfs (`resource`) reports it."""

    index: int
    kind: BarKind
    size: int
    prefetchable: bool = False


def bar_kind(flags: int) -> BarKind:
    """The kind of a BAR from the low bits of its register."""
    if flags & 1:
        return BarKind.IO
    return BarKind.MEM64 if flags & 0x6 == 0x4 else BarKind.MEM32


def msix_geometry(
    read: caps.ConfigReader,
    offset: int,
    region_size: Callable[[int], int | None],
    max_vectors: int,
    page_size: int,
    relocate: bool = False,
) -> tuple[int, int, int, int, MsixLayout] | None:
    """(vectors, table BIR, PBA BIR, physical PBA offset, guest layout) of the MSI-X capability at `offset`.

    `region_size(bir)` is the host size of a BAR (None: absent). Shared by the device model and the planner,
    so both agree on how far the table relocation (docs/vfio.md#msi-x-table-relocation) enlarges a 64-bit BAR;
    `relocate` (x_msix_relocation=on) relocates a page-aligned table too.
    """
    control = read(offset + 2, 2)
    table = read(offset + 4, 4)
    pba = read(offset + 8, 4)
    size = (control & 0x7FF) + 1
    if max_vectors:
        size = min(size, max_vectors)
    table_bir, table_off = table & 7, table & ~7
    pba_bir, pba_off = pba & 7, pba & ~7
    bar_size = region_size(table_bir) if table_bir < NUM_BARS else None
    if table_bir >= NUM_BARS or pba_bir >= NUM_BARS or bar_size is None:
        return None
    is_64 = bar_kind(read(Reg.BAR0 + 4 * table_bir, 4)) == BarKind.MEM64
    pba_len = (size + 63) // 64 * 8
    layout = relocate_msix(bar_size, is_64, table_bir, table_off, size * 16, pba_bir, pba_off, pba_len,
                           page_size, force=relocate)
    return size, table_bir, pba_bir, pba_off, layout


class MsixRelocationError(VfioError):
    """x_msix_relocation=on given for a function it cannot apply to: the command line is at fault (exit 2)."""

    exit_status = ExitStatus.USAGE


def msix_relocation_problem(
    read: caps.ConfigReader, offset: int | None, region_size: Callable[[int], int | None]
) -> str | None:
    """Why x_msix_relocation=on cannot move this function's MSI-X table (None: it can). As for a table that
    shares a page, only a 64-bit BAR is enlarged (docs/vfio.md#msi-x-table-relocation)."""
    if offset is None:
        return "the function has no MSI-X capability"
    bir = read(offset + 4, 4) & 7
    if bir >= NUM_BARS or region_size(bir) is None:
        return f"its MSI-X table names BAR{bir}, which it does not have"
    if bar_kind(read(Reg.BAR0 + 4 * bir, 4)) != BarKind.MEM64:
        return f"its MSI-X table is in BAR{bir}, a 32-bit BAR (only a 64-bit BAR is enlarged for the table)"
    return None


def guest_bar_layout(
    host: Iterable[HostBar], msix_bar: tuple[int, int] | None, page_size: int, name: str = "device"
) -> list[BarInfo]:
    """The BARs the guest sees for a host function: sizes raised to the PCI minimum, the MSI-X table's BAR
    enlarged by its relocation (`msix_bar` = (BIR, guest size)), sub-page memory BARs raised to a page (they
    can only be mapped whole), sizes that are not powers of two left out. Shared by the device model and
    `--dry-run`, so both place the same BARs."""
    out: list[BarInfo] = []
    for bar in host:
        size = bar.size
        if msix_bar is not None and bar.index == msix_bar[0]:
            size = max(size, msix_bar[1])
        minimum = {BarKind.IO: 4, BarKind.ROM: 2048}.get(bar.kind, 16)
        size = max(size, minimum)
        if size & (size - 1):
            log.warning("%s: BAR%d size %#x is not a power of two, left out", name, bar.index, size)
            continue
        if bar.kind in (BarKind.MEM32, BarKind.MEM64) and size < page_size:
            # A sub-page BAR can only be mapped as a whole page: show the guest a page-sized BAR so that no
            # other BAR is placed in the rest of that page (accesses past the device's size read all-ones).
            size = page_size
        out.append(BarInfo(bar.index, bar.kind, size, bar.prefetchable and bar.kind != BarKind.IO))
    return out


class _VectorSink:
    """Forwards pci/msi.py routing changes to irqfd vectors and enable changes to the device model."""

    def __init__(self, owner: VfioPciDevice, index: VfioPciIrq, vectors: IrqfdMsiVectors) -> None:
        self.owner = owner
        self.index = index
        self.vectors = vectors

    def vector_changed(self, vector: int, message: MsiMessage | None) -> None:
        self.vectors_changed([(vector, message)])

    def vectors_changed(self, changes: list[tuple[int, MsiMessage | None]]) -> None:
        routed = self.vectors.vectors_changed(changes)  # never raises: a failed vector stays masked
        if routed:
            self.owner._vectors_routed(self.index, routed)

    def enable_changed(self, enabled: bool, count: int) -> None:
        self.owner._irq_enable_changed(self.index, enabled, count)

    def signal(self, vector: int, message: MsiMessage) -> None:
        """Nothing to do: VFIO's eventfd holds interrupts raised while masked until the irqfd is back."""


class VfioPciDevice(PciDevice):
    """A host PCI function assigned to the guest through VFIO."""

    def __init__(
        self,
        device: VfioDevice,
        irqfds: Irqfds,
        router: MsiRouter,
        name: str | None = None,
        memory_slots: MemorySlots | None = None,
        exclude_mmap_bars: Iterable[int] = (),
        p2p_container: VfioContainer | None = None,
        gpudirect_clique: int | None = None,
        page_size: int = PAGE_SIZE,
        msix_relocation: bool = False,
    ) -> None:
        self.device = device
        self.name = name or device.name
        self._irqfds = irqfds
        self._router = router
        self._slots = memory_slots
        self._p2p = p2p_container
        self._p2p_refused: set[tuple[int, int]] = set()  # (BAR, guest address) already reported
        self._page = page_size
        self._exclude = frozenset(exclude_mmap_bars)
        self._relocate = msix_relocation
        self._mappings: list[_Mapping] = []
        # One lock around what vCPU threads can race on: BAR moves and mappings, MSI/MSI-X updates, the
        # config writes that drive both (re-entrant: a config write may move BARs and enable MSI-X).
        self._lock = threading.RLock()
        # BAR pages are in the guest only while the guest has Memory Space Enable set and the function is
        # not in D3hot: vfio-pci revokes its mmaps in both cases, and a memslot over a revoked mapping fails
        # KVM_RUN with EFAULT. With no memslot the access traps and reads all-ones, as a master abort does.
        self._memory_space = bool(device.read_config(Reg.COMMAND, 2) & Command.MEMORY_SPACE)
        self._pm_off: int | None = None
        self._d3hot = False
        self._memory_enabled = self._memory_space
        self._intx_gsi: int | None = None
        self._intx_trigger = -1
        self._intx_resample = -1
        self._intx_armed = False
        self._active: dict[VfioPciIrq, int] = {}  # MSI/MSI-X index -> vectors given to VFIO
        self.msi: MsiCapability | None = None
        self.msix: MsixCapability | None = None
        self._msi_sink: _VectorSink | None = None
        self._msix_sink: _VectorSink | None = None
        self._msi_off = self._msix_off = -1
        self._msix_phys_pba = 0
        self._msix_phys_table = 0
        self._msix_given: set[int] = set()  # MSI-X vectors whose eventfd VFIO has (guest unmasked them once)
        self._emulated: frozenset[int] | None = None  # see _emulated_dwords
        # Fixed once the model is built; looked up on every trapped BAR access (a vCPU exit) instead of
        # being derived again from the shadow and the MSI-X capability.
        self._bar_sizes: dict[int, int] = {}  # BAR index -> size (0: not implemented)
        self._msix_areas: tuple[tuple[str, int, int, int], ...] = ()  # see _msix_target
        self._msix_warned = False
        try:
            # The device was reset before the model exists (VfioPassthrough.reset): MSI/MSI-X control words
            # are read here in their after-reset state (docs/vfio.md#device-creation-order).
            self.caps = caps.scan(device.read_config, device.config_size)
            self._pm_off = self.caps.find(caps.CapId.PM)
            self._d3hot = self._power_state_d3hot()
            self._memory_enabled = self._memory_space and not self._d3hot
            self._patches: dict[int, list[caps.ConfigPatch]] = {}
            for patch in caps.hidden_ext_cap_patches(self.caps):
                self.add_patch(patch)
            if gpudirect_clique is not None:
                for patch in caps.gpudirect_clique_patches(self.caps, gpudirect_clique, device.read_config):
                    self.add_patch(patch)
            self._setup_msi()
            self._setup_msix()
            self.shadow = self._build_shadow()
            self._map_host_areas()
        except BaseException:
            self.close()
            raise

    # ---- construction ---------------------------------------------------------------------------------

    def add_patch(self, patch: caps.ConfigPatch) -> None:
        """Make bits of a config dword read as something else (for capability add-ons like the clique)."""
        self._patches.setdefault(patch.offset & ~3, []).append(patch)
        self._emulated = None

    def _vectors(self, count: int) -> IrqfdMsiVectors:
        return IrqfdMsiVectors(self._router, self._irqfds, count, self.name)

    def _setup_msi(self) -> None:
        offset = self.caps.find(caps.CapId.MSI)
        if offset is None or self.device.irq_count(_MSI) == 0:
            return
        control = self.device.read_config(offset + 2, 2)
        probe = MsiCapability.from_control(control, _NullSink())
        vectors = min(probe.vectors, self.device.irq_count(_MSI))
        vectors = 1 << (vectors.bit_length() - 1)
        self._msi_sink = _VectorSink(self, _MSI, self._vectors(vectors))
        self.msi = MsiCapability(self._msi_sink, vectors, probe.address_64, probe.per_vector_mask)
        self._msi_off = offset

    def _setup_msix(self) -> None:
        offset = self.caps.find(caps.CapId.MSIX)

        def region_size(index: int) -> int | None:
            return region.size if (region := self.device.region(index)) is not None else None

        if self._relocate:
            problem = msix_relocation_problem(self.device.read_config, offset, region_size)
            if problem is None and self.device.irq_count(_MSIX) == 0:
                problem = "VFIO offers no MSI-X vectors for it"
            if problem is not None:
                raise MsixRelocationError(f"{self.name}: x_msix_relocation=on: {problem}; remove the key")
        if offset is None or self.device.irq_count(_MSIX) == 0:
            return  # without VFIO MSI-X vectors the capability passes through untouched
        geometry = msix_geometry(
            self.device.read_config, offset, region_size, self.device.irq_count(_MSIX), self._page,
            relocate=self._relocate,
        )
        if geometry is None:
            log.warning("%s: MSI-X table BAR is unusable, capability passed through", self.name)
            return
        size, table_bir, pba_bir, pba_off, layout = geometry
        self._msix_bar_size = layout.bar_size
        self._msix_phys_table = self.device.read_config(offset + 4, 4) & ~7
        self._msix_phys_pba = pba_off
        if layout.table_offset != self._msix_phys_table:
            log.info(
                "%s: MSI-X table relocated: BAR%d %#x -> %#x bytes, table %#x -> %#x, PBA BAR%d %#x -> %#x",
                self.name, table_bir, region_size(table_bir) or 0, layout.bar_size, self._msix_phys_table,
                layout.table_offset, pba_bir, pba_off, layout.pba_offset,
            )  # fmt: skip
        self._msix_sink = _VectorSink(self, _MSIX, self._vectors(size))
        self.msix = msix = MsixCapability(
            self._msix_sink, size, table_bir, layout.table_offset, pba_bir, layout.pba_offset
        )
        self._msix_off = offset
        self._msix_areas = tuple((name, bir, start, start + length) for name, bir, start, length in (
            ("table", msix.table_bir, msix.table_offset, msix.table_length),
            ("pba", msix.pba_bir, msix.pba_offset, msix.pba_length),
            # The physical table left behind by a relocation: never the device's (the guest's is above).
            ("straddle", msix.table_bir, self._msix_phys_table, msix.table_length),
        ))

    def _build_shadow(self) -> PciConfiguration:
        read = self.device.read_config
        shadow = PciConfiguration(
            vendor_id=read(Reg.VENDOR_ID, 2),
            device_id=read(Reg.DEVICE_ID, 2),
            class_code=read(Reg.CLASS_CODE, 1),
            subclass=read(Reg.SUBCLASS, 1),
            prog_if=read(Reg.PROG_IF, 1),
            revision_id=read(Reg.REVISION_ID, 1),
            subsystem_vendor_id=read(Reg.SUBSYSTEM_VENDOR_ID, 2),
            subsystem_id=read(Reg.SUBSYSTEM_ID, 2),
        )
        # The shadow gates BAR moves on Memory/IO Space Enable: start from the device's command register.
        shadow.poke(Reg.COMMAND, 2, read(Reg.COMMAND, 2))
        host: list[HostBar] = []
        index = 0
        while index < NUM_BARS:
            region = self.device.region(index)
            flags = read(Reg.BAR0 + 4 * index, 4)
            kind = bar_kind(flags)
            if region is not None and region.size:
                host.append(HostBar(index, kind, region.size, bool(flags & 0x8) and kind != BarKind.IO))
            index += 2 if kind == BarKind.MEM64 else 1
        rom = self.device.region(VfioPciRegion.VFIO_PCI_ROM_REGION_INDEX)
        if rom is not None and rom.size:
            host.append(HostBar(ROM_BAR_INDEX, BarKind.ROM, rom.size))
        msix_bar = (self.msix.table_bir, self._msix_bar_size) if self.msix is not None else None
        rom_enable = bool(read(Reg.ROM_ADDRESS, 4) & 1)
        for bar in guest_bar_layout(host, msix_bar, self._page, self.name):
            try:
                shadow.add_bar(bar.index, bar.kind, bar.size, bar.prefetchable,
                               rom_enable=rom_enable and bar.kind == BarKind.ROM, align=bar.align)
            except ValueError as e:
                log.warning("%s: BAR%d left out: %s", self.name, bar.index, e)
        return shadow

    def _msix_holes(self, index: int) -> list[tuple[int, int]]:
        holes: list[tuple[int, int]] = []
        msix = self.msix
        if msix is None:
            return holes
        if msix.table_bir == index:
            # The physical table, wherever the guest sees it: relocated or not, its page never reaches the
            # guest (docs/vfio.md#which-bar-parts-are-mapped).
            holes.append((self._msix_phys_table, msix.table_length))
        if msix.pba_bir == index:
            holes.append((self._phys_pba_offset(), msix.pba_length))
        return holes

    def _phys_pba_offset(self) -> int:
        return self._msix_phys_pba

    def _map_host_areas(self) -> None:
        for bar in self.shadow.bars():
            if bar.kind not in (BarKind.MEM32, BarKind.MEM64):
                continue  # I/O BARs and the ROM always trap
            region = self.device.region(bar.index)
            if region is None:
                continue
            if bar.index in self._exclude:
                log.info(
                    "%s: BAR%d (%#x bytes) excluded from mmap (x_exclude_mmap_bars)",
                    self.name,
                    bar.index,
                    region.size,
                )
                continue
            areas = mappable_areas(
                region.size,
                region.mmappable,
                region.sparse_areas,
                region.msix_mappable,
                self._msix_holes(bar.index),
                self._page,
            )
            for area in areas:
                host = self.device.mmap(bar.index, area.offset, area.size)
                # Which BAR bytes the guest reaches without a trap (the rest traps): the lab's proof that the
                # MSI-X pages are not among them (docs/vfio.md#which-bar-parts-are-mapped).
                log.info("%s: BAR%d [%#x, %#x) mmapped at host %#x", self.name, bar.index, area.offset,
                         area.offset + area.size, host.address)
                self._mappings.append(
                    _Mapping(MappedArea(bar.index, area.offset, area.size, host.address), host)
                )

    # ---- what the builder uses ------------------------------------------------------------------------

    @property
    def mapped_areas(self) -> list[MappedArea]:
        return [m.area for m in self._mappings]

    def guest_mappings(self) -> list[tuple[int, int, int]]:
        """(guest address, size, host address) of every mmapped BAR area at its current BAR address."""
        out = []
        for m in self._mappings:
            gpa = self._area_gpa(m.area)
            if gpa is not None:
                out.append((gpa, m.area.size, m.area.host_address))
        return out

    def _area_gpa(self, area: MappedArea, base: int | None = None) -> int | None:
        try:
            base = self.shadow.bar_address(area.bar) if base is None else base
        except ValueError:
            return None
        gpa = base + area.offset
        return gpa if base and gpa % self._page == 0 else None

    def _install(self, m: _Mapping, base: int | None = None) -> None:
        if not self._memory_enabled:
            return
        gpa = self._area_gpa(m.area, base)
        if gpa is None:
            log.debug(
                "%s: BAR%d area +%#x not page aligned in the guest: it traps",
                self.name,
                m.area.bar,
                m.area.offset,
            )
            return
        if self._slots is not None:
            m.handle = self._slots.map_memory(gpa, m.area.size, m.area.host_address)
        m.gpa = gpa
        if self._p2p is not None:
            try:
                self._p2p.map_dma(gpa, m.area.size, m.area.host_address)
                m.dma_iova = gpa
            except VfioError as e:
                # Peer-to-peer DMA is an extra: an IOMMU narrower than the guest's BAR addresses refuses it.
                # Said once per place: the guest toggles memory decoding, and each toggle maps again.
                first = (m.area.bar, gpa) not in self._p2p_refused
                self._p2p_refused.add((m.area.bar, gpa))
                log.log(logging.WARNING if first else logging.DEBUG,
                        "%s: no peer-to-peer DMA to BAR%d area: %s", self.name, m.area.bar, e)

    def _uninstall(self, m: _Mapping) -> None:
        if m.dma_iova is not None and self._p2p is not None:
            with contextlib.suppress(VfioError):
                self._p2p.unmap_dma(m.dma_iova, m.area.size)
            m.dma_iova = None
        if m.handle is not None and self._slots is not None:
            self._slots.unmap_memory(m.handle)
        m.handle = None
        m.gpa = None

    def _sync_memory_enable(self, enabled: bool, moving: dict[int, int]) -> None:
        if enabled == self._memory_enabled:
            return
        self._memory_enabled = enabled
        for m in self._mappings:
            try:
                if not enabled:
                    self._uninstall(m)
                elif m.handle is None:
                    self._install(m, moving.get(m.area.bar))
            except OSError as e:
                log.warning("%s: BAR%d area: %s, it traps", self.name, m.area.bar, e)

    def _reinstall_bar(self, index: int) -> None:
        for m in self._mappings:
            if m.area.bar == index:
                try:
                    self._uninstall(m)
                    self._install(m)
                except OSError as e:
                    log.warning("%s: remapping BAR%d area failed, it traps: %s", self.name, index, e)

    # ---- PciDevice ------------------------------------------------------------------------------------

    def bars(self) -> list[BarInfo]:
        return self.shadow.bars()

    def assign_bar(self, index: int, address: int) -> None:
        with self._lock:
            self.shadow.set_bar_address(index, address)
            for m in self._mappings:
                if m.area.bar == index:
                    self._uninstall(m)
                    self._install(m)

    def bar_move_refused(self, move: BarMove) -> None:
        with self._lock:
            self.shadow.cancel_move(move)
            self._reinstall_bar(move.bar_index)

    def bar_moved(self, move: BarMove) -> None:
        with self._lock:
            self._reinstall_bar(move.bar_index)

    def assign_intx(self, irq: int) -> None:
        """Arm INTx on GSI `irq` (irqfd + resample) when the device has a usable pin."""
        if self.device.irq_count(_INTX) == 0 or not self.device.read_config(Reg.INTERRUPT_PIN, 1):
            return
        if self._intx_gsi is not None:
            return
        self._intx_trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._intx_resample = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._irqfds.irqfd(self._intx_trigger, irq, resample_fd=self._intx_resample)
        self._intx_gsi = irq
        if not self._active:
            self._arm_intx()

    @property
    def intx_gsi(self) -> int | None:
        return self._intx_gsi

    def _arm_intx(self) -> None:
        if self._intx_gsi is None or self._intx_armed:
            return
        try:
            self.device.enable_eventfds(_INTX, [self._intx_trigger])
            # Masked while the unmask path is wired, then opened (the order QEMU uses too).
            self.device.intx_mask()
            self.device.intx_unmask_on(self._intx_resample)
            self.device.intx_unmask()
            self._intx_armed = True
        except VfioError as e:
            log.error("%s: arming INTx failed: %s", self.name, e)

    def _disarm_intx(self) -> None:
        if not self._intx_armed:
            return
        try:
            self.device.disable_irqs(_INTX)
        except VfioError as e:
            log.error("%s: disabling INTx failed: %s", self.name, e)
        self._intx_armed = False

    def _irq_enable_changed(self, index: VfioPciIrq, enabled: bool, count: int) -> None:
        """MSI/MSI-X on: INTx off, then VFIO_DEVICE_SET_IRQS; off: SET_IRQS count 0, then INTx back
        (docs/interrupts.md#enabling-and-disabling-msi-or-msi-x). MSI gets all its vectors at once, MSI-X
        only those the guest has unmasked (docs/interrupts.md#msi-x-vectors-at-the-host)."""
        sink = self._msi_sink if index == _MSI else self._msix_sink
        if sink is None:
            return
        try:
            if index in self._active:
                self.device.disable_irqs(index)
                del self._active[index]
            if index == _MSIX:
                self._msix_given.clear()
            if enabled and count:
                self._disarm_intx()
                if index == _MSIX:
                    used = [v for v in range(count) if sink.vectors.routed(v)]
                    self._msix_set_host(used, count)
                else:
                    self.device.enable_eventfds(index, sink.vectors.eventfds[:count])
                    self._active[index] = count
        except VfioError as e:
            log.error("%s: %s", self.name, e)
        if not self._active:
            self._arm_intx()

    def _vectors_routed(self, index: VfioPciIrq, vectors: list[int]) -> None:
        """The guest unmasked `vectors` and they are routed: VFIO gets the eventfds it lacks."""
        if index != _MSIX or _MSIX not in self._active or self.msix is None:
            return  # MSI: every vector was given at enable; MSI-X off: given when the guest enables it
        new = [v for v in vectors if v not in self._msix_given]
        if new:
            self._msix_set_host(new, self.msix.table_size)

    def _msix_fds(self, start: int, stop: int) -> list[int]:
        assert self._msix_sink is not None
        fds = self._msix_sink.vectors.eventfds
        return [fds[v] if v in self._msix_given else -1 for v in range(start, stop)]

    def _msix_set_host(self, new: list[int], table_size: int) -> None:
        """Give VFIO the eventfds of MSI-X vectors `new`, enabling MSI-X at the host if it is off.

        The host range grows to the highest vector used (QEMU does the same). With VFIO_IRQ_INFO_NORESIZE
        (every kernel before 6.5) a longer range means disabling MSI-X and enabling it again with the new
        count; without it the vectors are added in place. A vector VFIO refuses stays off at the host.
        """
        if self._msix_sink is None:
            return
        old_count = self._active.get(_MSIX, 0)
        want = set(self._msix_given).union(new)
        top = max(want, default=-1) + 1
        # At least 1: count 1 with fd -1 turns MSI-X on at the host with no vector, as the guest has it.
        count = min(max(top, old_count, 1), table_size)
        before = set(self._msix_given)
        self._msix_given = want
        try:
            if old_count == 0:
                self.device.enable_eventfds(_MSIX, self._msix_fds(0, count))
                self._active[_MSIX] = count
            elif count > old_count and self._msix_noresize:
                self.device.disable_irqs(_MSIX)
                del self._active[_MSIX]
                self.device.enable_eventfds(_MSIX, self._msix_fds(0, count))
                self._active[_MSIX] = count
            else:
                lo, hi = min(new), max(new) + 1
                self.device.enable_eventfds(_MSIX, self._msix_fds(lo, hi), start=lo)
                self._active[_MSIX] = max(count, old_count)
        except VfioError as e:
            level = logging.DEBUG if self._msix_warned else logging.WARNING
            self._msix_warned = True
            log.log(level, "%s: MSI-X vectors %s stay off at the host: %s", self.name, sorted(new)[:8], e)
            self._msix_given = before
            if _MSIX not in self._active and old_count:
                with contextlib.suppress(VfioError):  # back to the range that worked
                    self.device.enable_eventfds(_MSIX, self._msix_fds(0, old_count))
                    self._active[_MSIX] = old_count

    @property
    def _msix_noresize(self) -> bool:
        info = self.device.irqs.get(_MSIX)
        return info is None or bool(info.flags & VfioIrqInfoFlag.VFIO_IRQ_INFO_NORESIZE)

    def _power_state_d3hot(self) -> bool:
        """Whether the function is in D3hot (PMCSR PowerState 3), as vfio-pci sees it."""
        if self._pm_off is None:
            return False
        return self.device.read_config(self._pm_off + 4, 2) & 0x3 == 0x3

    # ---- configuration space --------------------------------------------------------------------------

    def _device_dword(self, offset: int) -> int:
        if offset + 4 > self.device.config_size:
            return 0xFFFF_FFFF
        return self.device.read_config(offset, 4)

    def _emulated_dwords(self) -> frozenset[int]:
        """The config dwords a guest does not read straight from the device: the BARs, the header and
        interrupt dwords, the MSI/MSI-X capabilities' emulated words and patched dwords. Every other dword is
        one pread on the exit path (docs/vfio.md#config-reads)."""
        if self._emulated is None:
            dwords = set(_BAR_DWORDS) | {_HEADER_DWORD, _INTERRUPT_DWORD} | set(self._patches)
            for start, handler in self._handlers():
                dwords.update(range((start + 2) & ~3, start + handler.length, 4))
            self._emulated = frozenset(dwords)
        return self._emulated

    def _read_dword(self, offset: int) -> int:
        if offset not in (self._emulated or self._emulated_dwords()):
            return self.device.config_dword(offset)
        if offset in _BAR_DWORDS:
            return self.shadow.read(offset, 4)
        value = self._device_dword(offset)
        if offset == _HEADER_DWORD:
            value &= ~_MULTI_FUNCTION
        elif offset == _INTERRUPT_DWORD:
            # Line: the IRQ this slot's INTA is wired to; pin: INTA, the only pin the guest's _PRT describes.
            line = self._intx_gsi if self._intx_gsi is not None else value & 0xFF
            pin = 1 if self._intx_gsi is not None else 0
            value = (value & 0xFFFF_0000) | (pin << 8) | (line & 0xFF)
        for start, handler in self._handlers():
            lo, hi = max(offset, start + 2), min(offset + 4, start + handler.length)
            if lo < hi:
                part = handler.read(lo - start, hi - lo) & _ones(hi - lo)
                shift = 8 * (lo - offset)
                value = (value & ~(_ones(hi - lo) << shift)) | (part << shift)
        return caps.apply_patches(self._patches, offset, value)

    def _handlers(self) -> list[tuple[int, MsiCapability | MsixCapability]]:
        out: list[tuple[int, MsiCapability | MsixCapability]] = []
        if self.msi is not None:
            out.append((self._msi_off, self.msi))
        if self.msix is not None:
            out.append((self._msix_off, self.msix))
        return out

    def config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset % 4 + size > 4 or offset + size > 4096:
            return _ones(max(size, 0))
        try:
            dword = self._read_dword(offset & ~3)
        except Exception:  # a guest read must never take the VMM down
            log.exception("%s: config read %#x+%d failed", self.name, offset, size)
            return _ones(size)
        return (dword >> (8 * (offset % 4))) & _ones(size)

    def config_write(self, offset: int, size: int, value: int) -> list[BarMove]:
        if size not in (1, 2, 4) or offset < 0 or offset % 4 + size > 4 or offset + size > 4096:
            return []
        value &= _ones(size)
        with self._lock:
            return self._config_write(offset, size, value)

    def _config_write(self, offset: int, size: int, value: int) -> list[BarMove]:
        try:
            if offset & ~3 in _BAR_DWORDS:
                return self.shadow.write(offset, size, value)  # never reaches the device
            # Interrupt emulation first (it may arm VFIO vectors), then the device: the kernel must see the
            # guest's enable bit only after SET_IRQS (docs/vfio.md#config-writes).
            for start, handler in self._handlers():
                lo, hi = max(offset, start + 2), min(offset + size, start + handler.length)
                if lo < hi:
                    handler.write(lo - start, hi - lo, (value >> (8 * (lo - offset))) & _ones(hi - lo))
            if offset + size <= self.device.config_size:
                self.device.write_config(offset, size, value)
            moves = self.shadow.write(offset, size, value)
            if offset <= Reg.COMMAND < offset + size:
                self._memory_space = bool((value >> (8 * (Reg.COMMAND - offset))) & Command.MEMORY_SPACE)
            pmcsr = self._pm_off + 4 if self._pm_off is not None else -1
            if offset <= pmcsr < offset + size or offset <= pmcsr + 1 < offset + size:
                self._d3hot = self._power_state_d3hot()  # what vfio-pci made of the guest's write
            # A BAR whose move this write releases is still at its old place until the bus moves it.
            decoding = self._memory_space and not self._d3hot
            self._sync_memory_enable(decoding, {m.bar_index: m.old for m in moves})
            return moves
        except Exception:
            log.exception("%s: config write %#x+%d = %#x failed", self.name, offset, size, value)
            return []

    # ---- trapped BAR accesses -------------------------------------------------------------------------

    def _msix_target(self, index: int, offset: int, size: int) -> str | None:
        """"table" or "pba" for an access inside one of them, "straddle" for one that only partly overlaps
        them (never forwarded: its other bytes would reach the device's own table or PBA), else None."""
        end = offset + size
        for name, bir, start, stop in self._msix_areas:
            if index != bir or not (offset < stop and start < end):
                continue
            return name if start <= offset and end <= stop else "straddle"
        return None

    def _bar_size(self, index: int) -> int:
        size = self._bar_sizes.get(index)
        if size is None:
            try:
                size = self.shadow.bar_info(index).size
            except ValueError:
                size = 0
            self._bar_sizes[index] = size
        return size

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self._bar_size(index):
            return _ones(max(size, 0))
        with self._lock:
            return self._bar_read(index, offset, size)

    def _bar_read(self, index: int, offset: int, size: int) -> int:
        try:
            target = self._msix_target(index, offset, size)
            if target == "straddle":
                return _ones(size)
            if target == "table" and self.msix is not None:
                return self.msix.table_read(offset - self.msix.table_offset, size)
            if target == "pba" and self.msix is not None:
                # The device's own PBA (VFIO's eventfds hold what fired while masked).
                phys = self._phys_pba_offset() + offset - self.msix.pba_offset
                value = self.device.read_int(index, phys, size)
                return 0 if value is None else value
            value = self.device.read_int(index, offset, size)
            return _ones(size) if value is None else value
        except Exception:
            log.exception("%s: BAR%d read %#x+%d failed", self.name, index, offset, size)
            return _ones(size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self._bar_size(index):
            return
        value &= _ones(size)
        with self._lock:
            self._bar_write(index, offset, size, value)

    def _bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        try:
            target = self._msix_target(index, offset, size)
            if target == "table" and self.msix is not None:
                self.msix.table_write(offset - self.msix.table_offset, size, value)
                return
            if target in ("pba", "straddle") or index == ROM_BAR_INDEX:
                return  # read-only
            if not self.device.write_int(index, offset, size, value):
                log.debug("%s: BAR%d write %#x+%d dropped", self.name, index, offset, size)
        except Exception:
            log.exception("%s: BAR%d write %#x+%d failed", self.name, index, offset, size)

    # ---- teardown -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Undo everything in reverse: guest mappings, interrupts, host mappings, the device fd."""
        lock = getattr(self, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            self._close()

    def _close(self) -> None:
        for m in getattr(self, "_mappings", []):
            with contextlib.suppress(Exception):
                self._uninstall(m)
        for index in list(self._active):
            with contextlib.suppress(VfioError):
                self.device.disable_irqs(index)
        self._active.clear()
        self._disarm_intx()
        if self._intx_gsi is not None:
            with contextlib.suppress(OSError):
                self._irqfds.irqfd(self._intx_trigger, self._intx_gsi, deassign=True)
            self._intx_gsi = None
        for fd in (self._intx_trigger, self._intx_resample):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._intx_trigger = self._intx_resample = -1
        for sink in (self._msi_sink, self._msix_sink):
            if sink is not None:
                with contextlib.suppress(Exception):
                    sink.vectors.close()
        for m in getattr(self, "_mappings", []):
            m.host.close()
        self._mappings = []
        self.device.close()


class _NullSink:
    """Receives nothing: used to decode a device's MSI control word before the real sink exists."""

    def vector_changed(self, vector: int, message: MsiMessage | None) -> None:
        pass

    def enable_changed(self, enabled: bool, count: int) -> None:
        pass

    def signal(self, vector: int, message: MsiMessage) -> None:
        pass


# ---- the same BARs read from sysfs, for planning before any VFIO fd is open (--dry-run) -------------------

IORESOURCE_IO = 0x100
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x100000
_SYSFS_ROM_LINE = 6


@dataclass(frozen=True)
class SysfsFunction:
    """What the guest will see of a host function's BARs, read from sysfs (`resource`, `config`)."""

    name: str  # 0000:00:04.0
    vendor_device: str  # 1b36:0007
    driver: str | None
    bars: tuple[BarInfo, ...]
    clique_problem: str | None = None  # why x_nv_gpudirect_clique cannot be added (None: it can)
    relocation_problem: str | None = None  # why x_msix_relocation=on cannot apply (None: it can or not asked)
    full_config: bool = True  # False when only the first 64 bytes of config were readable (not root)


def parse_resource(text: str) -> list[HostBar]:
    """Host BARs from sysfs `resource` (lines `start end flags`, BAR0-5 then the ROM)."""
    out: list[HostBar] = []
    for index, line in enumerate(text.splitlines()[: _SYSFS_ROM_LINE + 1]):
        try:
            start, end, flags = (int(field, 16) for field in line.split()[:3])
        except ValueError:
            continue
        if not flags or end < start:
            continue
        size = end - start + 1
        if index == _SYSFS_ROM_LINE:
            out.append(HostBar(index, BarKind.ROM, size))
        elif flags & IORESOURCE_IO:
            out.append(HostBar(index, BarKind.IO, size))
        else:
            kind = BarKind.MEM64 if flags & IORESOURCE_MEM_64 else BarKind.MEM32
            out.append(HostBar(index, kind, size, bool(flags & IORESOURCE_PREFETCH)))
    return out


def sysfs_function(path: str | os.PathLike[str], clique: int | None = None,
                   page_size: int = PAGE_SIZE, msix_relocation: bool = False) -> SysfsFunction:
    """The guest BARs of the host function at sysfs `path`, computed as VfioPciDevice would (OSError if the
    directory cannot be read)."""
    directory = pci_sysfs.function_dir(path)
    name = directory.name
    host = parse_resource(pci_sysfs.read_resource(directory))
    config = pci_sysfs.read_config(directory)
    read = caps.bytes_reader(config)
    scan = caps.scan(read, len(config))
    sizes = {bar.index: bar.size for bar in host}
    msix_bar = None
    offset = scan.find(caps.CapId.MSIX)
    relocation_problem = None
    if msix_relocation and len(config) > 0x40:
        relocation_problem = msix_relocation_problem(read, offset, sizes.get)
    if offset is not None:
        geometry = msix_geometry(read, offset, sizes.get, 0, page_size, msix_relocation)
        if geometry is not None:
            msix_bar = (geometry[1], geometry[4].bar_size)
    problem = None
    if clique is not None and scan.last is not None:
        problem = caps.clique_conflict(read, scan)
    driver = pci_sysfs.read_driver(directory)
    ids = f"{read(Reg.VENDOR_ID, 2):04x}:{read(Reg.DEVICE_ID, 2):04x}"
    return SysfsFunction(name, ids, driver, tuple(guest_bar_layout(host, msix_bar, page_size, name)), problem,
                         relocation_problem, len(config) > 0x40)
