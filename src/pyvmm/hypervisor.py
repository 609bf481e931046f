"""The small interfaces device models use to reach the hypervisor, so that they depend on what they need
(an irqfd, an ioeventfd, a memory slot, the KVM VFIO device) instead of on `kvm.system.Vm` as a whole.

`kvm.system.Vm` provides the first three directly; `kvm.memslots.KvmMemorySlots` and
`kvm.vfio_device.KvmVfioDevice` implement the last two. Unit tests and fuzzers provide small fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pyvmm.kvm.routing import Route


class Irqfds(Protocol):
    """Binds an eventfd to a GSI so that a write to it interrupts the guest without leaving the kernel."""

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None: ...


class Ioeventfds(Protocol):
    """Binds an eventfd to a guest address so that a guest write to it signals the eventfd, no exit."""

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None, pio: bool = False,
                  deassign: bool = False) -> None: ...


class GsiRouting(Protocol):
    """The VM's GSI routing table, replaced as a whole."""

    def set_gsi_routing(self, routes: Sequence[Route]) -> None: ...


class MemorySlots(Protocol):
    """Host memory installed at a guest-physical address; the handle identifies the mapping for removal."""

    def map_memory(self, gpa: int, size: int, host_address: int) -> int: ...

    def unmap_memory(self, handle: int) -> None: ...


class VfioGroupRegistry(Protocol):
    """The KVM VFIO pseudo-device: tells KVM which VFIO groups (by fd) this VM uses (for coherent DMA and
    the platform features that depend on it). It must exist before the first group is added."""

    def add_group(self, group_fd: int) -> None: ...

    def remove_group(self, group_fd: int) -> None: ...
