"""pyvmm.devices.virtio: virtio 1.x devices over the modern PCI transport.

spec (constants), queue (split virtqueues), device (the VirtioDevice interface), worker (per-device queue
thread), pci (the virtio-pci transport), image (raw disk images), block (virtio-blk).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmm.lazy import lazy_exports

if TYPE_CHECKING:
    from pyvmm.devices.virtio.block import BlockParams, VirtioBlock
    from pyvmm.devices.virtio.device import VirtioDevice
    from pyvmm.devices.virtio.image import DiskImageError, RawImage
    from pyvmm.devices.virtio.pci import VirtioPciDevice, vector_count

__all__ = [
    "BlockParams",
    "DiskImageError",
    "RawImage",
    "VirtioBlock",
    "VirtioDevice",
    "VirtioPciDevice",
    "vector_count",
]

# Imported on first use (pyvmm/lazy.py): a VM without disks never needs the disk stack.
__getattr__ = lazy_exports(__name__, {
    "BlockParams": "block",
    "DiskImageError": "image",
    "RawImage": "image",
    "VirtioBlock": "block",
    "VirtioDevice": "device",
    "VirtioPciDevice": "pci",
    "vector_count": "pci",
})
