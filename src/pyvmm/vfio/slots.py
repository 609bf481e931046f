"""Guest mappings of host memory (BAR areas) as KVM memory slots, behind a small interface."""

from __future__ import annotations

import threading
from typing import Protocol

from pyvmm.kvm.system import Vm


class GuestMapper(Protocol):
    """Installs host memory at a guest-physical address; the handle identifies the mapping for removal."""

    def map_memory(self, gpa: int, size: int, host_address: int) -> int: ...

    def unmap_memory(self, handle: int) -> None: ...


class KvmSlotMapper:
    """KVM user memory slots numbered from `first_slot` (the slots below belong to RAM), reused when freed."""

    def __init__(self, vm: Vm, first_slot: int, max_slots: int = 509) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        self._next = first_slot
        self._max = max_slots
        self._free: list[int] = []

    def map_memory(self, gpa: int, size: int, host_address: int) -> int:
        with self._lock:
            if self._free:
                slot = self._free.pop()
            elif self._next < self._max:
                slot = self._next
                self._next += 1
            else:
                raise OSError(f"no free KVM memory slot for {size:#x} bytes at {gpa:#x}")
        try:
            self._vm.set_user_memory_region(slot, gpa, size, host_address)
        except BaseException:
            with self._lock:
                self._free.append(slot)
            raise
        return slot

    def unmap_memory(self, handle: int) -> None:
        # A zero-sized region deletes the slot.
        self._vm.set_user_memory_region(handle, 0, 0, 0)
        with self._lock:
            self._free.append(handle)
