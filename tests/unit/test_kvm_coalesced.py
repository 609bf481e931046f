"""The coalesced-write ring: replay order and wrap-around on a plain page, the 0xCF8 latch taken off it for
reads answered ahead; 0xCF8 coalescing on /dev/kvm, with and without those reads."""

from __future__ import annotations

import ctypes
import mmap
import threading

import pytest

from pyvmm import layout
from pyvmm.devices.bus import IoBus
from pyvmm.kvm.bindings import kvm_coalesced_mmio, kvm_coalesced_mmio_ring
from pyvmm.kvm.coalesced import NOTHING_QUEUED, OTHERS_QUEUED, CoalescedRing, coalesce_port_writes
from pyvmm.kvm.runloop import VcpuLoop, install_kick_handler
from pyvmm.kvm.selftest import real_mode_vcpu
from pyvmm.kvm.system import Kvm, KvmError
from pyvmm.memory import GuestMemory
from pyvmm.pci.bus import HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID, PciConfigIo
from pyvmm.pci.planning import plan_windows, planning_platform


class Recorder:
    def __init__(self, base: int, log: list) -> None:
        self.base, self.log = base, log

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append((self.base + offset, size, value))


def _page() -> tuple[mmap.mmap, int]:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    return page, ctypes.addressof(ctypes.c_char.from_buffer(page))


def _push(ring: CoalescedRing, addr: int, size: int, value: int, pio: bool) -> None:
    """What KVM does: fill the entry at `last`, then advance `last`."""
    entry = ring.entries[ring.header.last]
    entry.phys_addr, entry.len, entry.pio = addr, size, int(pio)
    ctypes.memmove(entry.data, value.to_bytes(8, "little"), 8)
    ring.header.last = (ring.header.last + 1) % ring.capacity


def _recorded_ring(log: list, pio_ranges: list[tuple[int, int]],
                   mmio_ranges: list[tuple[int, int]]) -> tuple[mmap.mmap, CoalescedRing]:
    """A ring on a fresh page whose buses record every write into `log` (the page must be kept alive)."""
    page, address = _page()
    pio, mmio = IoBus("pio", 1 << 16), IoBus("mmio")
    for bus, ranges in ((pio, pio_ranges), (mmio, mmio_ranges)):
        for base, length in ranges:
            bus.insert(base, length, Recorder(base, log))
    return page, CoalescedRing(address, mmap.PAGESIZE, pio, mmio)


def test_replays_in_order_across_the_wrap_onto_the_right_bus() -> None:
    log: list = []
    _keep, ring = _recorded_ring(log, [(0xCF8, 4)], [(0xD000_0000, 0x1000)])
    assert ring.capacity == (mmap.PAGESIZE - ctypes.sizeof(kvm_coalesced_mmio_ring)) // ctypes.sizeof(
        kvm_coalesced_mmio
    )
    ring.header.first = ring.header.last = ring.capacity - 2
    expected = []
    for i in range(5):
        addr, size, pio_flag = (0xCF8, 4, True) if i % 2 == 0 else (0xD000_0010, 2, False)
        value = (0x8000_0000 | i << 11) if pio_flag else 0xBEE0 + i
        _push(ring, addr, size, value, pio_flag)
        expected.append((addr, size, value & ((1 << (8 * size)) - 1)))
    assert ring.pending()
    assert ring.drain() == 5
    assert log == expected
    assert not ring.pending() and ring.header.first == 3 and ring.replayed == 5
    assert ring.drain() == 0


def test_a_run_of_byte_writes_to_a_burst_port_is_one_call_in_order_with_the_rest() -> None:
    log: list = []
    _keep, ring = _recorded_ring(log, [(0xCF8, 4), (0x3F8, 8)], [])
    ring.add_burst(0x3F8, lambda data: log.append(("burst", data)))
    ring.header.first = ring.header.last = ring.capacity - 3  # the first run wraps
    for addr, size, value in [
        (0x3F8, 1, ord("a")), (0x3F8, 1, ord("b")), (0x3F8, 1, ord("c")), (0xCF8, 4, 0x8000_0800),
        (0x3F8, 1, ord("d")), (0x3F9, 1, 0x02), (0x3F8, 2, 0x6665), (0x3F8, 1, ord("g")),
    ]:  # fmt: skip
        _push(ring, addr, size, value, True)
    assert ring.drain() == 8 and not ring.pending()
    assert log == [
        ("burst", b"abc"), (0xCF8, 4, 0x8000_0800), ("burst", b"d"), (0x3F9, 1, 0x02),
        (0x3F8, 2, 0x6665), ("burst", b"g"),  # a word write is not a byte of the run: through the bus
    ]  # fmt: skip
    assert ring.replayed == 8


def test_an_index_beyond_the_ring_is_dropped_not_followed() -> None:
    _keep, address = _page()
    ring = CoalescedRing(address, mmap.PAGESIZE, IoBus("pio", 1 << 16), IoBus("mmio"))
    ring.header.first, ring.header.last = ring.capacity + 7, 3
    ring.drain()
    assert not ring.pending()


def test_only_latch_writes_queued_are_taken_off_the_ring_and_the_last_one_counts() -> None:
    log: list = []
    _keep, ring = _recorded_ring(log, [(0xCF8, 8), (0x3F8, 8)], [])
    assert ring.take_latch_writes(0xCF8) == NOTHING_QUEUED
    ring.header.first = ring.header.last = ring.capacity - 1  # the run wraps
    for value in (0x8000_0000, 0x8001_0000, 0x8002_0800):
        _push(ring, 0xCF8, 4, value, True)
    assert ring.take_latch_writes(0xCF8) == 0x8002_0800
    assert not ring.pending() and ring.replayed == 3 and log == []  # taken, not written: the caller latches
    # Anything else queued (a UART byte, a partial write of the latch) must reach its device in order first.
    for addr, size in [(0x3F8, 1), (0xCF8, 2)]:
        _push(ring, 0xCF8, 4, 0x8000_0800, True)
        _push(ring, addr, size, 0x41, True)
        assert ring.take_latch_writes(0xCF8) == OTHERS_QUEUED
        assert ring.drain() == 2 and log[-2:] == [(0xCF8, 4, 0x8000_0800), (addr, size, 0x41)]


def test_config_data_reads_are_answered_ahead_when_only_address_writes_are_queued() -> None:
    _keep, address = _page()
    pio = IoBus("pio", 1 << 16)
    segment = planning_platform(plan_windows([(1, 1)], 1 << 30, 40)).segments[0]
    config_io = PciConfigIo(segment)
    pio.insert(0xCF8, 8, config_io)
    uart: list = []
    pio.insert(0x3F8, 8, Recorder(0x3F8, uart))
    ring = CoalescedRing(address, mmap.PAGESIZE, pio, IoBus("mmio"))
    ring.add_latch_read_ahead(config_io, 0xCF8, 0xCF8, range(0xCFC, 0xD00))
    assert sorted(ring.read_ahead) == [0xCFC, 0xCFD, 0xCFE, 0xCFF]
    _push(ring, 0xCF8, 4, 0x8001_0000, True)  # bus 1: nothing there
    _push(ring, 0xCF8, 4, 0x8000_0000, True)  # the host bridge
    assert ring.read_ahead[0xCFC](4) == HOST_BRIDGE_DEVICE_ID << 16 | HOST_BRIDGE_VENDOR_ID
    assert ring.read_ahead[0xCFE](2) == HOST_BRIDGE_DEVICE_ID
    assert ring.read_ahead[0xCFD](1) == HOST_BRIDGE_VENDOR_ID >> 8
    assert config_io.address == 0x8000_0000 and not ring.pending()
    _push(ring, 0xCF8, 4, 0x8001_0000, True)
    assert ring.read_ahead[0xCFC](4) == 0xFFFF_FFFF
    _push(ring, 0xCF8, 4, 0x8000_0000, True)
    _push(ring, 0x3F8, 1, 0x41, True)
    assert ring.read_ahead[0xCFC](4) == -1  # the usual way: the UART's byte first
    assert ring.pending() and config_io.address == 0x8001_0000 and uart == []


# Real mode: the host bridge's ID through 0xCF8/0xCFC, an empty bus, then the address register read back.
PROGRAM = bytes(
    [
        0x66, 0xB8, 0x00, 0x00, 0x00, 0x80,  # mov eax, 0x80000000  (bus 0, slot 0, register 0)
        0xBA, 0xF8, 0x0C,                    # mov dx, 0xcf8
        0x66, 0xEF,                          # out dx, eax          (queued, no exit)
        0xBA, 0xFC, 0x0C,                    # mov dx, 0xcfc
        0x66, 0xED,                          # in eax, dx           (exit: the ring is replayed first)
        0x66, 0x89, 0xC3,                    # mov ebx, eax
        0x66, 0xB8, 0x00, 0x08, 0x01, 0x80,  # mov eax, 0x80010800  (bus 1: nothing there)
        0xBA, 0xF8, 0x0C,                    # mov dx, 0xcf8
        0x66, 0xEF,                          # out dx, eax
        0xBA, 0xFC, 0x0C,                    # mov dx, 0xcfc
        0x66, 0xED,                          # in eax, dx
        0x66, 0x89, 0xC6,                    # mov esi, eax
        0xBA, 0xF8, 0x0C,                    # mov dx, 0xcf8
        0x66, 0xED,                          # in eax, dx           (the address register)
        0xE6, 0x14,                          # out 0x14, al         (done)
        0xFA, 0xF4,                          # cli; hlt
    ]
)  # fmt: skip


class CountingBus(IoBus):
    """The port bus, counting the reads that went through it (not answered ahead of the ring)."""

    def __init__(self) -> None:
        super().__init__("pio", 1 << 16)
        self.reads: list[int] = []

    def read(self, addr: int, size: int) -> int:
        self.reads.append(addr)
        return super().read(addr, size)


@pytest.mark.parametrize("read_ahead", [False, True], ids=["replayed", "read-ahead"])
def test_config_address_writes_are_queued_by_kvm_and_seen_in_order(read_ahead: bool) -> None:
    try:
        kvm = Kvm()
    except KvmError as e:
        pytest.skip(f"KVM unavailable: {e}")
    install_kick_handler()
    memory = GuestMemory([(0, 0x10000)])
    memory.write(0x1000, PROGRAM)
    pio, mmio = CountingBus(), IoBus("mmio")
    segment = planning_platform(plan_windows([(1, 1)], 1 << 30, 40)).segments[0]
    config_io = PciConfigIo(segment)
    pio.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE, config_io)
    done = threading.Event()
    done_port = Recorder(0x14, [])
    done_port.write = lambda offset, size, value: done.set()  # type: ignore[method-assign]
    pio.insert(0x14, 1, done_port)
    with kvm, kvm.create_vm() as vm:
        vcpu = real_mode_vcpu(vm, memory, 0x1000)
        ring = coalesce_port_writes(vm, vcpu, layout.PCI_CONFIG_IO_PORT, 4, pio, mmio)
        if ring is None:
            pytest.skip("this KVM cannot coalesce port I/O (KVM_CAP_COALESCED_PIO)")
        if read_ahead:
            ring.add_latch_read_ahead(config_io, 0xCF8, 0xCF8, range(0xCFC, 0xD00))
        loop = VcpuLoop(vcpu, pio, mmio, coalesced=ring)
        thread = loop.start_thread()
        finished = done.wait(10)
        loop.request_stop()
        thread.join(5)
        assert finished, loop.result
        regs = vcpu.get_regs()
    assert regs.rbx & 0xFFFFFFFF == HOST_BRIDGE_DEVICE_ID << 16 | HOST_BRIDGE_VENDOR_ID
    assert regs.rsi & 0xFFFFFFFF == 0xFFFFFFFF
    assert regs.rax & 0xFFFFFFFF == 0x80010800
    assert ring.replayed == 2  # both address writes went through the ring, none exited
    # Answered ahead, the data reads never reach the bus; the address register's read always does.
    assert pio.reads == ([0xCF8] if read_ahead else [0xCFC, 0xCFC, 0xCF8])
    memory.close()
