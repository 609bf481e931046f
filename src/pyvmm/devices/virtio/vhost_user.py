"""What every device served by a vhost-user backend shares: the opening negotiation (owner, features,
protocol features, queue count), and handing the rings over at DRIVER_OK and taking them back at reset.
Python never sees a request. The device types on top: vhost_user_blk.py (`--disk vhost_user=on`,
docs/virtio-blk.md#vhost-user-blk) and vhost_user_fs.py (`--fs`, docs/virtio-fs.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.spec import TRANSPORT_FEATURES, Feature, bit
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


class Closable(Protocol):
    def close(self) -> None: ...


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
class BackendOffer:
    """What the backend said when the device was opened."""

    features: int  # GET_FEATURES
    protocol_features: int  # acked with SET_PROTOCOL_FEATURES
    queues: int  # how many queues it serves


def negotiate_backend(backend: VhostUserBackend, queues: int, *, required_protocol: int = 0,
                      queues_without_mq: int = 1, why_required: str = "", wanted: str = "",
                      queue_hint: str = "") -> BackendOffer:
    """SET_OWNER, the features (VERSION_1 and protocol features required), the protocol features (those in
    `required_protocol` must be offered), and the number of queues the backend serves (`queues_without_mq`
    when it does not say): at least `queues` (`wanted` says why, `queue_hint` how to serve more). A
    VhostUserError names what the backend lacks."""
    backend.set_owner()
    features = backend.get_features()
    if not features & bit(Feature.VERSION_1):
        raise VhostUserError(f"{backend.path}: the backend does not offer VIRTIO_F_VERSION_1")
    if not features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
        raise VhostUserError(f"{backend.path}: the backend offers no protocol features{why_required}")
    offered = backend.get_protocol_features()
    for feature in VhostUserProtocolFeature:
        if required_protocol & (1 << feature) and not offered & (1 << feature):
            raise VhostUserError(f"{backend.path}: the backend does not offer the {feature.name} protocol "
                                 "feature")
    acked = offered & FRONTEND_PROTOCOL_FEATURES
    backend.set_protocol_features(acked)
    served = backend.get_queue_num() if acked & (1 << VhostUserProtocolFeature.MQ) else queues_without_mq
    if queues > served:
        raise VhostUserError(f"{backend.path}: {wanted or f'{queues} queues'} but the backend serves "
                             f"{served}{queue_hint}")
    return BackendOffer(features, acked, served)


class VhostUserDevice(VirtioDevice):
    """A virtio device whose every queue a vhost-user backend serves. `label` names it in messages (the
    option that made it)."""

    def __init__(self, backend: VhostUserBackend, queue_sizes: list[int], backend_features: int,
                 label: str) -> None:
        super().__init__(queue_sizes)
        self.backend = backend
        self.backend_features = backend_features
        self.label = label
        # The rings the backend serves are Python-free only if it implements what the driver may ask for.
        self.transport_features = TRANSPORT_FEATURES & backend_features
        self.external_queues = frozenset(range(len(queue_sizes)))
        self._started: list[int] = []
        self._held: list[Closable] = []
        self._cause: Callable[[], str] | None = None

    def hold(self, *resources: Closable, cause: Callable[[], str] | None = None) -> None:
        """Close `resources` (in order) after the connection: a backend process pyvmm started, the image
        lock it keeps for it. `cause()` says what happened to that backend when it hangs up."""
        self._held.extend(resources)
        self._cause = cause

    def hangup_message(self) -> str:
        """Why the VM stops when the backend hangs up (docs/virtio-blk.md#a-dead-backend)."""
        if self._cause is not None:
            return f"{self.label}: {self._cause()}; the VM stops"
        return f"{self.label}: the vhost-user backend closed the connection; the VM stops"

    def start_external(self, rings: Sequence[VringSpec]) -> None:
        """DRIVER_OK: the acked features, the memory table (the RAM memfds), then each enabled ring."""
        assert self.memory is not None
        self._stop_rings()
        backend = self.backend
        backend.set_features((self.acked_features & self.backend_features)
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
                log.debug("%s: ring %d stopped at %d", self.label, index, base)
            except (PyvmmError, OSError) as exc:  # a dead backend serves nothing any more anyway
                log.debug("%s: ring %d: %s", self.label, index, exc)

    def reset(self) -> None:
        self._stop_rings()
        super().reset()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stop_rings()
        self.backend.close()
        held, self._held = self._held, []
        for resource in held:
            try:
                resource.close()
            except Exception:
                log.debug("%s: closing %r failed", self.label, resource, exc_info=True)
