"""virtio-blk served by a vhost-user backend (`--disk vhost_user=on,socket=PATH`): qemu-storage-daemon, or
any vhost-user-blk server, reads the guest's rings and RAM itself; pyvmm negotiates, hands the rings over at
DRIVER_OK and takes them back at reset. Python never sees a request (docs/virtio-blk.md#vhost-user-blk).

The configuration space (capacity, limits, topology) is the backend's, read once with GET_CONFIG when the
disk is opened; the features offered are the backend's within the virtio-blk features pyvmm knows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvmm.devices.virtio.block import BlkFeature
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.spec import TRANSPORT_FEATURES, Feature, VirtioDeviceType, bit
from pyvmm.errors import PyvmmError
from pyvmm.memory import GuestMemory
from pyvmm.vhost.backend import MemoryTableRegion, VringSpec, memory_table
from pyvmm.vhost.user import (
    FRONTEND_PROTOCOL_FEATURES,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VhostUserError,
    VhostUserProtocolFeature,
)

log = logging.getLogger(__name__)

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


class VhostUserBackend(Protocol):
    """The frontend's side of one connection (vhost/user.VhostUserFrontend)."""

    path: str

    def set_owner(self) -> None: ...

    def get_features(self) -> int: ...

    def set_features(self, features: int) -> None: ...

    def get_protocol_features(self) -> int: ...

    def set_protocol_features(self, features: int) -> None: ...

    def get_queue_num(self) -> int: ...

    def get_config(self, size: int, offset: int = 0) -> bytes: ...

    def set_mem_table(self, regions: Sequence[MemoryTableRegion]) -> None: ...

    def set_vring(self, spec: VringSpec, memory: GuestMemory) -> None: ...

    def set_vring_enable(self, index: int, enable: bool) -> None: ...

    def get_vring_base(self, index: int) -> int: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


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
    """SET_OWNER, the features, the protocol features, the queue count and the configuration space; a
    VhostUserError names what the backend lacks."""
    backend.set_owner()
    features = backend.get_features()
    if not features & bit(Feature.VERSION_1):
        raise VhostUserError(f"{backend.path}: the backend does not offer VIRTIO_F_VERSION_1")
    if not features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
        raise VhostUserError(f"{backend.path}: the backend offers no protocol features (pyvmm needs CONFIG "
                             "to learn the disk's size)")
    offered = backend.get_protocol_features()
    if not offered & (1 << VhostUserProtocolFeature.CONFIG):
        raise VhostUserError(f"{backend.path}: the backend does not offer the CONFIG protocol feature")
    acked = offered & FRONTEND_PROTOCOL_FEATURES
    backend.set_protocol_features(acked)
    queues = backend.get_queue_num() if acked & (1 << VhostUserProtocolFeature.MQ) else 1
    if num_queues > queues:
        raise VhostUserError(f"{backend.path}: num_queues={num_queues} but the backend serves {queues} "
                             "(qemu-storage-daemon: num-queues= of the export)")
    config = backend.get_config(CONFIG_SIZE)
    return Negotiated(features, acked, queues, config)


class VhostUserBlock(VirtioDevice):
    """A virtio-blk whose every queue a vhost-user backend serves."""

    device_type = VirtioDeviceType.BLOCK
    name = "blk"
    pci_class = (0x01, 0x00)  # mass storage

    def __init__(self, backend: VhostUserBackend, params: VhostUserBlkParams) -> None:
        super().__init__([params.queue_size] * params.num_queues)
        self.backend = backend
        self.negotiated = negotiate(backend, params.num_queues)
        backend_features = self.negotiated.features
        features = backend_features & PASSED_FEATURES
        if params.num_queues == 1:
            features &= ~bit(BlkFeature.MQ)
        else:
            features |= bit(BlkFeature.MQ)
        self._features = features
        # The rings the backend serves are Python-free only if it implements what the driver may ask for.
        self.transport_features = TRANSPORT_FEATURES & backend_features
        self.external_queues = frozenset(range(params.num_queues))
        config = bytearray(self.negotiated.config)
        config[NUM_QUEUES_OFFSET:NUM_QUEUES_OFFSET + 2] = params.num_queues.to_bytes(2, "little")
        self._config = bytes(config)
        self._started: list[int] = []

    @property
    def features(self) -> int:
        return self._features

    @property
    def capacity(self) -> int:
        """The disk's size in 512-byte sectors, as the backend reports it."""
        return int.from_bytes(self._config[:8], "little")

    def config_bytes(self) -> bytes:
        return self._config

    def start_external(self, rings: Sequence[VringSpec]) -> None:
        """DRIVER_OK: the acked features, the memory table (the RAM memfds), then each enabled ring."""
        assert self.memory is not None
        self._stop_rings()
        backend = self.backend
        backend.set_features((self.acked_features & self.negotiated.features)
                             | bit(VHOST_USER_F_PROTOCOL_FEATURES))
        backend.set_mem_table(memory_table(self.memory))
        for ring in rings:
            backend.set_vring(ring, self.memory)
            self._started.append(ring.index)
            # With protocol features acked a ring starts disabled: the backend serves it from here on.
            backend.set_vring_enable(ring.index, True)

    def _stop_rings(self) -> None:
        """Take every ring back: disabled, then stopped by reading its next index (GET_VRING_BASE)."""
        started, self._started = self._started, []
        for index in started:
            try:
                self.backend.set_vring_enable(index, False)
                base = self.backend.get_vring_base(index)
                log.debug("vhost-user-blk %s: ring %d stopped at %d", self.backend.path, index, base)
            except (PyvmmError, OSError) as exc:  # a dead backend serves nothing any more anyway
                log.debug("vhost-user-blk %s: ring %d: %s", self.backend.path, index, exc)

    def reset(self) -> None:
        self._stop_rings()
        super().reset()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stop_rings()
        self.backend.close()
