"""KVM user memory slots, numbered in one place for the whole VM (guest RAM and mapped device BARs)."""

from __future__ import annotations

import threading
from typing import Protocol

from pyvmm.kvm.bindings import KvmCap
from pyvmm.kvm.system import KvmError

# KVM_CAP_NR_MEMSLOTS is answered by every KVM that pyvmm can run on; this is the x86 value of old kernels.
DEFAULT_NR_MEMSLOTS = 509


class _SlotVm(Protocol):
    def check_extension(self, cap: KvmCap | int) -> int: ...

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None: ...


class KvmMemorySlots:
    """Hands out KVM memory slot numbers (lowest free first, reused when freed) and installs the mappings.

    Implements `hypervisor.MemorySlots`: `map_memory` returns the slot number as the handle.
    """

    def __init__(self, vm: _SlotVm, max_slots: int | None = None) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        if max_slots is None:
            max_slots = vm.check_extension(KvmCap.KVM_CAP_NR_MEMSLOTS) or DEFAULT_NR_MEMSLOTS
        self.max_slots = max_slots
        self._used: set[int] = set()

    def _take(self, size: int, gpa: int) -> int:
        with self._lock:
            for slot in range(self.max_slots):
                if slot not in self._used:
                    self._used.add(slot)
                    return slot
        raise KvmError(f"no free KVM memory slot for {size:#x} bytes at {gpa:#x} (this KVM has "
                       f"{self.max_slots})")

    def map_memory(self, gpa: int, size: int, host_address: int) -> int:
        slot = self._take(size, gpa)
        try:
            self._vm.set_user_memory_region(slot, gpa, size, host_address)
        except BaseException:
            with self._lock:
                self._used.discard(slot)
            raise
        return slot

    def unmap_memory(self, handle: int) -> None:
        self._vm.set_user_memory_region(handle, 0, 0, 0)  # a zero-sized region deletes the slot
        with self._lock:
            self._used.discard(handle)

    @property
    def in_use(self) -> int:
        with self._lock:
            return len(self._used)
