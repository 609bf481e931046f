"""What every kernel vhost device shares: the owner, feature bits, the memory table built from guest RAM,
and one vring set up from one virtqueue's geometry (docs/net.md#vhost).

The memory table and the vring geometry are plain data (`memory_table`, `VringSpec`) so that a vhost-user
frontend can send the same facts over its socket; `VhostKernel` issues them as ioctls on a vhost fd.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from typing import Self

from pyvmm.errors import PyvmmError
from pyvmm.ioctl import IoctlError, ioctl
from pyvmm.memory import GuestMemory, GuestMemoryError
from pyvmm.vhost.bindings import (
    VHOST_FILE_UNBIND,
    VhostIoctl,
    vhost_memory_with,
    vhost_vring_addr,
    vhost_vring_file,
    vhost_vring_state,
)

DESC_ENTRY_SIZE = 16  # struct vring_desc
MAX_VRING_SIZE = 32768  # the largest split ring the transport lets a driver choose


class VhostError(PyvmmError):
    """A vhost device could not be opened or set up (exit status 1)."""


@dataclass(frozen=True)
class MemoryTableRegion:
    """One guest RAM region as a vhost backend maps it: where the guest sees it and where pyvmm has it
    mapped; `fd`/`fd_offset` are the memfd behind it (shared memory only: what vhost-user needs)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    fd: int | None = None
    fd_offset: int = 0


def memory_table(memory: GuestMemory) -> list[MemoryTableRegion]:
    """Every RAM region of the guest, in guest-address order."""
    return [
        MemoryTableRegion(r.gpa, r.size, r.host_address, r.fd, r.file_offset)
        for r in sorted(memory.regions, key=lambda r: r.gpa)
    ]


@dataclass(frozen=True)
class VringSpec:
    """One split virtqueue as the driver configured it (guest addresses), with its eventfds."""

    index: int
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    kick_fd: int  # the driver's notifications (a KVM ioeventfd signals it)
    call_fd: int  # the device's interrupts (bound to the queue's MSI-X vector by a KVM irqfd)
    base: int = 0  # the next available index to serve: 0 after a reset

    def ring_lengths(self) -> tuple[int, int, int]:
        """Bytes of the descriptor table, the available ring and the used ring (with the event fields)."""
        n = self.size
        return DESC_ENTRY_SIZE * n, 6 + 2 * n, 6 + 8 * n

    def host_addresses(self, memory: GuestMemory) -> tuple[int, int, int]:
        """Where pyvmm has the three rings mapped; VhostError when one is not wholly inside one RAM region
        (the addresses are the guest's: checked before they reach the kernel)."""
        if not 1 <= self.size <= MAX_VRING_SIZE or self.size & (self.size - 1):
            raise VhostError(f"vring {self.index}: size {self.size} is not a power of two "
                             f"up to {MAX_VRING_SIZE}")
        lengths = self.ring_lengths()
        try:
            return (
                memory.host_address(self.desc_addr, lengths[0]),
                memory.host_address(self.avail_addr, lengths[1]),
                memory.host_address(self.used_addr, lengths[2]),
            )
        except GuestMemoryError as exc:
            raise VhostError(f"vring {self.index}: {exc}") from None


class VhostKernel:
    """One open kernel vhost device (e.g. /dev/vhost-net): owned by this process once opened."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    @classmethod
    def open(cls, path: str) -> Self:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise VhostError(f"cannot open {path}: {exc.strerror} (is the vhost module loaded?)") from None
        backend = cls(fd, path)
        try:
            ioctl(fd, VhostIoctl.VHOST_SET_OWNER)
        except IoctlError as exc:
            backend.close()
            raise VhostError(f"{path}: {exc}") from None
        return backend

    def get_features(self) -> int:
        value = ctypes.c_uint64()
        ioctl(self.fd, VhostIoctl.VHOST_GET_FEATURES, value)
        return value.value

    def set_features(self, features: int) -> None:
        ioctl(self.fd, VhostIoctl.VHOST_SET_FEATURES, ctypes.c_uint64(features))

    def set_mem_table(self, regions: list[MemoryTableRegion]) -> None:
        table = vhost_memory_with(len(regions))()
        table.nregions = len(regions)
        for slot, region in zip(table.regions, regions, strict=True):
            slot.guest_phys_addr = region.guest_phys_addr
            slot.memory_size = region.memory_size
            slot.userspace_addr = region.userspace_addr
        ioctl(self.fd, VhostIoctl.VHOST_SET_MEM_TABLE, table)

    def set_vring(self, spec: VringSpec, memory: GuestMemory) -> None:
        """NUM, BASE, ADDR, KICK and CALL for one vring (its backend is set by the device type)."""
        desc, avail, used = spec.host_addresses(memory)
        ioctl(self.fd, VhostIoctl.VHOST_SET_VRING_NUM, vhost_vring_state(spec.index, spec.size))
        ioctl(self.fd, VhostIoctl.VHOST_SET_VRING_BASE, vhost_vring_state(spec.index, spec.base))
        addr = vhost_vring_addr(index=spec.index, flags=0, desc_user_addr=desc, used_user_addr=used,
                                avail_user_addr=avail, log_guest_addr=0)
        ioctl(self.fd, VhostIoctl.VHOST_SET_VRING_ADDR, addr)
        ioctl(self.fd, VhostIoctl.VHOST_SET_VRING_KICK, vhost_vring_file(spec.index, spec.kick_fd))
        ioctl(self.fd, VhostIoctl.VHOST_SET_VRING_CALL, vhost_vring_file(spec.index, spec.call_fd))

    def get_vring_base(self, index: int) -> int:
        """The next available index the kernel would serve (reading it also stops the vring)."""
        state = vhost_vring_state(index, 0)
        ioctl(self.fd, VhostIoctl.VHOST_GET_VRING_BASE, state)
        return int(state.num)

    def unbind_vring_fds(self, index: int) -> None:
        """Forget the kick and call eventfds of a stopped vring (so a later setup starts clean)."""
        for request in (VhostIoctl.VHOST_SET_VRING_KICK, VhostIoctl.VHOST_SET_VRING_CALL):
            with contextlib.suppress(IoctlError):
                ioctl(self.fd, request, vhost_vring_file(index, VHOST_FILE_UNBIND))

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
