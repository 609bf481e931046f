"""Python cost of one virtio-blk request on this machine (no lab, no KVM): the worker's side only.

A split ring in guest RAM is filled as Linux's virtio_blk fills it (header, data, status, in an indirect
table), then the transport's `process()` drains it, as the
worker thread does after a kick. The image is a file in the page cache. Prints microseconds per request
for 4 KiB reads one request per kick (queue depth 1), 32 per kick (QD32), and 1 MiB reads of 256 4 KiB
segments. Multiply by the lab's TCG factor (about 30) for what a request costs the lab's worker thread.
Usage: python bench/virtio_cost.py [rounds [case]]  (case: 0, 1 or 2, one of the three)
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import time

from pyvmm.devices.virtio import BlockParams, VirtioBlock, VirtioPciDevice, vector_count
from pyvmm.devices.virtio import pci as virtio_pci
from pyvmm.devices.virtio.spec import DeviceStatus
from pyvmm.memory import GuestMemory
from pyvmm.pci.msi import MsixControl

MiB = 1 << 20
QUEUE_SIZE = 256
DESC, AVAIL, USED = 0x10000, 0x20000, 0x30000
HEADERS, TABLES, DATA = 0x100000, 0x200000, 0x400000
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class Vectors:
    """A virtio_pci.MsiTrigger without KVM: routing changes are dropped, a trigger is an eventfd write."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)

    def __len__(self) -> int:
        return self.count

    def vector_changed(self, vector: int, message: object) -> None:
        pass

    def enable_changed(self, enabled: bool, count: int) -> None:
        pass

    def signal(self, vector: int, message: object) -> None:
        self.trigger(vector)

    def trigger(self, vector: int) -> None:
        os.eventfd_write(self.fd, 1)  # what an irqfd-bound vector costs

    def eventfd(self, vector: int) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


class Ring:
    """The driver side, as Linux's: every request of more than one buffer (all of them: header, data,
    status) goes through an indirect table."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.avail_idx = 0

    def request(self, slot: int, sector: int, segments: int, seg_len: int) -> int:
        header = HEADERS + 32 * slot
        struct.pack_into("<IIQ", self.memory.view(header, 16), 0, 0, 0, sector)
        buffers = [(header, 16, 0)]
        data = DATA + slot * segments * seg_len
        buffers += [(data + i * seg_len, seg_len, F_WRITE) for i in range(segments)]
        buffers.append((header + 16, 1, F_WRITE))
        head = slot % QUEUE_SIZE
        table = TABLES + slot * 16 * len(buffers)
        for i, (addr, length, flags) in enumerate(buffers):
            more = F_NEXT if i < len(buffers) - 1 else 0
            self._desc(table, i, addr, length, flags | more, i + 1)
        self._desc(DESC, head, table, 16 * len(buffers), F_INDIRECT, 0)
        return head

    def _desc(self, table: int, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        struct.pack_into("<QIHH", self.memory.view(table + 16 * index, 16), 0, addr, length, flags, nxt)

    def publish(self, heads: list[int]) -> None:
        for head in heads:
            slot = self.avail_idx % QUEUE_SIZE
            struct.pack_into("<H", self.memory.view(AVAIL + 4 + 2 * slot, 2), 0, head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.memory.view(AVAIL + 2, 2), 0, self.avail_idx)


def make_device(image: str, memory: GuestMemory) -> tuple[VirtioPciDevice, Ring]:
    block = VirtioBlock.open(image, params=BlockParams(queue_size=QUEUE_SIZE))
    dev = VirtioPciDevice(block, memory, Vectors(vector_count(block)), bar64=True)
    q = dev.queues[0]
    q.desc_addr, q.avail_addr, q.used_addr, q.msix_vector = DESC, AVAIL, USED, 0
    q.activate(memory, event_idx=True, indirect=True)
    block.activate(memory, dev.offered_features)
    dev.status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | \
        DeviceStatus.DRIVER_OK
    dev.msix._control |= MsixControl.ENABLE  # as the driver's config write would
    return dev, Ring(memory)


def measure(dev: VirtioPciDevice, ring: Ring, per_kick: int, segments: int, rounds: int) -> float:
    block = dev.device
    assert isinstance(block, VirtioBlock)
    sectors = block.image.sectors
    span = segments * (8 if segments == 1 else 16)
    heads = [ring.request(slot, 0, segments, 4096 if segments == 1 else 8192) for slot in range(per_kick)]
    # Warm up, then time rounds of `per_kick` requests followed by one process() call.
    elapsed = 0.0
    for r in range(rounds + 5):
        for slot in range(per_kick):
            sector = ((r * per_kick + slot) * span * 7) % (sectors - span)
            struct.pack_into("<Q", ring.memory.view(HEADERS + 32 * slot + 8, 8), 0, sector)
        ring.publish(heads)
        t0 = time.perf_counter()
        dev.process(0)
        if r >= 5:
            elapsed += time.perf_counter() - t0
    return elapsed / (rounds * per_kick) * 1e6


def main() -> None:
    # No new requests ever arrive while the worker watches the ring here: measure the serving alone.
    virtio_pci.POLL_WINDOW = 0.0
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    memory = GuestMemory([(0, 64 * MiB)])
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR", "/tmp")) as f:
        f.truncate(256 * MiB)
        f.write(os.urandom(MiB))
        f.flush()
        with open(f.name, "rb") as warm:  # into the page cache
            while warm.read(MiB):
                pass
        cases = (
            ("4 KiB read, QD1", 1, 1),
            ("4 KiB read, 32 per kick", 32, 1),
            ("1 MiB read (128 x 8 KiB), 4 per kick", 4, 128),
        )
        for label, per_kick, segments in cases[int(sys.argv[2]) : int(sys.argv[2]) + 1] if len(sys.argv) > 2 \
                else cases:
            dev, ring = make_device(f.name, memory)
            try:
                us = measure(dev, ring, per_kick, segments, max(rounds // segments, 20))
            finally:
                dev.close()
            print(f"{label:40s} {us:8.1f} us/request")
    memory.close()


if __name__ == "__main__":
    main()
