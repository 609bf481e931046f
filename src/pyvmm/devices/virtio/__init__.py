"""pyvmm.devices.virtio: virtio 1.x devices over the modern PCI transport.

spec (constants), queue (split virtqueues), device (the VirtioDevice interface), worker (per-device queue
thread), pci (the virtio-pci transport), image (raw disk images), block (virtio-blk).
"""

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
