"""Guest RAM in the IOMMU: every RAM region DMA-mapped with IOVA = guest-physical address
(docs/vfio.md#dma-mapping-of-guest-ram)."""

from __future__ import annotations

from pyvmm.memory import GuestMemory
from pyvmm.vfio.container import VfioContainer


def map_guest_memory(container: VfioContainer, memory: GuestMemory) -> None:
    """Map all of `memory` for device DMA (read and write); must happen before the guest runs."""
    for region in memory.regions:
        container.map_dma(region.gpa, region.size, region.host_address)


def unmap_guest_memory(container: VfioContainer, memory: GuestMemory) -> None:
    for region in memory.regions:
        if region.gpa in container.mappings:
            container.unmap_dma(region.gpa, region.size)
