"""A minimal virtio 1.x guest driver used by the virtio tests (split rings in a GuestMemory, the modern PCI
transport through config space and BAR accesses), plus checks of the driver's own ring layout.

Other test modules import it as `test_virtio_driver` (pytest puts this directory on sys.path).
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass

from pyvmm.devices.virtio.pci import VirtioPciDevice
from pyvmm.memory import GuestMemory
from pyvmm.pci.msi import MsiMessage

MiB = 1 << 20
BAR_ADDRESS = 0xC000_0000
MSI_ADDRESS = 0xFEE0_0000

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class FakeVectors:
    """Stands in for interrupts.IrqfdMsiVectors: records routes and counts triggers per vector."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.routes: dict[int, MsiMessage | None] = {}
        self.triggers = [0] * count
        self.closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return self.count

    def vector_changed(self, vector: int, message: MsiMessage | None) -> None:
        self.routes[vector] = message

    def enable_changed(self, enabled: bool, count: int) -> None:
        pass

    def signal(self, vector: int, message: MsiMessage) -> None:
        self.trigger(vector)

    def trigger(self, vector: int) -> None:
        with self._cond:
            self.triggers[vector] += 1
            self._cond.notify_all()

    def eventfd(self, vector: int) -> int:
        return -1  # no kernel backend in these tests

    def wait(self, vector: int, above: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.triggers[vector] > above, timeout)

    def close(self) -> None:
        self.closed = True


class FakeVm:
    """Records ioeventfd registrations like kvm.system.Vm.ioeventfd."""

    def __init__(self) -> None:
        self.bound: dict[int, tuple[int, int]] = {}  # addr -> (fd, length)
        self.calls: list[tuple] = []

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None, pio: bool = False,
                  deassign: bool = False) -> None:
        self.calls.append((fd, addr, length, datamatch, deassign))
        if deassign:
            assert self.bound.pop(addr) == (fd, length)
        else:
            assert addr not in self.bound
            self.bound[addr] = (fd, length)


@dataclass
class Ring:
    """Driver side of one split virtqueue laid out in guest memory."""

    memory: GuestMemory
    size: int
    desc: int
    avail: int
    used: int

    def __post_init__(self) -> None:
        self.next_free = 0
        self.avail_idx = 0
        self.last_used = 0
        for addr, length in ((self.desc, 16 * self.size), (self.avail, 6 + 2 * self.size),
                             (self.used, 6 + 8 * self.size)):
            self.memory.write(addr, bytes(length))

    @classmethod
    def at(cls, memory: GuestMemory, base: int, size: int) -> Ring:
        desc = base
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + 4095) & ~4095
        return cls(memory, size, desc, avail, used)

    def write_desc(
        self, index: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None
    ) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Chain `buffers` ((addr, len, device-writable)) through direct descriptors; returns the head."""
        head = self.next_free
        for i, (addr, length, writable) in enumerate(buffers):
            index = (head + i) % self.size
            last = i == len(buffers) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.write_desc(index, addr, length, flags, (index + 1) % self.size)
        self.next_free = (head + len(buffers)) % self.size
        return head

    def add_indirect(self, table: int, buffers: list[tuple[int, int, bool]]) -> int:
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.write_desc(i, addr, length, flags, i + 1, table=table)
        head = self.next_free
        self.write_desc(head, table, 16 * len(buffers), F_INDIRECT)
        self.next_free = (head + 1) % self.size
        return head

    def publish(self, *heads: int) -> None:
        for head in heads:
            self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    @property
    def used_flags(self) -> int:
        return self.memory.read_u16(self.used)

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        while self.last_used != self.used_idx:
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


# ---- PCI side ---------------------------------------------------------------------------------------------

VIRTIO_CAP = 0x09
MSIX_CAP = 0x11


class Driver:
    """Drives a VirtioPciDevice through config space and BAR accesses only."""

    def __init__(self, dev: VirtioPciDevice, memory: GuestMemory) -> None:
        self.dev = dev
        self.memory = memory
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (bar, offset, length)
        self.notify_multiplier = 0
        self.msix_cap = 0
        self.rings: dict[int, Ring] = {}
        ptr = dev.config_read(0x34, 1)
        seen = 0
        while ptr and seen < 48:
            seen += 1
            cap_id = dev.config_read(ptr, 1)
            if cap_id == VIRTIO_CAP:
                cfg_type = dev.config_read(ptr + 3, 1)
                bar = dev.config_read(ptr + 4, 1)
                offset = dev.config_read(ptr + 8, 4)
                length = dev.config_read(ptr + 12, 4)
                self.caps.setdefault(cfg_type, (bar, offset, length))
                if cfg_type == 2:
                    self.notify_multiplier = dev.config_read(ptr + 16, 4)
                if cfg_type == 5:
                    self.pci_cfg_cap = ptr
            elif cap_id == MSIX_CAP:
                self.msix_cap = ptr
            ptr = dev.config_read(ptr + 1, 1)

    # register helpers
    def _reg(self, cfg_type: int, offset: int) -> int:
        bar, base, _ = self.caps[cfg_type]
        assert bar == 0
        return base + offset

    def common_read(self, offset: int, size: int) -> int:
        return self.dev.bar_read(0, self._reg(1, offset), size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.dev.bar_write(0, self._reg(1, offset), size, value)

    def device_cfg(self, offset: int, size: int) -> int:
        return self.dev.bar_read(0, self._reg(4, offset), size)

    @property
    def status(self) -> int:
        return self.common_read(0x14, 1)

    def features(self) -> int:
        self.common_write(0x00, 4, 0)
        lo = self.common_read(0x04, 4)
        self.common_write(0x00, 4, 1)
        return lo | self.common_read(0x04, 4) << 32

    def enable_msix(self) -> None:
        control = self.dev.config_read(self.msix_cap + 2, 2)
        table_size = (control & 0x7FF) + 1
        table = self.dev.config_read(self.msix_cap + 4, 4) & ~7
        for v in range(table_size):
            base = table + 16 * v
            self.dev.bar_write(0, base, 4, MSI_ADDRESS)
            self.dev.bar_write(0, base + 4, 4, 0)
            self.dev.bar_write(0, base + 8, 4, 0x30 + v)
            self.dev.bar_write(0, base + 12, 4, 0)
        self.dev.config_write(self.msix_cap + 2, 2, 0x8000)

    def init(self, want: int | None = None, queue_sizes: list[int] | None = None, msix: bool = True,
             ring_base: int = 0x10000) -> int:
        """The driver initialisation sequence of virtio 1.x §3.1.1; returns the negotiated features."""
        if msix:
            self.enable_msix()
        self.common_write(0x14, 1, 0)
        self.common_write(0x14, 1, 1)
        self.common_write(0x14, 1, 1 | 2)
        offered = self.features()
        features = offered if want is None else offered & want
        self.common_write(0x08, 4, 0)
        self.common_write(0x0C, 4, features & 0xFFFF_FFFF)
        self.common_write(0x08, 4, 1)
        self.common_write(0x0C, 4, features >> 32)
        self.common_write(0x14, 1, 1 | 2 | 8)
        assert self.status & 8, "FEATURES_OK refused"
        self.common_write(0x10, 2, 0)  # config vector 0
        num_queues = self.common_read(0x12, 2)
        for q in range(num_queues):
            self.common_write(0x16, 2, q)
            size = self.common_read(0x18, 2)
            if queue_sizes is not None:
                size = queue_sizes[q]
                self.common_write(0x18, 2, size)
            ring = Ring.at(self.memory, ring_base + q * 0x10000 * 4, size)
            self.common_write(0x20, 4, ring.desc)
            self.common_write(0x24, 4, 0)
            self.common_write(0x28, 4, ring.avail)
            self.common_write(0x2C, 4, 0)
            self.common_write(0x30, 4, ring.used)
            self.common_write(0x34, 4, 0)
            self.common_write(0x1A, 2, q + 1)
            assert self.common_read(0x1A, 2) == q + 1
            self.common_write(0x1C, 2, 1)
            self.rings[q] = ring
        self.common_write(0x14, 1, 1 | 2 | 8 | 4)
        return features

    def notify(self, queue: int) -> None:
        self.common_write(0x16, 2, queue)
        off = self.common_read(0x1E, 2)
        self.dev.bar_write(0, self._reg(2, off * self.notify_multiplier), 2, queue)


def wait_used(ring: Ring, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
    """Poll the used ring (filled by the device's worker thread) until `count` more entries appear."""
    deadline = time.monotonic() + timeout
    got: list[tuple[int, int]] = []
    while len(got) < count:
        got += ring.take_used()
        if len(got) >= count:
            break
        assert time.monotonic() < deadline, f"only {len(got)} of {count} used entries"
        time.sleep(0.002)
    return got


def test_ring_layout_follows_split_ring_alignment() -> None:
    memory = GuestMemory([(0, MiB)])
    ring = Ring.at(memory, 0x1000, 8)
    assert ring.desc % 16 == 0 and ring.avail % 2 == 0 and ring.used % 4 == 0
    assert ring.avail == ring.desc + 16 * 8
    head = ring.add([(0x8000, 16, False), (0x9000, 1, True)])
    ring.publish(head)
    assert memory.read_u16(ring.avail + 2) == 1
    assert struct.unpack("<QIHH", memory.read(ring.desc, 16)) == (0x8000, 16, F_NEXT, 1)
    assert struct.unpack("<QIHH", memory.read(ring.desc + 16, 16)) == (0x9000, 1, F_WRITE, 2)
