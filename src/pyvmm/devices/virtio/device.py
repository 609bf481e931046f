"""What a virtio device type implements; the transport (pci.py) does everything else."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pyvmm.devices.virtio.queue import DescriptorChain, Virtqueue
from pyvmm.devices.virtio.spec import TRANSPORT_FEATURES, VirtioDeviceType
from pyvmm.memory import GuestMemory

if TYPE_CHECKING:
    from pyvmm.vhost.backend import VringSpec


class VirtioDevice(ABC):
    """A device type (block, net, ...). Queue methods run on the transport's worker thread, config
    methods on vCPU threads; neither may raise on guest input."""

    device_type: VirtioDeviceType
    name: str = "virtio"
    pci_class: tuple[int, int] = (0xFF, 0x00)  # (class, subclass) for the PCI header
    # Queues the device fills when it has something to send (virtio-console's receiveq) instead of
    # draining them on every kick: the transport calls fill_queue for those, process_queue for the rest.
    filled_queues: frozenset[int] = frozenset()
    # Queues a backend outside Python serves (a kernel vhost device): the transport never polls their
    # eventfds nor touches their rings; it hands them over at DRIVER_OK (start_external) and the device
    # takes them back in reset() and close().
    external_queues: frozenset[int] = frozenset()
    # Ring and transport feature bits offered (a backend may support fewer than Python's rings).
    transport_features: int = TRANSPORT_FEATURES

    def __init__(self, queue_sizes: list[int]) -> None:
        if not queue_sizes:
            raise ValueError("a virtio device needs at least one queue")
        self.queue_sizes = list(queue_sizes)
        self.memory: GuestMemory | None = None
        self.acked_features = 0
        self._kick: Callable[[int], None] = lambda index: None

    def bind_kick(self, kick: Callable[[int], None]) -> None:
        """The transport's way for the device to have queue `index` served on the worker thread (as a
        driver notification would), e.g. when host input arrives for a filled queue."""
        self._kick = kick

    def kick(self, index: int) -> None:
        self._kick(index)

    @property
    @abstractmethod
    def features(self) -> int:
        """Device-specific feature bits offered (the transport adds the ring and version bits)."""

    @abstractmethod
    def config_bytes(self) -> bytes:
        """The device configuration structure as the driver sees it."""

    def read_config(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        chunk = data[offset : offset + size] if offset >= 0 else b""
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def write_config(self, offset: int, size: int, value: int) -> None:  # noqa: B027 - read-only default
        """Writable configuration fields (none by default)."""

    def activate(self, memory: GuestMemory, features: int) -> None:
        """DRIVER_OK: the negotiated features are final and the rings may be used."""
        self.memory = memory
        self.acked_features = features

    def start_external(self, rings: Sequence[VringSpec]) -> None:  # noqa: B027 - only with external_queues
        """DRIVER_OK: serve these rings (the enabled external queues) outside Python from now on. Raises
        PyvmmError or OSError when the backend refuses them: the device then needs a reset."""

    def reset(self) -> None:
        """The driver reset the device (queues are reset by the transport)."""
        self.acked_features = 0

    def process_queue(self, queue: Virtqueue, every: int = 0, completed: Callable[[], None] | None = None
                      ) -> None:
        """Consume every available chain of `queue`. With `every` > 0, `completed` is called each time
        that many more chains have been returned to the driver (the transport interrupts the driver
        there if it asked for it, so it can refill the ring while the device goes on)."""
        pop, push, handle, index = queue.pop, queue.push, self.handle_chain, queue.index
        count = 0
        while (chain := pop()) is not None:
            push(chain.head, handle(index, chain))
            count += 1
            if count == every and completed is not None:
                count = 0
                completed()

    def fill_queue(self, queue: Virtqueue) -> None:  # noqa: B027 - only devices with filled_queues
        """Put what the device has to send into `queue`'s available buffers (worker thread). It must leave
        notifications enabled, so the driver's next buffer wakes it when data is waiting."""

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """Serve one request; returns the number of bytes written into its writable buffers."""
        return 0

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release host resources (files, sockets)."""


class RateLimitedWarnings:
    """At most `burst` warnings per `interval` seconds, then one line saying how many were dropped: a
    guest can send a million bad requests a second, and each must not cost a log line."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 5.0,
                 name: str = "virtio-blk") -> None:
        self._log = logger
        self._name = name
        self._burst = burst
        self._interval = interval
        self._window_start = -interval
        self._count = 0
        self._dropped = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._interval:
            if self._dropped:
                self._log.warning("%s: %d more warnings like these were not logged", self._name,
                                  self._dropped)
            self._window_start, self._count, self._dropped = now, 0, 0
        if self._count < self._burst:
            self._count += 1
            self._log.warning(msg, *args)
        else:
            self._dropped += 1
