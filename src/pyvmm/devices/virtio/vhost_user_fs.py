"""virtio-fs served by a vhost-user backend (`--fs tag=,socket=`): virtiofsd reads the guest's FUSE requests
from the rings and guest RAM itself and answers them from the directory it shares; pyvmm negotiates, shows
the guest the device's configuration (the tag, the number of request queues), hands the rings over at
DRIVER_OK and takes them back at reset. Python never sees a request (docs/virtio-fs.md).

The queues are the virtio spec's: queue 0 is the high-priority queue (FUSE_INTERRUPT, FUSE_FORGET), queues
1..num_request_queues the request queues. No DAX window: the device has no shared memory region.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.devices.virtio.spec import VirtioDeviceType
from pyvmm.devices.virtio.vhost_user import BackendOffer, VhostUserBackend, VhostUserDevice, negotiate_backend

VIRTIO_FS_TAG_LEN = 36
# struct virtio_fs_config (<linux/virtio_fs.h>): __u8 tag[36] (NUL-padded, not NUL-terminated when 36
# bytes long), __le32 num_request_queues.
VIRTIO_FS_CONFIG = struct.Struct("<36sI")
HIPRIO_QUEUES = 1  # the high-priority queue before the request queues
# A backend that does not negotiate MQ (so cannot say how many queues it serves) serves the hiprio queue
# and one request queue, as cloud-hypervisor assumes.
QUEUES_WITHOUT_MQ = 2


def fs_config(tag: str, num_request_queues: int) -> bytes:
    """The device configuration space the driver reads."""
    raw = tag.encode()
    if not 0 < len(raw) <= VIRTIO_FS_TAG_LEN:
        raise ValueError(f"virtio-fs tag of {len(raw)} bytes")
    return VIRTIO_FS_CONFIG.pack(raw, num_request_queues)  # struct pads the tag with NULs


@dataclass(frozen=True)
class VhostUserFsParams:
    tag: str
    num_request_queues: int = 1
    queue_size: int = 1024


class VhostUserFs(VhostUserDevice):
    """A virtio-fs whose every queue a vhost-user backend (virtiofsd) serves."""

    device_type = VirtioDeviceType.FS
    name = "fs"
    # pci_class: the default (0xFF, other), which cloud-hypervisor gives every virtio device but block and net

    def __init__(self, backend: VhostUserBackend, params: VhostUserFsParams, label: str = "") -> None:
        queues = HIPRIO_QUEUES + params.num_request_queues
        plural = "s" if params.num_request_queues > 1 else ""
        self.offer: BackendOffer = negotiate_backend(
            backend, queues, queues_without_mq=QUEUES_WITHOUT_MQ,
            wanted=f"num_queues={params.num_request_queues} needs {queues} queues (the hiprio queue and "
                   f"{params.num_request_queues} request queue{plural})",
            queue_hint=" (QEMU 7.2's virtiofsd serves one request queue)")
        super().__init__(backend, [params.queue_size] * queues, self.offer.features,
                         label or f"--fs socket={backend.path}")
        self._config = fs_config(params.tag, params.num_request_queues)

    @property
    def features(self) -> int:
        # No device feature: VIRTIO_FS_F_NOTIFICATION (bit 0) would need a notification queue that Linux
        # does not use and virtiofsd does not offer.
        return 0

    def config_bytes(self) -> bytes:
        return self._config
