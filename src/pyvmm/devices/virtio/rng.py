"""virtio-rng (virtio 1.x §5.4): one requestq whose device-writable buffers are filled from an entropy
source (`--rng src=`, /dev/urandom by default).

A request gets at most MAX_BYTES_PER_REQUEST bytes however large the buffers the guest posts (the used
length says how many): the source is read straight into guest RAM with readv, so a guest cannot make
pyvmm read or copy more than that per request. docs/virtio-console-rng.md#virtio-rng.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

from pyvmm.devices.virtio.device import RateLimitedWarnings, VirtioDevice
from pyvmm.devices.virtio.queue import DescriptorChain, split_views
from pyvmm.devices.virtio.spec import VirtioDeviceType
from pyvmm.errors import UsageError, VmError

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
MAX_BYTES_PER_REQUEST = 64 << 10  # Linux asks for at most a few hundred bytes at a time


class RngSourceError(UsageError):
    """The entropy source cannot be used (missing, unreadable, not a file or character device)."""


class VirtioRng(VirtioDevice):
    """Owns `fd` (the opened source) and closes it."""

    device_type = VirtioDeviceType.RNG
    name = "rng"
    pci_class = (0xFF, 0x00)

    def __init__(self, fd: int, queue_size: int = QUEUE_SIZE) -> None:
        super().__init__([queue_size])
        self._fd = fd
        self._warn = RateLimitedWarnings(log, name="virtio-rng")

    @classmethod
    def open(cls, path: str) -> VirtioRng:
        """Open the source read-only; RngSourceError (one line) unless it is a readable regular file or
        character device. O_NONBLOCK for the open only: a FIFO without a writer must not hang pyvmm."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # pyvmm's or the host's want, not
                raise VmError(f"cannot open entropy source {path}: {exc.strerror}") from None  # the user's
            raise RngSourceError(f"entropy source {path}: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
                raise RngSourceError(f"entropy source {path} is not a regular file or character device")
            os.set_blocking(fd, True)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise RngSourceError(f"entropy source {path}: {exc.strerror}") from None
            raise
        return cls(fd)

    @property
    def features(self) -> int:
        return 0

    def config_bytes(self) -> bytes:
        return b""  # virtio-rng has no configuration fields

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        if chain.error is not None or chain.readable:
            self._warn.warning("virtio-rng: request %d: %s", chain.head,
                               chain.error or "has device-readable buffers")
            return 0
        buffers, _ = split_views(chain.writable, MAX_BYTES_PER_REQUEST)
        if not buffers:
            return 0
        try:
            return os.readv(self._fd, buffers)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                self._warn.warning("virtio-rng: reading the entropy source failed: %s", exc.strerror)
            return 0

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
