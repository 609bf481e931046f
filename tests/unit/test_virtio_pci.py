"""The modern virtio-pci transport, driven through config space and BAR accesses like a guest driver."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_virtio_driver import BAR_ADDRESS, Driver, FakeVectors, FakeVm, MiB, Ring, wait_used

from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.pci import (
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NOTIFY_CFG_OFFSET,
    VIRTIO_BAR64_ALIGN,
    VIRTIO_BAR_SIZE,
    VirtioPciDevice,
    vector_count,
)
from pyvmm.devices.virtio.queue import DescriptorChain, map_chain
from pyvmm.devices.virtio.spec import VirtioDeviceType
from pyvmm.memory import GuestMemory
from pyvmm.pci.allocator import io_allocator
from pyvmm.pci.apertures import mmio64_aperture, segment_windows
from pyvmm.pci.bar import BarKind
from pyvmm.pci.bus import PciConfigMmio, PciSegment

RAM = 8 * MiB
GiB = 1 << 30
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29


class Filler(VirtioDevice):
    """A test device type: fills every writable buffer with 0xAB; has a 2-queue, 8-byte config."""

    device_type = VirtioDeviceType.RNG
    name = "filler"

    def __init__(self, queues: int = 2, size: int = 16) -> None:
        super().__init__([size] * queues)
        self.handled: list[tuple[int, int]] = []
        self.closed = False
        self.threads: set[str] = set()

    @property
    def features(self) -> int:
        return 1 << 3

    def config_bytes(self) -> bytes:
        return bytes(range(1, 9))

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        assert self.memory is not None
        self.threads.add(threading.current_thread().name)
        bufs = map_chain(chain)
        for v in bufs.writable:
            v[:] = b"\xab" * len(v)
        self.handled.append((queue_index, chain.head))
        return bufs.writable_len

    def close(self) -> None:
        self.closed = True


class Setup:
    def __init__(self, queues: int = 2, bar64: bool = False) -> None:
        self.memory = GuestMemory([(0, RAM)])
        self.device = Filler(queues)
        self.vectors = FakeVectors(vector_count(self.device))
        self.vm = FakeVm()
        self.dev = VirtioPciDevice(self.device, self.memory, self.vectors, bar64=bar64, ioeventfds=self.vm)
        self.dev.assign_bar(0, BAR_ADDRESS)
        self.driver = Driver(self.dev, self.memory)

    def request(self, queue: int = 0, addr: int = 0x300000, length: int = 64) -> tuple[int, int]:
        ring = self.driver.rings[queue]
        head = ring.add([(addr, length, True)])
        ring.publish(head)
        self.driver.notify(queue)
        [used] = wait_used(ring, 1)
        return used


@pytest.fixture
def s() -> Iterator[Setup]:
    setup = Setup()
    yield setup
    setup.dev.close()


def test_header_and_capabilities(s: Setup) -> None:
    dev, drv = s.dev, s.driver
    assert dev.config_read(0, 4) == 0x1044_1AF4  # vendor 0x1af4, device 0x1040 + 4
    assert dev.config_read(0x2C, 2) == 0x1AF4 and dev.config_read(0x2E, 2) >= 0x40
    assert set(drv.caps) == {1, 2, 3, 4, 5}
    assert drv.caps[1][1:] == (0x0000, 0x38)
    assert drv.caps[3][1:] == (0x1000, 1)
    assert drv.caps[4][1:] == (0x2000, 8)
    assert drv.caps[2][1] == NOTIFY_CFG_OFFSET and drv.notify_multiplier == 4
    control = dev.config_read(drv.msix_cap + 2, 2)
    assert (control & 0x7FF) + 1 == 3  # config + 2 queues
    assert dev.config_read(drv.msix_cap + 4, 4) == MSIX_TABLE_OFFSET  # BIR 0
    assert dev.config_read(drv.msix_cap + 8, 4) == MSIX_PBA_OFFSET
    [bar] = dev.bars()
    assert bar.kind == BarKind.MEM32 and bar.size == VIRTIO_BAR_SIZE == 512 * 1024


def test_bar_placement_32_and_64_bit() -> None:
    windows = segment_windows([1], [1], mmio64_aperture(2 * GiB))
    seg = PciSegment(0, windows[0], io_allocator())
    boot_disk = Setup(bar64=False)
    other = Setup(bar64=True)
    try:
        slot32 = seg.add_device(boot_disk.dev)
        slot64 = seg.add_device(other.dev)
        [p32] = seg.placements(slot32)
        [p64] = seg.placements(slot64)
        assert p32.kind == BarKind.MEM32 and p32.address < 1 << 32 and p32.address % VIRTIO_BAR_SIZE == 0
        assert p64.kind == BarKind.MEM64 and p64.address >= 1 << 32 and p64.address % VIRTIO_BAR64_ALIGN == 0
        # Queue notifications are bound where the BAR landed.
        assert set(other.vm.bound) == {p64.address + NOTIFY_CFG_OFFSET + 4 * q for q in range(2)}
    finally:
        boot_disk.dev.close()
        other.dev.close()


def test_ioeventfds_follow_guest_bar_moves_and_close_unbinds() -> None:
    windows = segment_windows([1], [1], mmio64_aperture(2 * GiB))
    seg = PciSegment(0, windows[0], io_allocator())
    st_ = Setup()
    slot = seg.add_device(st_.dev)
    [p] = seg.placements(slot)
    assert sorted(st_.vm.bound) == [p.address + NOTIFY_CFG_OFFSET, p.address + NOTIFY_CFG_OFFSET + 4]
    assert all(length == 2 for _fd, length in st_.vm.bound.values())
    ecam = PciConfigMmio(seg)
    reg = slot << 15 | 0x10
    new = p.address - VIRTIO_BAR_SIZE
    ecam.write(reg, 4, new)
    ecam.write(slot << 15 | 0x04, 2, 0x6)  # memory decode + bus master: the move happens now
    assert sorted(st_.vm.bound) == [new + NOTIFY_CFG_OFFSET, new + NOTIFY_CFG_OFFSET + 4]
    st_.dev.close()
    assert st_.vm.bound == {}
    assert st_.device.closed and st_.vectors.closed


def test_full_initialisation_and_io_on_a_worker_thread(s: Setup) -> None:
    features = s.driver.init()
    assert features & VERSION_1 and features & (1 << 3)
    assert s.driver.status == 0xF
    head, written = s.request(queue=1)
    assert written == 64 and s.memory.read(0x300000, 64) == b"\xab" * 64
    assert s.device.handled == [(1, head)]
    assert s.vectors.triggers[2] == 1  # queue 1 uses vector 2
    assert s.device.threads == {"virtio-filler"}  # not the caller's (vCPU) thread


def test_kick_through_the_eventfd_like_kvm_ioeventfd(s: Setup) -> None:
    s.driver.init()
    ring = s.driver.rings[0]
    ring.publish(ring.add([(0x300000, 8, True)]))
    fd, _length = s.vm.bound[BAR_ADDRESS + NOTIFY_CFG_OFFSET]
    os.eventfd_write(fd, 1)  # what KVM does on the guest's notify write
    assert wait_used(ring, 1) == [(0, 8)]


def test_buffers_queued_before_driver_ok_are_processed(s: Setup) -> None:
    drv = s.driver
    drv.enable_msix()
    for status in (1, 3):
        drv.common_write(0x14, 1, status)
    drv.common_write(0x08, 4, 1)
    drv.common_write(0x0C, 4, 1)
    drv.common_write(0x14, 1, 0xB)
    ring = Ring.at(s.memory, 0x10000, 16)
    drv.common_write(0x16, 2, 0)
    for off, value in ((0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)):
        drv.common_write(off, 8, value)
    drv.common_write(0x1C, 2, 1)
    ring.publish(ring.add([(0x300000, 4, True)]))
    drv.dev.bar_write(0, NOTIFY_CFG_OFFSET, 2, 0)  # kick before DRIVER_OK: not processed yet
    drv.common_write(0x14, 1, 0xF)
    assert wait_used(ring, 1) == [(0, 4)]


def test_features_ok_needs_version_1_and_known_bits(s: Setup) -> None:
    drv = s.driver
    drv.common_write(0x14, 1, 3)
    drv.common_write(0x08, 4, 0)
    drv.common_write(0x0C, 4, 1 << 3)
    drv.common_write(0x14, 1, 0xB)
    assert not drv.status & 8  # no VERSION_1: refused
    drv.common_write(0x08, 4, 1)
    drv.common_write(0x0C, 4, 1 | 1 << 20)  # VERSION_1 plus a bit nobody offered
    drv.common_write(0x14, 1, 0xB)
    assert not drv.status & 8
    drv.common_write(0x0C, 4, 1)
    drv.common_write(0x14, 1, 0xB)
    assert drv.status & 8
    drv.common_write(0x0C, 4, 0)  # frozen after FEATURES_OK
    assert drv.common_read(0x0C, 4) == 1
    drv.common_write(0x14, 1, 0)
    assert drv.status == 0 and drv.common_read(0x0C, 4) == 0


def test_driver_ok_without_features_ok_is_ignored(s: Setup) -> None:
    s.driver.common_write(0x14, 1, 0x7)
    assert s.driver.status == 0x3


def test_queue_registers(s: Setup) -> None:
    drv = s.driver
    drv.common_write(0x16, 2, 1)
    assert drv.common_read(0x18, 2) == 16 and drv.common_read(0x1E, 2) == 1
    drv.common_write(0x18, 2, 12)  # not a power of two
    assert drv.common_read(0x18, 2) == 16
    drv.common_write(0x18, 2, 8)
    assert drv.common_read(0x18, 2) == 8
    drv.common_write(0x1A, 2, 7)  # the table has 3 entries
    assert drv.common_read(0x1A, 2) == 0xFFFF
    drv.common_write(0x20, 4, 0x1234_5000)
    drv.common_write(0x24, 4, 0x1)
    assert drv.common_read(0x20, 8) == 0x1_1234_5000
    drv.common_write(0x16, 2, 5)  # no such queue
    assert drv.common_read(0x18, 2) == 0
    drv.common_write(0x1C, 2, 1)  # ignored
    assert drv.common_read(0x12, 2) == 2


def test_queue_with_rings_outside_ram_sets_needs_reset(s: Setup) -> None:
    drv = s.driver
    drv.enable_msix()
    drv.common_write(0x14, 1, 3)
    drv.common_write(0x08, 4, 1)
    drv.common_write(0x0C, 4, 1)
    drv.common_write(0x14, 1, 0xB)
    drv.common_write(0x10, 2, 0)
    drv.common_write(0x14, 1, 0xF)
    drv.common_write(0x16, 2, 0)
    drv.common_write(0x20, 8, RAM - 64)
    drv.common_write(0x1C, 2, 1)
    assert drv.status & 0x40
    assert s.vectors.triggers[0] == 1  # configuration-change interrupt
    assert drv.common_read(0x15, 1) == 1  # config generation moved


def test_queue_config_frozen_once_enabled(s: Setup) -> None:
    s.driver.init()
    s.driver.common_write(0x16, 2, 0)
    desc = s.driver.common_read(0x20, 8)
    s.driver.common_write(0x20, 8, 0x5000)
    s.driver.common_write(0x18, 2, 4)
    assert s.driver.common_read(0x20, 8) == desc and s.driver.common_read(0x18, 2) == 16


def test_reset_clears_queues_and_stops_processing(s: Setup) -> None:
    s.driver.init()
    s.driver.common_write(0x14, 1, 0)
    assert s.driver.status == 0
    s.driver.common_write(0x16, 2, 0)
    assert s.driver.common_read(0x1C, 2) == 0 and s.driver.common_read(0x20, 8) == 0
    ring = s.driver.rings[0]
    ring.publish(ring.add([(0x300000, 8, True)]))
    s.driver.dev.bar_write(0, NOTIFY_CFG_OFFSET, 2, 0)
    s.dev.process(0)  # what the worker would do: nothing, the device is reset
    assert ring.take_used() == []
    s.driver.init(ring_base=0x40000)
    assert s.request() == (0, 64)


def test_event_idx_suppresses_interrupts(s: Setup) -> None:
    features = s.driver.init()
    assert features & EVENT_IDX
    ring = s.driver.rings[0]
    assert s.request() == (0, 64)
    assert s.vectors.triggers[1] == 1
    ring.set_used_event(5)  # interrupt only once used idx passes 5
    s.request(addr=0x300100)
    s.request(addr=0x300200)
    assert s.vectors.triggers[1] == 1
    assert ring.avail_event == 3  # the device asks to be notified for the next buffer


def test_no_interrupt_without_msix_but_isr_set_and_cleared_on_read(s: Setup) -> None:
    s.driver.init(msix=False)
    assert s.request() == (0, 64)
    assert sum(s.vectors.triggers) == 0
    isr = s.driver.caps[3][1]
    assert s.dev.bar_read(0, isr, 1) == 1
    assert s.dev.bar_read(0, isr, 1) == 0


def test_device_config_and_pci_cfg_window(s: Setup) -> None:
    assert s.driver.device_cfg(0, 4) == 0x04030201
    assert s.driver.device_cfg(6, 2) == 0x0807
    cap = s.driver.pci_cfg_cap
    s.dev.config_write(cap + 4, 1, 0)  # BAR 0
    s.dev.config_write(cap + 8, 4, 0x12)  # common cfg num_queues
    s.dev.config_write(cap + 12, 4, 2)
    assert s.dev.config_read(cap + 16, 2) == 2
    s.dev.config_write(cap + 8, 4, 0x14)  # device_status through the window
    s.dev.config_write(cap + 12, 4, 1)
    s.dev.config_write(cap + 16, 1, 1)
    assert s.driver.status == 1
    s.dev.config_write(cap + 8, 4, VIRTIO_BAR_SIZE)  # outside the BAR: reads 0, writes dropped
    assert s.dev.config_read(cap + 16, 4) == 0


def test_msix_table_in_the_bar(s: Setup) -> None:
    s.driver.enable_msix()
    assert s.dev.bar_read(0, MSIX_TABLE_OFFSET + 16, 4) == 0xFEE0_0000
    assert s.dev.bar_read(0, MSIX_TABLE_OFFSET + 16 + 8, 4) == 0x31
    assert s.vectors.routes[1] is not None
    s.dev.bar_write(0, MSIX_TABLE_OFFSET + 16 + 12, 4, 1)  # mask vector 1
    assert s.vectors.routes[1] is None
    assert s.dev.bar_read(0, MSIX_PBA_OFFSET, 8) == 0


@given(
    st.integers(0, VIRTIO_BAR_SIZE + 16), st.sampled_from([0, 1, 2, 3, 4, 8, 16]), st.integers(0, 2**64 - 1)
)
@settings(max_examples=400, deadline=None)
def test_random_bar_and_config_accesses_never_raise(offset: int, size: int, value: int) -> None:
    setup = Setup()
    try:
        setup.dev.bar_write(0, offset, size, value)
        setup.dev.bar_read(0, offset, size)
        setup.dev.config_write(offset % 4096, min(size, 4) or 1, value & 0xFFFF_FFFF)
        setup.dev.config_read(offset % 4096, min(size, 4) or 1)
        setup.dev.bar_write(1, offset, 4, value)
    finally:
        setup.dev.close()

