"""The coalesced-write ring: replay order and wrap-around on a plain page; 0xCF8 coalescing on /dev/kvm."""

from __future__ import annotations

import ctypes
import mmap
import threading

import pytest

from pyvmm import layout
from pyvmm.devices.bus import IoBus
from pyvmm.kvm.bindings import kvm_coalesced_mmio, kvm_coalesced_mmio_ring
from pyvmm.kvm.coalesced import CoalescedRing, coalesce_port_writes
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


def test_config_address_writes_are_queued_by_kvm_and_seen_in_order() -> None:
    try:
        kvm = Kvm()
    except KvmError as e:
        pytest.skip(f"KVM unavailable: {e}")
    install_kick_handler()
    memory = GuestMemory([(0, 0x10000)])
    memory.write(0x1000, PROGRAM)
    pio, mmio = IoBus("pio", 1 << 16), IoBus("mmio")
    segment = planning_platform(plan_windows([(1, 1)], 1 << 30, 40)).segments[0]
    pio.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE, PciConfigIo(segment))
    done = threading.Event()
    done_port = Recorder(0x14, [])
    done_port.write = lambda offset, size, value: done.set()  # type: ignore[method-assign]
    pio.insert(0x14, 1, done_port)
    with kvm, kvm.create_vm() as vm:
        vcpu = real_mode_vcpu(vm, memory, 0x1000)
        ring = coalesce_port_writes(vm, vcpu, layout.PCI_CONFIG_IO_PORT, 4, pio, mmio)
        if ring is None:
            pytest.skip("this KVM cannot coalesce port I/O (KVM_CAP_COALESCED_PIO)")
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
    memory.close()
