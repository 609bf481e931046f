"""The coalesced-I/O ring: guest writes KVM queued instead of exiting, replayed onto the buses in order.

KVM shares one ring page per VM among all vCPUs (mapped at KVM_COALESCED_MMIO_PAGE_OFFSET pages into every
vCPU's kvm_run mapping). Writes to a registered zone are appended there without a userspace exit; reads
still exit. Whoever handles an exit first replays the queued writes, so a device always sees the guest's
accesses in program order: a vCPU's queued write precedes its own later exit in the ring, and guests
serialise the shared registers we coalesce (Linux holds pci_config_lock around each 0xCF8/0xCFC pair).
"""

from __future__ import annotations

import ctypes
import mmap
import threading

from pyvmm.kvm.bindings import KvmCap, kvm_coalesced_mmio, kvm_coalesced_mmio_ring
from pyvmm.kvm.bus import Bus
from pyvmm.kvm.system import Vcpu, Vm

_HEADER_SIZE = ctypes.sizeof(kvm_coalesced_mmio_ring)
_ENTRY_SIZE = ctypes.sizeof(kvm_coalesced_mmio)


class CoalescedRing:
    """Consumer side of the ring at `address` (inside a live vCPU mapping of `page_size` bytes)."""

    def __init__(self, address: int, page_size: int, pio_bus: Bus, mmio_bus: Bus) -> None:
        self.header = kvm_coalesced_mmio_ring.from_address(address)
        self.capacity = (page_size - _HEADER_SIZE) // _ENTRY_SIZE  # KVM_COALESCED_MMIO_MAX
        self.entries = (kvm_coalesced_mmio * self.capacity).from_address(address + _HEADER_SIZE)
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self._lock = threading.Lock()
        self.replayed = 0  # writes replayed so far

    def pending(self) -> bool:
        header = self.header
        return header.first != header.last

    def drain(self) -> int:
        """Replay every queued write onto its bus; returns how many. Safe from any vCPU thread."""
        header = self.header
        if header.first == header.last:
            return 0
        done = 0
        with self._lock:
            first, capacity = header.first, self.capacity
            while first != header.last:
                if first >= capacity:  # the kernel never writes this; a corrupt index must not loop forever
                    header.first = header.last
                    break
                entry = self.entries[first]
                length = min(entry.len, 8)
                value = int.from_bytes(bytes(entry.data)[:length], "little")
                bus = self.pio_bus if entry.pio else self.mmio_bus
                bus.write(entry.phys_addr, length, value)
                first = (first + 1) % capacity
                header.first = first  # hands the slot back to KVM
                done += 1
            self.replayed += done
        return done


def coalesce_port_writes(
    vm: Vm, vcpu: Vcpu, port: int, size: int, pio_bus: Bus, mmio_bus: Bus
) -> CoalescedRing | None:
    """Have KVM queue guest writes to ports [port, port+size) and return the VM's ring (read through
    `vcpu`'s mapping, which must outlive it); None when this KVM cannot coalesce port I/O, in which case
    those writes keep exiting as before."""
    page_offset = vm.check_extension(KvmCap.KVM_CAP_COALESCED_MMIO)  # the ring's page in kvm_run's mapping
    if not page_offset or not vm.check_extension(KvmCap.KVM_CAP_COALESCED_PIO):
        return None
    if (page_offset + 1) * mmap.PAGESIZE > vcpu.mmap_size:
        return None
    ring = CoalescedRing(vcpu.run_address + page_offset * mmap.PAGESIZE, mmap.PAGESIZE, pio_bus, mmio_bus)
    vm.register_coalesced_zone(port, size, pio=True)
    return ring
