"""A VFIO device fd: device/region/IRQ information, region I/O with pread/pwrite, mmap, SET_IRQS, reset."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
from dataclasses import dataclass

from pyvmm.ioctl import IoctlError, ioctl
from pyvmm.vfio.bindings import (
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS,
    VfioDeviceFlag,
    VfioIoctl,
    VfioIrqInfoFlag,
    VfioIrqSetFlag,
    VfioPciIrq,
    VfioPciRegion,
    VfioRegionInfoCap,
    VfioRegionInfoFlag,
    irq_set,
    vfio_device_info,
    vfio_info_cap_header,
    vfio_irq_info,
    vfio_region_info,
    vfio_region_info_cap_sparse_mmap,
    vfio_region_info_cap_type,
    vfio_region_sparse_mmap_area,
)
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.hostmap import HostMapping, map_aligned

log = logging.getLogger(__name__)

_F = VfioIrqSetFlag
_MAX_CAPS = 64  # a capability chain longer than this is taken to be a loop
_CONFIG_REGION = int(VfioPciRegion.VFIO_PCI_CONFIG_REGION_INDEX)  # a plain int: read on every config exit


@dataclass(frozen=True)
class SparseArea:
    """An mmappable part of a region: `size` bytes at `offset` from the region start."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: VfioRegionInfoFlag
    size: int
    offset: int  # of the region within the device fd
    sparse_areas: tuple[SparseArea, ...] | None = None  # None: no sparse-mmap capability
    msix_mappable: bool = False
    region_type: tuple[int, int] | None = None  # (type, subtype) from the type capability

    @property
    def readable(self) -> bool:
        return bool(self.flags & VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: VfioIrqInfoFlag
    count: int


def parse_region_caps(
    buf: bytes, first: int
) -> tuple[tuple[SparseArea, ...] | None, bool, tuple[int, int] | None]:
    """Walk a region-info capability chain in `buf` starting at offset `first` (0: none)."""
    sparse: tuple[SparseArea, ...] | None = None
    msix_mappable = False
    region_type = None
    offset = first
    seen: set[int] = set()
    header_size = ctypes.sizeof(vfio_info_cap_header)
    while offset and offset not in seen and len(seen) < _MAX_CAPS:
        seen.add(offset)
        if offset + header_size > len(buf):
            break
        header = vfio_info_cap_header.from_buffer_copy(buf, offset)
        if header.id == VfioRegionInfoCap.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            cap_size = ctypes.sizeof(vfio_region_info_cap_sparse_mmap)
            if offset + cap_size <= len(buf):
                cap = vfio_region_info_cap_sparse_mmap.from_buffer_copy(buf, offset)
                area_size = ctypes.sizeof(vfio_region_sparse_mmap_area)
                areas = []
                for i in range(cap.nr_areas):
                    at = offset + cap_size + i * area_size
                    if at + area_size > len(buf):
                        break
                    area = vfio_region_sparse_mmap_area.from_buffer_copy(buf, at)
                    areas.append(SparseArea(area.offset, area.size))
                sparse = tuple(areas)
        elif header.id == VfioRegionInfoCap.VFIO_REGION_INFO_CAP_TYPE:
            if offset + ctypes.sizeof(vfio_region_info_cap_type) <= len(buf):
                cap_t = vfio_region_info_cap_type.from_buffer_copy(buf, offset)
                region_type = (cap_t.type, cap_t.subtype)
        elif header.id == VfioRegionInfoCap.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
            msix_mappable = True
        offset = header.next
    return sparse, msix_mappable, region_type


class VfioDevice:
    """One VFIO device fd (owned: closed by close())."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        try:
            info = vfio_device_info(argsz=ctypes.sizeof(vfio_device_info))
            ioctl(fd, VfioIoctl.VFIO_DEVICE_GET_INFO, info)
            self.flags = VfioDeviceFlag(info.flags)
            self.num_regions = info.num_regions
            self.num_irqs = info.num_irqs
            if not self.flags & VfioDeviceFlag.VFIO_DEVICE_FLAGS_PCI:
                raise VfioError(f"{name}: not a vfio-pci device (flags {int(self.flags):#x})")
            if (
                self.num_regions < VFIO_PCI_NUM_REGIONS - 1
                or self.num_irqs < VfioPciIrq.VFIO_PCI_MSIX_IRQ_INDEX + 1
            ):
                raise VfioError(
                    f"{name}: vfio-pci reports {self.num_regions} regions and {self.num_irqs} IRQ "
                    "indices, fewer than a PCI function has"
                )
            self.regions: dict[int, RegionInfo] = {}
            for index in range(min(self.num_regions, VFIO_PCI_NUM_REGIONS)):
                region = self._region_info(index)
                if region is not None:
                    self.regions[index] = region
            self.irqs: dict[int, IrqInfo] = {}
            for index in range(min(self.num_irqs, VFIO_PCI_NUM_IRQS)):
                irq = vfio_irq_info(argsz=ctypes.sizeof(vfio_irq_info), index=index)
                try:
                    ioctl(fd, VfioIoctl.VFIO_DEVICE_GET_IRQ_INFO, irq)
                except IoctlError:
                    continue
                self.irqs[index] = IrqInfo(index, VfioIrqInfoFlag(irq.flags), irq.count)
        except BaseException:
            self.close()
            raise

    # ---- information ----------------------------------------------------------------------------------

    def _region_info(self, index: int) -> RegionInfo | None:
        base = ctypes.sizeof(vfio_region_info)
        info = vfio_region_info(argsz=base, index=index)
        try:
            ioctl(self.fd, VfioIoctl.VFIO_DEVICE_GET_REGION_INFO, info)
        except IoctlError as e:
            if e.errno != errno.EINVAL:  # EINVAL: no such region (e.g. VGA on a non-VGA device)
                log.warning("%s: region %d info failed: %s", self.name, index, e.strerror)
            return None
        sparse, msix_mappable, region_type = None, False, None
        if info.flags & VfioRegionInfoFlag.VFIO_REGION_INFO_FLAG_CAPS and info.argsz > base:
            # The first call told us how big the info with its capability chain is.
            buf = (ctypes.c_uint8 * info.argsz)()
            full = vfio_region_info.from_buffer(buf)
            full.argsz = info.argsz
            full.index = index
            ioctl(self.fd, VfioIoctl.VFIO_DEVICE_GET_REGION_INFO, buf)
            info = vfio_region_info.from_buffer_copy(buf)
            sparse, msix_mappable, region_type = parse_region_caps(bytes(buf), info.cap_offset)
        return RegionInfo(
            index, VfioRegionInfoFlag(info.flags), info.size, info.offset, sparse, msix_mappable, region_type
        )

    def region(self, index: int) -> RegionInfo | None:
        return self.regions.get(index)

    def irq_count(self, index: int) -> int:
        irq = self.irqs.get(index)
        return irq.count if irq is not None else 0

    @property
    def can_reset(self) -> bool:
        """vfio-pci offers VFIO_DEVICE_RESET (pyvmm.vfio.reset decides what to do without it)."""
        return bool(self.flags & VfioDeviceFlag.VFIO_DEVICE_FLAGS_RESET)

    # ---- region I/O -----------------------------------------------------------------------------------

    def read(self, index: int, offset: int, size: int) -> bytes | None:
        """`size` bytes of region `index` at `offset`, or None when outside the region or refused."""
        region = self.regions.get(index)
        if region is None or offset < 0 or size <= 0 or offset + size > region.size:
            return None
        try:
            data = os.pread(self.fd, size, region.offset + offset)
        except OSError as e:
            log.debug("%s: read of region %d %#x+%d failed: %s", self.name, index, offset, size, e.strerror)
            return None
        return data if len(data) == size else None

    def write(self, index: int, offset: int, data: bytes) -> bool:
        region = self.regions.get(index)
        if region is None or offset < 0 or not data or offset + len(data) > region.size:
            return False
        try:
            return os.pwrite(self.fd, data, region.offset + offset) == len(data)
        except OSError as e:
            log.debug(
                "%s: write to region %d %#x+%d failed: %s", self.name, index, offset, len(data), e.strerror
            )
            return False

    def read_int(self, index: int, offset: int, size: int) -> int | None:
        data = self.read(index, offset, size)
        return None if data is None else int.from_bytes(data, "little")

    def write_int(self, index: int, offset: int, size: int, value: int) -> bool:
        return self.write(index, offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_config(self, offset: int, size: int) -> int:
        """Config-space read through the VFIO config region; all-ones when it cannot be read."""
        value = self.read_int(VfioPciRegion.VFIO_PCI_CONFIG_REGION_INDEX, offset, size)
        return (1 << (8 * size)) - 1 if value is None else value

    def config_dword(self, offset: int) -> int:
        """`read_config(offset, 4)` in one pread: the dword reads a guest's config-space exits make."""
        region = self.regions.get(_CONFIG_REGION)
        if region is None or offset < 0 or offset + 4 > region.size:
            return 0xFFFF_FFFF
        try:
            data = os.pread(self.fd, 4, region.offset + offset)
        except OSError:
            return 0xFFFF_FFFF
        return int.from_bytes(data, "little") if len(data) == 4 else 0xFFFF_FFFF

    def write_config(self, offset: int, size: int, value: int) -> bool:
        return self.write_int(VfioPciRegion.VFIO_PCI_CONFIG_REGION_INDEX, offset, size, value)

    @property
    def config_size(self) -> int:
        region = self.regions.get(VfioPciRegion.VFIO_PCI_CONFIG_REGION_INDEX)
        return region.size if region is not None else 0

    def mmap(self, index: int, offset: int, size: int) -> HostMapping:
        """Map `size` bytes of region `index` from `offset` (page aligned), with the region's protection."""
        region = self.regions.get(index)
        if region is None or not region.mmappable:
            raise VfioError(f"{self.name}: region {index} cannot be mmapped")
        if offset < 0 or offset + size > max(region.size, mmap.PAGESIZE):
            raise VfioError(f"{self.name}: mmap {offset:#x}+{size:#x} is outside region {index}")
        prot = (mmap.PROT_READ if region.readable else 0) | (mmap.PROT_WRITE if region.writable else 0)
        try:
            return map_aligned(self.fd, region.offset + offset, size, prot)
        except OSError as e:
            raise VfioError(
                f"{self.name}: mmap of region {index} {offset:#x}+{size:#x} failed: {e.strerror}"
            ) from e

    # ---- interrupts -----------------------------------------------------------------------------------

    def _set_irqs(
        self,
        index: int,
        flags: VfioIrqSetFlag,
        start: int = 0,
        data: list[int] | None = None,
        count: int | None = None,
    ) -> None:
        request = irq_set(index, flags, start, data, count)
        try:
            ioctl(self.fd, VfioIoctl.VFIO_DEVICE_SET_IRQS, request)
        except IoctlError as e:
            name = VfioPciIrq(index).name if index in VfioPciIrq._value2member_map_ else str(index)
            raise VfioError(
                f"{self.name}: VFIO_DEVICE_SET_IRQS({name}, {flags!r}) failed: {e.strerror}"
            ) from e

    def enable_eventfds(self, index: int, eventfds: list[int], start: int = 0) -> None:
        """Signal eventfds[i] when vector start+i fires (INTx: index 0, one eventfd)."""
        self._set_irqs(index, _F.VFIO_IRQ_SET_DATA_EVENTFD | _F.VFIO_IRQ_SET_ACTION_TRIGGER, start, eventfds)

    def disable_irqs(self, index: int) -> None:
        """Tear down every vector of `index` (DATA_NONE | ACTION_TRIGGER with count 0)."""
        self._set_irqs(index, _F.VFIO_IRQ_SET_DATA_NONE | _F.VFIO_IRQ_SET_ACTION_TRIGGER, count=0)

    def intx_mask(self) -> None:
        self._set_irqs(
            VfioPciIrq.VFIO_PCI_INTX_IRQ_INDEX,
            _F.VFIO_IRQ_SET_DATA_NONE | _F.VFIO_IRQ_SET_ACTION_MASK,
            count=1,
        )

    def intx_unmask(self) -> None:
        self._set_irqs(
            VfioPciIrq.VFIO_PCI_INTX_IRQ_INDEX,
            _F.VFIO_IRQ_SET_DATA_NONE | _F.VFIO_IRQ_SET_ACTION_UNMASK,
            count=1,
        )

    def intx_unmask_on(self, eventfd: int) -> None:
        """Unmask INTx whenever `eventfd` is signalled (KVM's resample fd: the guest's EOI)."""
        self._set_irqs(
            VfioPciIrq.VFIO_PCI_INTX_IRQ_INDEX,
            _F.VFIO_IRQ_SET_DATA_EVENTFD | _F.VFIO_IRQ_SET_ACTION_UNMASK,
            data=[eventfd],
        )

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
