"""The ids of a VM's PCI devices, one name space for those added at boot and those hot-plugged
(docs/api.md#endpoints).

As cloud-hypervisor names them: a device without `id=` gets its kind's prefix and the next number of one
VM-wide counter (`_disk0`, `_net1`, `_fs2`, `_vsock3`, `_vfio4`, `_disk5`, ...), skipping names that are
taken; a user's
`id=` is used as given (it must be new and must not start with `__`, which the VMM keeps for its own
devices: `__rng`, `__console`). An id leaves the space when its device leaves the VM; numbers are not
handed out again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvmm.config import VmConfig

from pyvmm.errors import UsageError

DISK_PREFIX = "_disk"
NET_PREFIX = "_net"
FS_PREFIX = "_fs"
VSOCK_PREFIX = "_vsock"
VFIO_PREFIX = "_vfio"
RESERVED_PREFIX = "__"


class DeviceIdError(UsageError):
    """An `id=` that cannot be used (taken, or reserved)."""


class DeviceIds:
    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._counter = 0

    def __contains__(self, ident: object) -> bool:
        return ident in self._taken

    def check(self, ident: str, also_taken: Iterable[str] = ()) -> None:
        """Refuse `ident` as a user's id (taken here or in `also_taken`, or reserved); takes nothing."""
        if ident.startswith(RESERVED_PREFIX):
            raise DeviceIdError(f"id {ident} is reserved (ids may not start with {RESERVED_PREFIX})")
        if ident in self._taken or ident in set(also_taken):
            raise DeviceIdError(f"id {ident} is already in use")

    def take(self, ident: str) -> str:
        """Take a user's id (checked as `check` does)."""
        self.check(ident)
        self._taken.add(ident)
        return ident

    def new(self, prefix: str) -> str:
        """The next free generated name with `prefix`, taken."""
        while True:
            ident = f"{prefix}{self._counter}"
            self._counter += 1
            if ident not in self._taken:
                self._taken.add(ident)
                return ident

    def assign(self, prefix: str, ident: str | None) -> str:
        """`ident` if given (a user's), else a new generated name."""
        return self.take(ident) if ident is not None else self.new(prefix)

    def release(self, ident: str) -> None:
        self._taken.discard(ident)

    def mark(self) -> tuple[int, frozenset[str]]:
        """The state to go back to when a request that took ids is refused (it used none up)."""
        return self._counter, frozenset(self._taken)

    def rollback(self, mark: tuple[int, frozenset[str]]) -> None:
        self._counter, taken = mark
        self._taken = set(taken)


@dataclass(frozen=True)
class BootNames:
    """The names of a VM's boot-time devices, by kind, each list in its config's order."""

    disks: list[str]
    nets: list[str]
    fs: list[str]
    vsock: list[str]
    devices: list[str]


def boot_ids(disk_ids: Iterable[str | None] = (), net_ids: Iterable[str | None] = (),
             fs_ids: Iterable[str | None] = (), vsock_ids: Iterable[str | None] = (),
             device_ids: Iterable[str | None] = ()) -> tuple[DeviceIds, BootNames]:
    """The id space of a VM at boot and the names of its --disks, --nets, --fs, --vsock and --devices:
    given ids kept, the others numbered in cloud-hypervisor's creation order (disks, nets, fs, vsock,
    passed-through functions). Generated names skip every given id, whichever device comes first."""
    groups = [(DISK_PREFIX, list(disk_ids)), (NET_PREFIX, list(net_ids)), (FS_PREFIX, list(fs_ids)),
              (VSOCK_PREFIX, list(vsock_ids)), (VFIO_PREFIX, list(device_ids))]
    ids = DeviceIds()
    ids._taken.update(i for _prefix, items in groups for i in items if i is not None)  # CH's boot id list
    named = [[ident if ident is not None else ids.new(prefix) for ident in items] for prefix, items in groups]
    return ids, BootNames(*named)


def vm_boot_ids(config: VmConfig) -> tuple[DeviceIds, BootNames]:
    """`boot_ids` of a VM config's devices."""
    return boot_ids([d.id for d in config.disks], [n.id for n in config.nets], [f.id for f in config.fs],
                    [config.vsock.id] if config.vsock is not None else [], [d.id for d in config.devices])
