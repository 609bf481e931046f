"""ctypes mirror of <linux/vfio.h>: ioctl numbers, structures and flags (container/group mode, PCI).

Names are exactly the kernel's so the header and Documentation/driver-api/vfio.rst read alongside.
Layouts are verified against the system header by tests/unit/test_vfio_bindings.py (a gcc-compiled probe).
"""

from __future__ import annotations

import ctypes
import functools
from enum import IntEnum, IntFlag

from pyvmm.cabi import with_flex_array
from pyvmm.ioctl import IO

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32

VFIO_API_VERSION = 0
VFIO_TYPE = ord(";")
VFIO_BASE = 100


class VfioIoctl(IntEnum):
    # Every VFIO ioctl is _IO (no size, no direction): the argsz field carries the size instead.
    VFIO_GET_API_VERSION = IO(VFIO_TYPE, VFIO_BASE + 0)
    VFIO_CHECK_EXTENSION = IO(VFIO_TYPE, VFIO_BASE + 1)
    VFIO_SET_IOMMU = IO(VFIO_TYPE, VFIO_BASE + 2)
    VFIO_GROUP_GET_STATUS = IO(VFIO_TYPE, VFIO_BASE + 3)
    VFIO_GROUP_SET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 4)
    VFIO_GROUP_UNSET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 5)
    VFIO_GROUP_GET_DEVICE_FD = IO(VFIO_TYPE, VFIO_BASE + 6)
    VFIO_DEVICE_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 7)
    VFIO_DEVICE_GET_REGION_INFO = IO(VFIO_TYPE, VFIO_BASE + 8)
    VFIO_DEVICE_GET_IRQ_INFO = IO(VFIO_TYPE, VFIO_BASE + 9)
    VFIO_DEVICE_SET_IRQS = IO(VFIO_TYPE, VFIO_BASE + 10)
    VFIO_DEVICE_RESET = IO(VFIO_TYPE, VFIO_BASE + 11)
    VFIO_IOMMU_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 12)
    VFIO_IOMMU_MAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 13)
    VFIO_IOMMU_UNMAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 14)


class VfioPciIoctl(IntEnum):
    """vfio-pci device ioctls whose numbers repeat container ones (they go to a device fd): a separate enum
    so that they are not aliases of VFIO_IOMMU_GET_INFO / VFIO_IOMMU_MAP_DMA."""

    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = IO(VFIO_TYPE, VFIO_BASE + 12)
    VFIO_DEVICE_PCI_HOT_RESET = IO(VFIO_TYPE, VFIO_BASE + 13)


class VfioExtension(IntEnum):
    """Arguments of VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU."""

    VFIO_TYPE1_IOMMU = 1
    VFIO_SPAPR_TCE_IOMMU = 2
    VFIO_TYPE1v2_IOMMU = 3
    VFIO_DMA_CC_IOMMU = 4
    VFIO_EEH = 5
    VFIO_TYPE1_NESTING_IOMMU = 6
    VFIO_SPAPR_TCE_v2_IOMMU = 7
    VFIO_NOIOMMU_IOMMU = 8
    VFIO_UNMAP_ALL = 9
    VFIO_UPDATE_VADDR = 10


class VfioGroupFlag(IntFlag):
    VFIO_GROUP_FLAGS_VIABLE = 1 << 0
    VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1


class VfioDeviceFlag(IntFlag):
    VFIO_DEVICE_FLAGS_RESET = 1 << 0
    VFIO_DEVICE_FLAGS_PCI = 1 << 1
    VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
    VFIO_DEVICE_FLAGS_AMBA = 1 << 3
    VFIO_DEVICE_FLAGS_CCW = 1 << 4
    VFIO_DEVICE_FLAGS_AP = 1 << 5
    VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
    VFIO_DEVICE_FLAGS_CAPS = 1 << 7


class VfioRegionInfoFlag(IntFlag):
    VFIO_REGION_INFO_FLAG_READ = 1 << 0
    VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
    VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
    VFIO_REGION_INFO_FLAG_CAPS = 1 << 3


class VfioRegionInfoCap(IntEnum):
    VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
    VFIO_REGION_INFO_CAP_TYPE = 2
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
    VFIO_REGION_INFO_CAP_NVLINK2_SSATGT = 4
    VFIO_REGION_INFO_CAP_NVLINK2_LNKSPD = 5


class VfioIrqInfoFlag(IntFlag):
    VFIO_IRQ_INFO_EVENTFD = 1 << 0
    VFIO_IRQ_INFO_MASKABLE = 1 << 1
    VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
    VFIO_IRQ_INFO_NORESIZE = 1 << 3


class VfioIrqSetFlag(IntFlag):
    VFIO_IRQ_SET_DATA_NONE = 1 << 0
    VFIO_IRQ_SET_DATA_BOOL = 1 << 1
    VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
    VFIO_IRQ_SET_ACTION_MASK = 1 << 3
    VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
    VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5


class VfioIommuInfoFlag(IntFlag):
    VFIO_IOMMU_INFO_PGSIZES = 1 << 0
    VFIO_IOMMU_INFO_CAPS = 1 << 1


class VfioIommuInfoCap(IntEnum):
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3


class VfioDmaMapFlag(IntFlag):
    VFIO_DMA_MAP_FLAG_READ = 1 << 0
    VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
    VFIO_DMA_MAP_FLAG_VADDR = 1 << 2


class VfioDmaUnmapFlag(IntFlag):
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
    VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
    VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2


class VfioPciRegion(IntEnum):
    VFIO_PCI_BAR0_REGION_INDEX = 0
    VFIO_PCI_BAR1_REGION_INDEX = 1
    VFIO_PCI_BAR2_REGION_INDEX = 2
    VFIO_PCI_BAR3_REGION_INDEX = 3
    VFIO_PCI_BAR4_REGION_INDEX = 4
    VFIO_PCI_BAR5_REGION_INDEX = 5
    VFIO_PCI_ROM_REGION_INDEX = 6
    VFIO_PCI_CONFIG_REGION_INDEX = 7
    VFIO_PCI_VGA_REGION_INDEX = 8


VFIO_PCI_NUM_REGIONS = 9


class VfioPciIrq(IntEnum):
    VFIO_PCI_INTX_IRQ_INDEX = 0
    VFIO_PCI_MSI_IRQ_INDEX = 1
    VFIO_PCI_MSIX_IRQ_INDEX = 2
    VFIO_PCI_ERR_IRQ_INDEX = 3
    VFIO_PCI_REQ_IRQ_INDEX = 4


VFIO_PCI_NUM_IRQS = 5


# --- structures ---------------------------------------------------------------------------------------------


class vfio_info_cap_header(ctypes.Structure):
    _fields_ = [("id", u16), ("version", u16), ("next", u32)]


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32)]


class vfio_device_info(ctypes.Structure):
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("num_regions", u32),
        ("num_irqs", u32),
        ("cap_offset", u32),
    ]


class vfio_region_info(ctypes.Structure):
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("index", u32),
        ("cap_offset", u32),
        ("size", u64),
        ("offset", u64),
    ]


class vfio_region_sparse_mmap_area(ctypes.Structure):
    _fields_ = [("offset", u64), ("size", u64)]


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("nr_areas", u32), ("reserved", u32)]


class vfio_region_info_cap_type(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("type", u32), ("subtype", u32)]


class vfio_irq_info(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("count", u32)]


class vfio_irq_set(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("start", u32), ("count", u32)]


class vfio_iommu_type1_info(ctypes.Structure):
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("iova_pgsizes", u64),
        ("cap_offset", u32),
    ]


class vfio_iova_range(ctypes.Structure):
    _fields_ = [("start", u64), ("end", u64)]


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("nr_iovas", u32), ("reserved", u32)]


class vfio_iommu_type1_info_dma_avail(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("avail", u32)]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("vaddr", u64), ("iova", u64), ("size", u64)]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova", u64), ("size", u64)]


class vfio_pci_dependent_device(ctypes.Structure):
    _fields_ = [("group_id", u32), ("segment", u16), ("bus", u8), ("devfn", u8)]


class vfio_pci_hot_reset_info(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("count", u32)]


class vfio_pci_hot_reset(ctypes.Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("count", u32)]


# Every structure above, for the layout probe.
STRUCTS: tuple[type[ctypes.Structure], ...] = (
    vfio_info_cap_header,
    vfio_group_status,
    vfio_device_info,
    vfio_region_info,
    vfio_region_sparse_mmap_area,
    vfio_region_info_cap_sparse_mmap,
    vfio_region_info_cap_type,
    vfio_irq_info,
    vfio_irq_set,
    vfio_iommu_type1_info,
    vfio_iova_range,
    vfio_iommu_type1_info_cap_iova_range,
    vfio_iommu_type1_info_dma_avail,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
    vfio_pci_dependent_device,
    vfio_pci_hot_reset_info,
    vfio_pci_hot_reset,
)


# --- flexible-array helpers ---------------------------------------------------------------------------------


@functools.cache
def vfio_irq_set_eventfds(n: int) -> type[ctypes.Structure]:
    """`struct vfio_irq_set` followed by `n` s32 eventfds (DATA_EVENTFD)."""
    return with_flex_array(vfio_irq_set, "data", s32, n)


@functools.cache
def vfio_irq_set_bools(n: int) -> type[ctypes.Structure]:
    """`struct vfio_irq_set` followed by `n` u8 booleans (DATA_BOOL)."""
    return with_flex_array(vfio_irq_set, "data", u8, n)


@functools.cache
def vfio_region_info_cap_sparse_mmap_areas(n: int) -> type[ctypes.Structure]:
    """The sparse-mmap capability with its `n` areas."""
    return with_flex_array(vfio_region_info_cap_sparse_mmap, "areas", vfio_region_sparse_mmap_area, n)


@functools.cache
def vfio_pci_hot_reset_info_devices(n: int) -> type[ctypes.Structure]:
    """`struct vfio_pci_hot_reset_info` with room for `n` dependent devices."""
    return with_flex_array(vfio_pci_hot_reset_info, "devices", vfio_pci_dependent_device, n)


@functools.cache
def vfio_pci_hot_reset_group_fds(n: int) -> type[ctypes.Structure]:
    """`struct vfio_pci_hot_reset` followed by `n` s32 group fds."""
    return with_flex_array(vfio_pci_hot_reset, "group_fds", s32, n)


def irq_set(
    index: int,
    flags: int,
    start: int = 0,
    data: list[int] | None = None,
    count: int | None = None,
    bools: bool = False,
) -> ctypes.Structure:
    """A ready-to-issue `vfio_irq_set` with its data array (eventfds, or u8 booleans with `bools`)."""
    values = data or []
    cls = (vfio_irq_set_bools if bools else vfio_irq_set_eventfds)(len(values))
    request = cls()
    request.argsz = ctypes.sizeof(cls)
    request.flags = int(flags)
    request.index = index
    request.start = start
    request.count = len(values) if count is None else count
    for i, value in enumerate(values):
        request.data[i] = value
    return request
