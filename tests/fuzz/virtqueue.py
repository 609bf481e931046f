"""Fuzz target: split virtqueues driven by a hostile driver against the real virtio-blk device model.

A RuleBasedStateMachine lays out one queue in a two-region GuestMemory (with a hole between the regions)
and plays the driver: it writes descriptors of every kind (loops, next indices past the table, addresses in
the hole, past RAM or straddling a region end, huge lengths, indirect tables, indirect inside indirect,
INDIRECT|NEXT), request headers of every type and sector, well-formed requests of every type, avail
entries and avail indices of any value, garbage in the used ring, and notification-suppression fields.
`process` then runs what the transport's worker runs (pyvmm.devices.virtio.pci.VirtioPciDevice.process):
disable notifications, `VirtioBlock.process_queue`, re-enable, decide on an interrupt; a QueueError is the
documented way a corrupt ring is reported (the transport sets DEVICE_NEEDS_RESET) and the machine then
re-initialises the queue like a driver after a reset.

Every chain the real walker hands to `VirtioBlock.handle_chain` is judged first by a model written from the
virtio 1.x spec (§2.7.5 descriptor chains, §5.2.6 block requests) and pyvmm's documented limits
(docs/virtio-blk.md#limits: a chain, its indirect table included, is at most the queue size long, one level
of indirection; at most seg_max data segments of at most size_max bytes; one discard segment):

- the walker reports exactly the chains the model calls malformed, with the same buffers;
- no exception escapes;
- the image file changes only through valid writes to a writable disk (exactly the payload at exactly the
  sectors; discard may keep or zero its range, write-zeroes zeroes it), and never for anything else;
- guest memory changes only inside the chain's device-writable buffers, with exactly the data the request
  calls for (read data, the id string, the status byte); every buffer handed to the image lies in guest RAM;
- the used element carries the chain's head and a length no larger than its writable buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
import tempfile
from dataclasses import dataclass, field

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pyvmm.devices.virtio.block import BlkFeature, BlockParams, VirtioBlock
from pyvmm.devices.virtio.image import DiskImageError, RawImage
from pyvmm.devices.virtio.queue import DescriptorChain, QueueError, Virtqueue
from pyvmm.devices.virtio.spec import Feature
from pyvmm.memory import GuestMemory

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
IMAGE_SECTORS = 128  # 64 KiB: small enough to compare whole after every request
SERIAL = "pyvmm-fuzz-serial-0123456789"  # longer than the 20-byte id: the device truncates it
ID_BYTES = 20

# Guest RAM: two regions with a hole between them, like low RAM and RAM above the 32-bit hole.
REGION_A = (0, 1 * MiB)
REGION_B = (2 * MiB, 1 * MiB)
RAM_END = REGION_B[0] + REGION_B[1]
RING_BASE = 0x1000  # descriptor table; avail and used follow (fits the largest queue drawn)
INDIRECT_TABLES = (0x40000, 0x48000, REGION_B[0] + 0x1000)
HEADERS = (0x20000, 0x20100, REGION_B[0] + 0x100, REGION_A[1] - 16)
DATA_AREAS = (0x60000, 0x80000, REGION_B[0] + 0x20000)

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
REQ_IN, REQ_OUT, REQ_FLUSH, REQ_GET_ID, REQ_DISCARD, REQ_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
_DESC = struct.Struct("<QIHH")
U16 = 0xFFFF

ADDRESSES = st.one_of(
    st.integers(0x10000, REGION_A[1] - 1),
    st.integers(REGION_B[0], RAM_END - 1),
    st.sampled_from(
        [
            0,
            *DATA_AREAS,
            *HEADERS,
            *INDIRECT_TABLES,
            RING_BASE,  # the rings themselves
            REGION_A[1] - 1,
            REGION_A[1] - 16,
            REGION_A[1],  # the hole
            REGION_B[0] - 8,
            RAM_END - 1,
            RAM_END - 16,
            RAM_END,
            1 << 32,
            (1 << 64) - 16,
            (1 << 64) - 1,
        ]
    ),
    st.integers(0, (1 << 64) - 1),
)
LENGTHS = st.one_of(
    st.sampled_from(
        [0, 1, 2, 15, 16, 17, 32, 511, 512, 513, 1024, 4096, 64 * KiB, MiB, 0x8000_0000, 0xFFFF_FFFF]
    ),
    st.integers(0, 0xFFFF_FFFF),
    st.integers(0, 2048),
)
FLAGS = st.one_of(st.integers(0, 7), st.integers(0, U16))
SECTORS = st.one_of(
    st.integers(0, IMAGE_SECTORS + 2),
    st.sampled_from([IMAGE_SECTORS - 1, IMAGE_SECTORS, 1 << 32, (1 << 55), (1 << 64) - 1]),
)
REQ_TYPES = st.one_of(
    st.sampled_from([REQ_IN, REQ_OUT, REQ_FLUSH, REQ_GET_ID, REQ_DISCARD, REQ_WRITE_ZEROES]),
    st.integers(0, 0xFFFF_FFFF),
)


# ---- the spec model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buf:
    addr: int
    length: int
    writable: bool


@dataclass
class Prediction:
    """What one chain must do: buffers, malformation, guest-memory result, image result, used length."""

    buffers: list[Buf]
    walk_error: bool
    memory_after: dict[int, bytearray] | None = None  # region gpa -> expected bytes (None: checked loosely)
    image_after: bytes | None = None
    discard_range: tuple[int, int] | None = None  # (offset, length) that may be zero or unchanged
    written: int | None = None
    loose_status: Buf | None = None  # broken chain: at most this byte may change, to IOERR
    writable_ranges: list[tuple[int, int]] = field(default_factory=list)
    outcome: str = "broken chain"  # for hypothesis statistics


def in_ram(addr: int, length: int) -> bool:
    return any(gpa <= addr and addr + length <= gpa + size for gpa, size in (REGION_A, REGION_B))


def spec_walk(
    mem: GuestMemory, desc_addr: int, size: int, head: int, indirect_ok: bool
) -> tuple[list[Buf], bool]:
    """§2.7.5: the buffers of chain `head` and whether it is malformed (what was collected before the fault
    is returned too). Limits: a chain (and an indirect table) has at most `size` entries, one table level."""
    table, entries, budget, index, nested = desc_addr, size, size, head, False
    out: list[Buf] = []
    while True:
        if index >= entries or budget == 0:
            return out, True
        budget -= 1
        addr, length, flags, nxt = _DESC.unpack(mem.read(table + 16 * index, 16))
        if flags & F_INDIRECT:
            if (
                not indirect_ok
                or nested
                or flags & F_NEXT
                or length == 0
                or length % 16
                or len(out) + length // 16 > size  # the whole chain is at most the queue size
                or not in_ram(addr, length)
            ):
                return out, True
            table, entries, budget, index, nested = addr, length // 16, length // 16, 0, True
            continue
        out.append(Buf(addr, length, bool(flags & F_WRITE)))
        if not flags & F_NEXT:
            return out, False
        index = nxt


def _bytes_at(buffers: list[Buf], start: int, count: int) -> list[tuple[int, int]]:
    """Guest (address, length) pieces of bytes [start, start+count) of a buffer list."""
    pieces = []
    pos = 0
    for b in buffers:
        lo, hi = max(start, pos), min(start + count, pos + b.length)
        if lo < hi:
            pieces.append((b.addr + lo - pos, hi - lo))
        pos += b.length
    return pieces


class Snapshot:
    """Guest memory contents, region by region."""

    def __init__(self, mem: GuestMemory) -> None:
        self.regions = {gpa: bytearray(mem.read(gpa, size)) for gpa, size in (REGION_A, REGION_B)}

    def read(self, addr: int, length: int) -> bytes:
        for gpa, data in self.regions.items():
            if gpa <= addr and addr + length <= gpa + len(data):
                return bytes(data[addr - gpa : addr - gpa + length])
        raise AssertionError(f"model read outside RAM {addr:#x}+{length}")

    def write(self, addr: int, data: bytes) -> None:
        for gpa, region in self.regions.items():
            if gpa <= addr and addr + len(data) <= gpa + len(region):
                region[addr - gpa : addr - gpa + len(data)] = data
                return
        raise AssertionError(f"model write outside RAM {addr:#x}+{len(data)}")

    def gather(self, pieces: list[tuple[int, int]]) -> bytes:
        return b"".join(self.read(a, n) for a, n in pieces)

    def scatter(self, pieces: list[tuple[int, int]], data: bytes) -> None:
        pos = 0
        for a, n in pieces:
            self.write(a, data[pos : pos + n])
            pos += n


def unmappable(buffers: list[Buf]) -> bool:
    """A buffer outside guest RAM, or a device-readable buffer after a device-writable one (§2.7.4.2)."""
    if not all(in_ram(b.addr, b.length) for b in buffers):
        return True
    seen_writable = False
    for b in buffers:
        if b.writable:
            seen_writable = True
        elif seen_writable:
            return True
    return False


def predict(
    mem: GuestMemory,
    image: bytes,
    buffers: list[Buf],
    walk_error: bool,
    *,
    readonly: bool,
    acked: int,
    queue_size: int,
) -> Prediction:
    """§5.2.6: what the block device must do with this chain."""
    p = Prediction(buffers, walk_error)
    broken = walk_error or unmappable(buffers)
    if broken:
        last = buffers[-1] if buffers else None
        if last is not None and last.writable and last.length and in_ram(last.addr + last.length - 1, 1):
            p.loose_status = Buf(last.addr + last.length - 1, 1, True)
        p.image_after = image
        return p
    p.writable_ranges = [(b.addr, b.length) for b in buffers if b.writable]
    readable = [b for b in buffers if not b.writable]
    writable = [b for b in buffers if b.writable]
    wlen = sum(b.length for b in writable)
    rlen = sum(b.length for b in readable)
    snap = Snapshot(mem)
    p.image_after = image
    if wlen == 0:  # nowhere to put a status: the request is dropped
        p.written = 0
        p.memory_after = snap.regions
        p.outcome = "no status byte"
        return p
    status_at = _bytes_at(writable, wlen - 1, 1)[0][0]
    data_in = _bytes_at(writable, 0, wlen - 1)
    n_in = wlen - 1

    def finish(status: int, written: int) -> Prediction:
        p.outcome = f"request type {req_type if rlen >= 16 else 'short'}: status {status}"
        snap.write(status_at, bytes([status]))
        p.written = written + 1
        p.memory_after = snap.regions
        return p

    req_type = -1
    if rlen < 16:
        return finish(S_IOERR, 0)
    header = snap.gather(_bytes_at(readable, 0, 16))
    payload = snap.gather(_bytes_at(readable, 16, rlen - 16))
    req_type, _, sector = struct.unpack("<IIQ", header)
    if req_type in (REQ_IN, REQ_OUT):
        data = data_in if req_type == REQ_IN else _bytes_at(readable, 16, rlen - 16)
        # seg_max (queue size - 2, at least 1) and size_max (1 MiB) over the non-empty data buffers
        if len(data) > max(min(queue_size - 2, 1024), 1) or any(n > MiB for _, n in data):
            return finish(S_IOERR, 0)
    if req_type == REQ_IN:
        if n_in % SECTOR or sector + n_in // SECTOR > IMAGE_SECTORS:
            return finish(S_IOERR, 0)
        snap.scatter(data_in, image[sector * SECTOR : sector * SECTOR + n_in])
        return finish(S_OK, n_in)
    if req_type == REQ_OUT:
        if readonly or len(payload) % SECTOR or sector + len(payload) // SECTOR > IMAGE_SECTORS:
            return finish(S_IOERR, 0)
        start = sector * SECTOR
        p.image_after = image[:start] + payload + image[start + len(payload) :]
        return finish(S_OK, 0)
    if req_type == REQ_FLUSH:
        return finish(S_OK, 0)
    if req_type == REQ_GET_ID:
        ident = SERIAL.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
        n = min(ID_BYTES, n_in)
        snap.scatter(_bytes_at(writable, 0, n), ident[:n])
        return finish(S_OK, n)
    if req_type in (REQ_DISCARD, REQ_WRITE_ZEROES):
        feature = BlkFeature.DISCARD if req_type == REQ_DISCARD else BlkFeature.WRITE_ZEROES
        if readonly:
            return finish(S_IOERR, 0)  # not offered on a read-only disk
        if not acked >> feature & 1:
            return finish(S_UNSUPP, 0)
        if not payload or len(payload) % 16:
            return finish(S_IOERR, 0)
        if len(payload) > 16:
            return finish(S_IOERR, 0)  # max_discard_seg / max_write_zeroes_seg is 1
        seg_sector, count, flags = struct.unpack("<QII", payload)
        allowed = 1 if req_type == REQ_WRITE_ZEROES else 0  # VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        if flags & ~allowed:
            return finish(S_UNSUPP, 0)
        if seg_sector + count > IMAGE_SECTORS:
            return finish(S_IOERR, 0)
        start, length = seg_sector * SECTOR, count * SECTOR
        if req_type == REQ_DISCARD:
            p.discard_range = (start, length)
        else:
            p.image_after = image[:start] + bytes(length) + image[start + length :]
        return finish(S_OK, 0)
    return finish(S_UNSUPP, 0)


# ---- the machine ----------------------------------------------------------------------------------------


class CheckedImage:
    """Wraps a RawImage: every buffer the device hands it must be a view of guest RAM."""

    def __init__(self, image: RawImage, memory: GuestMemory) -> None:
        self._image = image
        self._ranges = [(r.host_address, r.host_address + r.size) for r in memory.regions]

    def __getattr__(self, name: str) -> object:
        return getattr(self._image, name)

    def _check(self, buffers: list[memoryview]) -> None:
        for b in buffers:
            if not len(b):
                continue
            start = ctypes.addressof(ctypes.c_char.from_buffer(b))
            assert any(lo <= start and start + len(b) <= hi for lo, hi in self._ranges), (
                f"image I/O buffer at host {start:#x}+{len(b):#x} is not guest RAM"
            )

    def readv(self, offset: int, buffers: list[memoryview], length: int | None = None) -> None:
        self._check(buffers)
        self._image.readv(offset, buffers, length)

    def writev(self, offset: int, buffers: list[memoryview], length: int | None = None) -> None:
        self._check(buffers)
        self._image.writev(offset, buffers, length)


class VirtqueueBlkMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.blk: VirtioBlock | None = None
        self.q: Virtqueue | None = None
        self.mem: GuestMemory | None = None
        self.path = ""
        self._log = logging.getLogger("pyvmm.devices.virtio")
        self._log_level = self._log.level
        self._log.setLevel(logging.CRITICAL)  # every malformed chain logs a warning

    def teardown(self) -> None:
        self._log.setLevel(self._log_level)
        if self.blk is not None:
            self.blk.close()
        if self.q is not None:
            self.q.reset()
        if self.mem is not None:
            self.mem.close()
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    @initialize(
        size=st.sampled_from([1, 2, 4, 8, 16, 64, 256]),
        readonly=st.booleans(),
        direct=st.booleans(),
        indirect=st.booleans(),
        event_idx=st.booleans(),
        acked_discard=st.booleans(),
        acked_zeroes=st.booleans(),
        seed=st.integers(0, 255),
        ring_base=st.sampled_from(
            [RING_BASE, RING_BASE, RING_BASE + 8, REGION_A[1] - 0x400, RAM_END - 16, REGION_A[1] + 0x1000]
        ),
    )
    def build(
        self,
        size: int,
        readonly: bool,
        direct: bool,
        indirect: bool,
        event_idx: bool,
        acked_discard: bool,
        acked_zeroes: bool,
        seed: int,
        ring_base: int,
    ) -> None:
        fd, self.path = tempfile.mkstemp(prefix="pyvmm-fuzz-blk-", suffix=".img", dir="/var/tmp")
        self.image = bytes((i * 31 + seed + i // SECTOR) & 0xFF for i in range(IMAGE_SECTORS * SECTOR))
        os.write(fd, self.image)
        os.close(fd)
        self.mem = GuestMemory([REGION_A, REGION_B])
        try:
            raw = RawImage(self.path, readonly=readonly, direct=direct)
        except DiskImageError:  # a file system without O_DIRECT
            raw = RawImage(self.path, readonly=readonly)
        self.readonly = readonly
        self.blk = VirtioBlock(CheckedImage(raw, self.mem), BlockParams(queue_size=size, serial=SERIAL))  # type: ignore[arg-type]
        acked = self.blk.features | (1 << Feature.VERSION_1)
        if indirect:
            acked |= 1 << Feature.RING_INDIRECT_DESC
        if event_idx:
            acked |= 1 << Feature.RING_EVENT_IDX
        if not acked_discard:
            acked &= ~(1 << BlkFeature.DISCARD)
        if not acked_zeroes:
            acked &= ~(1 << BlkFeature.WRITE_ZEROES)
        self.acked = acked
        self.blk.activate(self.mem, acked)
        self.size = size
        self.indirect = indirect
        self.event_idx = event_idx
        self.q = Virtqueue(0, size)
        self.blk_handle = self.blk.handle_chain
        self.blk.handle_chain = self._checked_handle_chain  # type: ignore[method-assign]
        self.used_log: list[tuple[int, int, list[tuple[int, int]]]] = []
        self.chains = 0
        # A hostile ring placement must be refused with QueueError, never mapped.
        if ring_base != RING_BASE:
            self._place(ring_base)
            try:
                self.q.activate(self.mem, event_idx, indirect)
            except QueueError:
                assert not self.q.ready
            else:
                assert ring_base % 16 == 0 and in_ram(self.q.desc_addr, 16 * size)
                assert in_ram(self.q.used_addr, 6 + 8 * size)
                self.q.reset()
        self._reinit_queue()

    def _place(self, base: int) -> None:
        assert self.q is not None
        self.q.desc_addr = base
        self.q.avail_addr = base + 16 * self.size
        self.q.used_addr = (base + 16 * self.size + 6 + 2 * self.size + 3) & ~3

    def _reinit_queue(self) -> None:
        """The driver resets the queue and lays out fresh rings at RING_BASE."""
        assert self.q is not None and self.mem is not None
        self.q.reset()
        self.q.set_size(self.size)
        self._place(RING_BASE)
        self.mem.write(RING_BASE, bytes(0x1000 + 32 * self.size))
        self.q.activate(self.mem, self.event_idx, self.indirect)
        self.avail_idx = 0
        self.next_free = 0
        self.used_seen = 0

    @property
    def queue(self) -> Virtqueue:
        assert self.q is not None
        return self.q

    @property
    def memory(self) -> GuestMemory:
        assert self.mem is not None
        return self.mem

    # ---- the check around every chain the device serves ---------------------------------------------

    def _checked_handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        q, mem = self.queue, self.memory
        buffers, walk_error = spec_walk(mem, q.desc_addr, q.size, chain.head, self.indirect)
        got = [Buf(*d) for d in chain.descriptors]
        broken = walk_error or unmappable(buffers)  # the walker maps buffers as it goes
        assert broken == (chain.error is not None), (
            f"chain {chain.head}: model says broken={broken}, walker says {chain.error!r}"
        )
        assert got == buffers, f"chain {chain.head}: walker {got} != model {buffers}"
        assert len(got) <= q.size, "a chain longer than the queue"
        pred = predict(mem, self.image, buffers, walk_error, readonly=self.readonly, acked=self.acked,
                       queue_size=q.size)
        before = Snapshot(mem) if pred.memory_after is None else None
        written = self.blk_handle(queue_index, chain)
        self.chains += 1
        after = Snapshot(mem)
        # The image.
        actual = self._read_image()
        if pred.discard_range is not None:
            start, length = pred.discard_range
            assert (
                actual[:start] == self.image[:start]
                and actual[start + length :] == self.image[start + length :]
            )
            assert actual[start : start + length] in (self.image[start : start + length], bytes(length)), (
                "discard left something other than the old data or zeros"
            )
        else:
            assert actual == pred.image_after, self._image_diff(pred.image_after or b"", actual)
        self.image = actual
        # Guest memory and the used length.
        writable_len = sum(b.length for b in buffers if b.writable)
        assert 0 <= written <= max(writable_len, 0), f"used length {written} > writable {writable_len}"
        if pred.memory_after is not None:
            for gpa, expected in pred.memory_after.items():
                if after.regions[gpa] != expected:
                    raise AssertionError(f"guest memory: {self._mem_diff(gpa, expected, after.regions[gpa])}")
            assert written == pred.written, f"used length {written}, expected {pred.written}"
        else:
            assert before is not None
            allowed = pred.loose_status
            for gpa, old in before.regions.items():
                new = after.regions[gpa]
                if new == old:
                    continue
                diff = [gpa + i for i in range(len(old)) if old[i] != new[i]]
                assert allowed is not None and diff == [allowed.addr], (
                    f"broken chain changed guest memory at {[hex(d) for d in diff[:8]]}"
                )
                assert new[allowed.addr - gpa] == S_IOERR
            assert written in (0, 1) and (written == 0 or allowed is not None)
        self.used_log.append((chain.head, written, pred.writable_ranges))
        event(pred.outcome)
        return written

    def _read_image(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    @staticmethod
    def _image_diff(expected: bytes, actual: bytes) -> str:
        if len(expected) != len(actual):
            return f"image size {len(actual)} != {len(expected)}"
        diff = [i for i in range(len(expected)) if expected[i] != actual[i]]
        return f"image differs at bytes {diff[0]:#x}..{diff[-1]:#x} ({len(diff)} bytes)"

    @staticmethod
    def _mem_diff(gpa: int, expected: bytes, actual: bytes) -> str:
        diff = [i for i in range(len(expected)) if expected[i] != actual[i]]
        return f"{len(diff)} bytes differ, first at {gpa + diff[0]:#x}, last at {gpa + diff[-1]:#x}"

    # ---- driver actions -------------------------------------------------------------------------------

    def _write(self, addr: int, data: bytes) -> None:
        if in_ram(addr, len(data)):
            self.memory.write(addr, data)

    @rule(index=st.integers(0, 255), addr=ADDRESSES, length=LENGTHS, flags=FLAGS, nxt=st.integers(0, U16))
    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        index %= self.size
        nxt = nxt if nxt >= 0x100 else nxt % (self.size + 2)  # mostly in or just past the table
        self._write(self.queue.desc_addr + 16 * index, _DESC.pack(addr, length, flags, nxt))

    @rule(
        table=st.sampled_from(INDIRECT_TABLES),
        index=st.integers(0, 63),
        addr=ADDRESSES,
        length=LENGTHS,
        flags=FLAGS,
        nxt=st.integers(0, 70),
    )
    def write_indirect_entry(
        self, table: int, index: int, addr: int, length: int, flags: int, nxt: int
    ) -> None:
        self._write(table + 16 * index, _DESC.pack(addr, length, flags, nxt))

    @rule(
        where=st.sampled_from(HEADERS),
        req_type=REQ_TYPES,
        sector=SECTORS,
        reserved=st.integers(0, 0xFFFF_FFFF),
    )
    def write_header(self, where: int, req_type: int, sector: int, reserved: int) -> None:
        self._write(where, struct.pack("<IIQ", req_type, reserved, sector))

    @rule(
        where=st.sampled_from(DATA_AREAS), data=st.binary(min_size=1, max_size=64), repeat=st.integers(1, 128)
    )
    def write_data(self, where: int, data: bytes, repeat: int) -> None:
        self._write(where, (data * repeat)[: 8 * KiB])

    @rule(
        where=st.sampled_from(DATA_AREAS),
        sector=SECTORS,
        count=st.integers(0, IMAGE_SECTORS + 1),
        flags=st.sampled_from([0, 0, 1, 2, 0xFFFF_FFFF]),
    )
    def write_discard_segment(self, where: int, sector: int, count: int, flags: int) -> None:
        self._write(where, struct.pack("<QII", sector & ((1 << 64) - 1), count, flags))

    @rule(
        req_type=st.sampled_from([REQ_IN, REQ_OUT, REQ_FLUSH, REQ_GET_ID, REQ_DISCARD, REQ_WRITE_ZEROES, 99]),
        sector=st.integers(0, IMAGE_SECTORS),
        sectors=st.integers(0, 9),
        split=st.integers(1, 4),
        use_indirect=st.booleans(),
        region_b=st.booleans(),
        status_separate=st.booleans(),
        fill=st.integers(0, 255),
        kick=st.booleans(),
    )
    def well_formed_request(
        self,
        req_type: int,
        sector: int,
        sectors: int,
        split: int,
        use_indirect: bool,
        region_b: bool,
        status_separate: bool,
        fill: int,
        kick: bool,
    ) -> None:
        """A request a correct driver sends (sometimes past the disk's end), direct or indirect."""
        base = (REGION_B[0] if region_b else 0) + 0x90000 + (self.next_free % 4) * 0x2000
        header, data, status = base, base + 0x100, base + 0x1F00
        self.memory.write(header, struct.pack("<IIQ", req_type, 0, sector))
        n = sectors * SECTOR
        bufs: list[tuple[int, int, int]] = [(header, 16, 0)]
        if req_type in (REQ_DISCARD, REQ_WRITE_ZEROES):
            self.memory.write(data, struct.pack("<QII", sector, sectors, 0))
            bufs.append((data, 16, 0))
        elif req_type in (REQ_IN, REQ_GET_ID):
            piece = max(n // split, 1) if n else 0
            off = 0
            while off < n:
                m = min(piece, n - off)
                bufs.append((data + off, m, F_WRITE))
                off += m
        elif n:
            self.memory.write(data, bytes([fill]) * n)
            piece = max(n // split, 1)
            off = 0
            while off < n:
                m = min(piece, n - off)
                bufs.append((data + off, m, 0))
                off += m
        if status_separate or len(bufs) == 1 or not bufs[-1][2]:
            bufs.append((status, 1, F_WRITE))
        else:  # status byte shares the last data buffer (legal: the device uses the last byte)
            a, m, f = bufs[-1]
            bufs[-1] = (a, m + 1, f)
        if use_indirect and self.indirect and len(bufs) <= self.size:
            table = INDIRECT_TABLES[2 if region_b else 0]
            for i, (a, m, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.memory.write(table + 16 * i, _DESC.pack(a, m, f | (0 if last else F_NEXT), i + 1))
            head = self.next_free % self.size
            self.memory.write(
                self.queue.desc_addr + 16 * head, _DESC.pack(table, 16 * len(bufs), F_INDIRECT, 0)
            )
            self.next_free += 1
        elif len(bufs) <= self.size:
            head = self.next_free % self.size
            for i, (a, m, f) in enumerate(bufs):
                index = (head + i) % self.size
                last = i == len(bufs) - 1
                self.memory.write(
                    self.queue.desc_addr + 16 * index,
                    _DESC.pack(a, m, f | (0 if last else F_NEXT), (index + 1) % self.size),
                )
            self.next_free += len(bufs)
        else:
            return
        self._publish([head])
        if kick:
            self.process()

    def _publish(self, heads: list[int]) -> None:
        q = self.queue
        for h in heads:
            self.memory.write_u16(q.avail_addr + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & U16
        self.memory.write_u16(q.avail_addr + 2, self.avail_idx)

    @rule(heads=st.lists(st.integers(0, 300), min_size=1, max_size=8), kick=st.booleans())
    def publish(self, heads: list[int], kick: bool) -> None:
        """Heads into the avail ring (a few past the table), then the new avail index (and a kick)."""
        self._publish([h if h < 256 else h % (self.size + 1) for h in heads])
        if kick:
            self.process()

    @rule(idx=st.integers(0, U16))
    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx
        self.memory.write_u16(self.queue.avail_addr + 2, idx)

    @rule(offset=st.integers(0, 512), value=st.integers(0, U16))
    def scribble_used_ring(self, offset: int, value: int) -> None:
        """A driver writing where only the device writes (flags, idx, elements, avail_event)."""
        q = self.queue
        offset = offset % (6 + 8 * self.size - 1) & ~1
        self.memory.write_u16(q.used_addr + offset, value)

    @rule(flags=st.integers(0, U16), used_event=st.integers(0, U16))
    def suppression(self, flags: int, used_event: int) -> None:
        q = self.queue
        self.memory.write_u16(q.avail_addr, flags)
        self.memory.write_u16(q.avail_addr + 4 + 2 * self.size, used_event)

    @rule()
    def reset_queue(self) -> None:
        self._reinit_queue()

    @precondition(lambda self: self.q is not None and self.q.ready)
    @rule()
    def process(self) -> None:
        """What VirtioPciDevice.process does on the worker thread after a notification."""
        q, blk = self.queue, self.blk
        assert blk is not None
        used_before = q.used_idx
        self.used_log = []
        try:
            rounds = 0
            while True:
                rounds += 1
                assert rounds <= 4, "the device keeps finding work it never consumes"
                q.disable_notifications()
                blk.process_queue(q)
                if not q.enable_notifications():
                    break
            q.needs_interrupt()
        except QueueError:
            self._reinit_queue()  # the transport reports DEVICE_NEEDS_RESET; the driver resets
            return
        served = (q.used_idx - used_before) & U16
        assert served == len(self.used_log) <= self.size * 4
        self._check_used(used_before)

    def _check_used(self, used_before: int) -> None:
        """The used elements carry (head, written) of each chain served, unless the device was told to
        write over them by a later chain's buffers (a hostile driver can do that)."""
        q = self.queue
        ring_start, ring_end = q.used_addr, q.used_addr + 6 + 8 * self.size
        clobbered = any(
            a < ring_end and ring_start < a + n for _, _, ranges in self.used_log for a, n in ranges
        )
        if clobbered or not self.used_log or len(self.used_log) > self.size:
            return
        assert self.memory.read_u16(q.used_addr + 2) == q.used_idx
        for i, (head, written, _) in enumerate(self.used_log):
            slot = (used_before + i) % self.size
            elem = struct.unpack("<II", self.memory.read(q.used_addr + 4 + 8 * slot, 8))
            assert elem == (head, written), f"used element {slot} is {elem}, expected {(head, written)}"

    @invariant()
    def image_only_changed_by_checked_requests(self) -> None:
        if self.blk is not None:
            assert self._read_image() == self.image
