"""pyvmm.vfio: host PCI functions given to the guest through VFIO (container/group mode, type1v2 IOMMU).

bindings (linux/vfio.h in ctypes), container (VfioContainer, VfioGroup), device (VfioDevice: infos, region
I/O, mmap, SET_IRQS, reset), hostmap (aligned device mmaps), capabilities and areas (pure logic: capability
walks and patches, mmappable BAR areas, MSI-X relocation), pci (VfioPciDevice, the guest-facing model),
dma (guest RAM in the IOMMU), passthrough (one VM's VFIO side and
`attach_vfio_devices`, the builder's entry point).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmm.lazy import lazy_exports

if TYPE_CHECKING:
    from pyvmm.vfio.errors import VfioError
    from pyvmm.vfio.passthrough import VfioPassthrough, attach_vfio_devices
    from pyvmm.vfio.pci import VfioPciDevice

__all__ = [
    "VfioError",
    "VfioPassthrough",
    "VfioPciDevice",
    "attach_vfio_devices",
]

# Imported on first use (pyvmm/lazy.py): a VM without passthrough never needs most of them.
__getattr__ = lazy_exports(__name__, {
    "VfioError": "errors",
    "VfioPassthrough": "passthrough",
    "VfioPciDevice": "pci",
    "attach_vfio_devices": "passthrough",
})
