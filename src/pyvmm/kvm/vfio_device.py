"""The KVM VFIO pseudo-device (KVM_DEV_TYPE_VFIO): the VM's list of VFIO groups, known to KVM."""

from __future__ import annotations

import ctypes
from typing import Protocol

from pyvmm.kvm.bindings import KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL, KvmDevType


class _DeviceVm(Protocol):
    def create_device(self, type_: int) -> int: ...

    def set_device_attr(
        self, device_fd: int, group: int, attr: int, data: ctypes._CData | None = None, flags: int = 0
    ) -> None: ...


class KvmVfioDevice:
    """Implements `hypervisor.VfioGroupRegistry`. Created on first use (KVM_CREATE_DEVICE), closed with the
    VM; KVM's failures are IoctlErrors naming the request."""

    def __init__(self, vm: _DeviceVm) -> None:
        self._vm = vm
        self._fd: int | None = None

    def _device(self) -> int:
        if self._fd is None:
            self._fd = self._vm.create_device(KvmDevType.KVM_DEV_TYPE_VFIO)
        return self._fd

    def create(self) -> None:
        """Create the device now (it must exist before the first group joins a container)."""
        self._device()

    def add_group(self, group_fd: int) -> None:
        self._vm.set_device_attr(self._device(), KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD,
                                 ctypes.c_int32(group_fd))

    def remove_group(self, group_fd: int) -> None:
        if self._fd is not None:
            self._vm.set_device_attr(self._fd, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL,
                                     ctypes.c_int32(group_fd))
