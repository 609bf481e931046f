"""virtio-blk served by a vhost-user backend (`--disk vhost_user=on,socket=PATH`): qemu-storage-daemon, or
any vhost-user-blk server, reads the guest's rings and RAM itself; pyvmm negotiates, hands the rings over at
DRIVER_OK and takes them back at reset. Python never sees a request (docs/virtio-blk.md#vhost-user-blk).

The configuration space (capacity, limits, topology) is the backend's, read once with GET_CONFIG when the
disk is opened; the features offered are the backend's within the virtio-blk features pyvmm knows.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.devices.virtio.block import BlkFeature
from pyvmm.devices.virtio.spec import VirtioDeviceType, bit
from pyvmm.devices.virtio.vhost_user import VhostUserBackend, VhostUserDevice, negotiate_backend
from pyvmm.vhost.user import VhostUserProtocolFeature

__all__ = ["CONFIG_SIZE", "Negotiated", "VhostUserBackend", "VhostUserBlkParams", "VhostUserBlock",
           "negotiate"]

# struct virtio_blk_config up to write_zeroes_may_unmap and its padding: what the in-process device shows
# too. num_queues (a u16) sits at byte 34.
CONFIG_SIZE = 60
NUM_QUEUES_OFFSET = 34
GEOMETRY = 4  # VIRTIO_BLK_F_GEOMETRY
TOPOLOGY = 10  # VIRTIO_BLK_F_TOPOLOGY

# Device features passed on when the backend offers them. CONFIG_WCE is not: it makes `writeback` a field
# the driver writes, which would need SET_CONFIG; without it the guest assumes a write-back cache and flushes.
PASSED_FEATURES = (
    bit(BlkFeature.SIZE_MAX) | bit(BlkFeature.SEG_MAX) | bit(GEOMETRY) | bit(BlkFeature.RO)
    | bit(BlkFeature.BLK_SIZE) | bit(BlkFeature.FLUSH) | bit(TOPOLOGY) | bit(BlkFeature.MQ)
    | bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES)
)


@dataclass(frozen=True)
class VhostUserBlkParams:
    num_queues: int = 1
    queue_size: int = 128


@dataclass(frozen=True)
class Negotiated:
    """What the backend said when the disk was opened."""

    features: int  # GET_FEATURES
    protocol_features: int  # acked with SET_PROTOCOL_FEATURES (0 without VHOST_USER_F_PROTOCOL_FEATURES)
    queues: int  # how many queues it serves
    config: bytes  # its configuration space, CONFIG_SIZE bytes


def negotiate(backend: VhostUserBackend, num_queues: int) -> Negotiated:
    """SET_OWNER, the features, the protocol features (CONFIG required), the queue count and the
    configuration space; a VhostUserError names what the backend lacks."""
    offer = negotiate_backend(
        backend, num_queues, required_protocol=1 << VhostUserProtocolFeature.CONFIG,
        why_required=" (pyvmm needs CONFIG to learn the disk's size)",
        wanted=f"num_queues={num_queues}", queue_hint=" (qemu-storage-daemon: num-queues= of the export)")
    config = backend.get_config(CONFIG_SIZE)
    return Negotiated(offer.features, offer.protocol_features, offer.queues, config)


class VhostUserBlock(VhostUserDevice):
    """A virtio-blk whose every queue a vhost-user backend serves."""

    device_type = VirtioDeviceType.BLOCK
    name = "blk"
    pci_class = (0x01, 0x00)  # mass storage

    def __init__(self, backend: VhostUserBackend, params: VhostUserBlkParams, label: str = "") -> None:
        negotiated = negotiate(backend, params.num_queues)
        super().__init__(backend, [params.queue_size] * params.num_queues, negotiated.features,
                         label or f"--disk socket={backend.path}")
        self.negotiated = negotiated
        features = negotiated.features & PASSED_FEATURES
        if params.num_queues == 1:
            features &= ~bit(BlkFeature.MQ)
        else:
            features |= bit(BlkFeature.MQ)
        self._features = features
        config = bytearray(negotiated.config)
        config[NUM_QUEUES_OFFSET:NUM_QUEUES_OFFSET + 2] = params.num_queues.to_bytes(2, "little")
        self._config = bytes(config)

    @property
    def features(self) -> int:
        return self._features

    @property
    def capacity(self) -> int:
        """The disk's size in 512-byte sectors, as the backend reports it."""
        return int.from_bytes(self._config[:8], "little")

    def config_bytes(self) -> bytes:
        return self._config
