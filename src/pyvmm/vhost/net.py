"""/dev/vhost-net: one instance serves one queue pair (vring 0 receive, vring 1 transmit) on a tap queue."""

from __future__ import annotations

from enum import IntEnum

from pyvmm.ioctl import IoctlError, ioctl
from pyvmm.vhost.backend import VhostError, VhostKernel
from pyvmm.vhost.bindings import VHOST_FILE_UNBIND, VhostIoctl, vhost_vring_file

VHOST_NET_PATH = "/dev/vhost-net"


class VhostNetVring(IntEnum):
    RX = 0
    TX = 1


class VhostNet(VhostKernel):
    """A vhost-net instance; its vrings' backend is a tap file (one queue of a multi-queue tap)."""

    def set_backend(self, index: int, fd: int) -> None:
        """Start vring `index` on `fd` (a tap queue), or stop it with fd -1 (VHOST_FILE_UNBIND)."""
        try:
            ioctl(self.fd, VhostIoctl.VHOST_NET_SET_BACKEND, vhost_vring_file(index, fd))
        except IoctlError as exc:
            raise VhostError(f"{self.name}: vring {index}: {exc}") from None

    def stop_backend(self, index: int) -> None:
        self.set_backend(index, VHOST_FILE_UNBIND)
