"""The coalesced-I/O ring: guest writes KVM queued instead of exiting, replayed onto the buses in order.

KVM shares one ring page per VM among all vCPUs (mapped at KVM_COALESCED_MMIO_PAGE_OFFSET pages into every
vCPU's kvm_run mapping). Writes to a registered zone are appended there without a userspace exit; reads
still exit. Whoever handles an exit first replays the queued writes, so a device always sees the guest's
accesses in program order: a vCPU's queued write precedes its own later exit in the ring, and guests
serialise the shared registers we coalesce (Linux holds pci_config_lock around each 0xCF8/0xCFC pair).
Devices that want to act once per replayed run (the UART writes its transmitted bytes out in one go) are
told after each drain that replayed something (`after_drain`). A port registered with a `burst` handler
gets a run of consecutive byte writes to it in one call (the console's 16 bytes per LSR poll), instead of
one bus dispatch per byte.

A port may also have a read answered *ahead* of the queued writes (`add_read_ahead`), when its device
can tell that they cannot change the answer: the booting console's LSR poll before every byte then costs
an exit but no replay. The writes stay queued until the next exit that replays, or the ring's sweeper
thread (`RingSweeper`), which replays them within SWEEP_DELAY of such a read: a guest may poll, write and
then idle in HLT, which KVM handles without an exit. A latch register (0xCF8, the PCI configuration
address: only its last write counts) can take its queued writes off the ring itself (`take_latch_writes`)
when nothing else is queued, so Linux's PCI probes (thousands of 0xCF8 writes, each followed by a 0xCFC
read) answer each read without a replay either.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import struct
import threading
from collections.abc import Callable

from pyvmm import sandbox
from pyvmm.kvm.bindings import KvmCap, kvm_coalesced_mmio, kvm_coalesced_mmio_ring
from pyvmm.kvm.bus import Bus
from pyvmm.kvm.system import Vcpu, Vm

_HEADER_SIZE = ctypes.sizeof(kvm_coalesced_mmio_ring)
_ENTRY_SIZE = ctypes.sizeof(kvm_coalesced_mmio)
# struct kvm_coalesced_mmio: phys_addr, len, pio, data[8] (checked against the ctypes binding below)
_ENTRY = struct.Struct("<QII8s")
_HEADER = struct.Struct("<II")  # first, last
_MASKS = [(1 << (8 * n)) - 1 for n in range(9)]
assert _ENTRY.size == _ENTRY_SIZE and _HEADER.size == _HEADER_SIZE
assert (kvm_coalesced_mmio.len.offset, kvm_coalesced_mmio.data.offset) == (8, 16)


class CoalescedRing:
    """Consumer side of the ring at `address` (inside a live vCPU mapping of `page_size` bytes)."""

    def __init__(self, address: int, page_size: int, pio_bus: Bus, mmio_bus: Bus) -> None:
        self.header = kvm_coalesced_mmio_ring.from_address(address)
        # the header's two indices as bytes, for the run loop's check for queued writes on every exit
        self.header_view = memoryview((ctypes.c_char * ctypes.sizeof(kvm_coalesced_mmio_ring))
                                      .from_address(address)).cast("B")
        self.capacity = (page_size - _HEADER_SIZE) // _ENTRY_SIZE  # KVM_COALESCED_MMIO_MAX
        self.entries = (kvm_coalesced_mmio * self.capacity).from_address(address + _HEADER_SIZE)
        # The drain decodes entries with struct from a byte view: a ctypes entry object costs far more.
        self._page = memoryview((ctypes.c_char * page_size).from_address(address)).cast("B")
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.after_drain: list[Callable[[], object]] = []  # called (under the ring's lock) after a replay
        self._bursts: dict[int, Callable[[bytes], object]] = {}  # port -> handler of a run of byte writes
        self._lock = threading.Lock()
        self.replayed = 0  # writes replayed so far
        # port -> answer of a read (of the given size) that needs no replay first, or -1 when it does
        self.read_ahead: dict[int, Callable[[int], int]] = {}
        self.sweep_after: set[int] = set()  # ports of those whose answer leaves writes queued (the sweeper's)
        self.sweeper = RingSweeper(self)  # a Service: whoever runs the VM starts and closes it

    def pending(self) -> bool:
        header = self.header
        return header.first != header.last

    def drain(self) -> int:
        """Replay every queued write onto its bus; returns how many. Safe from any thread."""
        header = self.header
        if header.first == header.last:
            return 0
        done = 0
        with self._lock:
            first, capacity, page = header.first, self.capacity, self._page
            pio_bus, mmio_bus, bursts = self.pio_bus, self.mmio_bus, self._bursts
            unpack_entry = _ENTRY.unpack_from
            # KVM may append while we replay: take what is there, hand the slots back, look again.
            while (last := header.last) != first:
                if first >= capacity or last >= capacity:  # the kernel never writes this: do not follow it
                    header.first = last
                    break
                while first != last:
                    addr, length, pio, data = unpack_entry(page, _HEADER_SIZE + first * _ENTRY_SIZE)
                    first = first + 1 if first + 1 < capacity else 0
                    done += 1
                    burst = bursts.get(addr) if pio and length == 1 and bursts else None
                    if burst is None:
                        value = int.from_bytes(data, "little") & _MASKS[length if length < 8 else 8]
                        (pio_bus if pio else mmio_bus).write(addr, length if length < 8 else 8, value)
                        continue
                    run = bytearray(data[:1])
                    while first != last:  # the byte writes to the same port that follow it
                        addr2, length2, pio2, data2 = unpack_entry(page, _HEADER_SIZE + first * _ENTRY_SIZE)
                        if addr2 != addr or length2 != 1 or not pio2:
                            break
                        run += data2[:1]
                        first = first + 1 if first + 1 < capacity else 0
                        done += 1
                    burst(bytes(run))
                header.first = first
            self.replayed += done
            for hook in self.after_drain:
                hook()
        return done

    def sweep(self) -> None:
        """Replay what is queued and run the after-drain hooks even if nothing was: a write that exited on
        a full ring may be waiting in its device for the next flush."""
        if self.drain():
            return
        with self._lock:
            for hook in self.after_drain:
                hook()

    def add_read_ahead(self, port: int, read: Callable[[int], int], *,
                       leaves_writes_queued: bool = True) -> None:
        """Answer reads of `port` with `read(size)` without replaying the queued writes first; `read`
        returns -1 when they must be (then the read goes the usual way). Called on vCPU threads, unlocked.
        When an answer leaves the writes queued (the default), the sweeper replays them within SWEEP_DELAY."""
        self.read_ahead[port] = read
        if leaves_writes_queued:
            self.sweep_after.add(port)

    def add_latch_read_ahead(self, device: Bus, base: int, latch: int, data: range) -> None:
        """Answer reads of the ports in `data` ahead of the ring whenever only 4-byte writes to the latch
        at `latch` are queued: the last of them is written to `device` as a replay would (`device` sits at
        `base` on the port bus and is read and written by offset), then the read goes to the device."""

        def read(size: int, offset: int) -> int:
            queued = self.take_latch_writes(latch)
            if queued == OTHERS_QUEUED:
                return -1
            if queued != NOTHING_QUEUED:
                device.write(latch - base, 4, queued)
            return device.read(offset, size)

        for port in data:
            # Nothing is left queued behind these answers: no sweep to wake.
            self.add_read_ahead(port, functools.partial(read, offset=port - base), leaves_writes_queued=False)

    def take_latch_writes(self, port: int) -> int:
        """For a latch at `port` (a register only whose last full write counts, 0xCF8): when every queued
        write is a 4-byte write to `port`, take them off the ring and return the last one's value, which the
        caller then latches as a replay would. NOTHING_QUEUED when the ring is empty; OTHERS_QUEUED when
        anything else is queued (that must be replayed in order first) or another thread is replaying."""
        header = self.header
        if header.first == header.last:
            return NOTHING_QUEUED
        if not self._lock.acquire(blocking=False):
            return OTHERS_QUEUED
        try:
            first, last, capacity, page = header.first, header.last, self.capacity, self._page
            if first >= capacity or last >= capacity:
                return OTHERS_QUEUED  # drain() deals with what the kernel never writes
            value, taken = NOTHING_QUEUED, 0
            while first != last:
                addr, length, pio, data = _ENTRY.unpack_from(page, _HEADER_SIZE + first * _ENTRY_SIZE)
                if addr != port or length != 4 or not pio:
                    return OTHERS_QUEUED
                value = int.from_bytes(data[:4], "little")
                first = first + 1 if first + 1 < capacity else 0
                taken += 1
            header.first = first
            self.replayed += taken
            return value
        finally:
            self._lock.release()

    def register_ports(self, vm: Vm, port: int, size: int,
                       burst: Callable[[bytes], object] | None = None) -> None:
        """Have KVM queue guest writes to ports [port, port+size) here (an access must lie wholly inside
        the zone to be queued; reads still exit). With `burst`, consecutive byte writes to `port` are
        replayed as one call of it with their bytes, in order, instead of through the bus."""
        vm.register_coalesced_zone(port, size, pio=True)
        if burst is not None:
            self.add_burst(port, burst)

    def add_burst(self, port: int, burst: Callable[[bytes], object]) -> None:
        """Replay consecutive queued byte writes to `port` as one call of `burst` with their bytes."""
        self._bursts[port] = burst


SWEEP_DELAY = 0.02  # seconds a queued write waits at most after a read answered ahead of it
# take_latch_writes(): the ring was empty; something other than the latch's writes is queued
NOTHING_QUEUED = -2
OTHERS_QUEUED = -1


class RingSweeper:
    """Replays the ring from its own thread after reads answered ahead of it. Blocked until a vCPU answers
    one (`wake`); then it replays every `delay` seconds until a sweep finds no such read since the last."""

    def __init__(self, ring: CoalescedRing, delay: float = SWEEP_DELAY) -> None:
        self._ring = ring
        self.delay = delay
        # Read by vCPU threads without a lock: they call wake() only when it is False. The sweeper clears it
        # before it replays, so writes queued before a read that saw True are replayed by that sweep.
        self.awake = False
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self.awake = True
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ring-sweeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sandbox.enter(sandbox.ThreadKind.VCPU)  # it replays as a vCPU's next exit would: the same calls
        while True:
            self._wake.wait()
            # Cleared before `_closed` is looked at: a close() after this sets `_wake` again, so it is never
            # lost (clearing it after the delay could swallow close()'s wake, and the thread then slept on).
            self._wake.clear()
            if self._closed.wait(self.delay):
                return
            self.awake = False
            self._ring.sweep()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def open_coalesced_ring(vm: Vm, vcpu: Vcpu, pio_bus: Bus, mmio_bus: Bus) -> CoalescedRing | None:
    """The VM's ring, read through `vcpu`'s mapping (which must outlive it); None when this KVM cannot
    coalesce port I/O, in which case every port write keeps exiting."""
    page_offset = vm.check_extension(KvmCap.KVM_CAP_COALESCED_MMIO)  # the ring's page in kvm_run's mapping
    if not page_offset or not vm.check_extension(KvmCap.KVM_CAP_COALESCED_PIO):
        return None
    if (page_offset + 1) * mmap.PAGESIZE > vcpu.mmap_size:
        return None
    return CoalescedRing(vcpu.run_address + page_offset * mmap.PAGESIZE, mmap.PAGESIZE, pio_bus, mmio_bus)


def coalesce_port_writes(
    vm: Vm, vcpu: Vcpu, port: int, size: int, pio_bus: Bus, mmio_bus: Bus
) -> CoalescedRing | None:
    """`open_coalesced_ring` with one zone of ports [port, port+size) registered on it."""
    ring = open_coalesced_ring(vm, vcpu, pio_bus, mmio_bus)
    if ring is not None:
        ring.register_ports(vm, port, size)
    return ring
