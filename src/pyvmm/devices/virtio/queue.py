"""Split virtqueues (virtio 1.x §2.7): ring mapping, descriptor chain walking, used-ring updates and
notification suppression in both directions (flags or event-idx).

Every guest address goes through GuestMemory views; the three rings are mapped once when the queue is
enabled, and buffers are handed to devices as memoryviews of guest RAM (no copies).

Memory ordering: Python writes through a memoryview are plain stores and x86 is TSO, so stores become
visible in program order (used element before used idx) and loads are not reordered with loads (avail idx
before ring entries and descriptors). The one reordering TSO allows is a later load passing an earlier
store; the two store-then-load sequences of the protocol (publish used idx, then read used_event; publish
avail_event, then re-read avail idx) therefore go through `full_barrier()`.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field
from enum import IntFlag

from pyvmm.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")


class DescFlag(IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


_F_NEXT, _F_WRITE, _F_INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)  # hot path
# What a linear indirect table looks like, as Linux fills one: entry i links to i + 1, and every entry but
# the last has NEXT; device-readable entries come first. Sliced to a table's length and compared whole.
# Shorter tables (a 4 KiB request has three entries) are walked faster one at a time; longer ones than
# _LINEAR_MAX (queues over 1024 entries) take the general walk too.
_LINEAR_MIN = 12
_LINEAR_MAX = 1024
_LINEAR_NEXT = list(range(1, _LINEAR_MAX))
_READABLE_NEXT = [_F_NEXT] * _LINEAR_MAX
_WRITABLE_NEXT = [_F_NEXT | _F_WRITE] * _LINEAR_MAX
_DEVICE_WRITABLE = [True] * _LINEAR_MAX
_DEVICE_READABLE = [False] * _LINEAR_MAX

AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """A full memory fence: CPython's lock acquire/release is a lock-prefixed atomic on x86."""
    with _barrier_lock:
        pass


class QueueError(Exception):
    """The ring itself is unusable (bad addresses, impossible indices): the device needs a reset."""


class ChainError(Exception):
    """One descriptor chain is malformed or points outside guest RAM: that request fails."""


# One buffer of a chain: (guest address, length, device-writable). A plain tuple: chains are walked for
# every request, and a dataclass per descriptor was a measurable share of virtio-blk's per-request cost.
Descriptor = tuple[int, int, bool]


@dataclass(slots=True)
class DescriptorChain:
    """The buffers of one available head, as descriptors and as views of guest RAM (device-readable
    first; mapped during the walk, which saves a second pass per request). `error` is set when the chain
    is malformed or a buffer is outside RAM; `descriptors` then holds what the walk collected and the
    views are incomplete."""

    head: int
    descriptors: list[Descriptor]
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    error: str | None = None


@dataclass
class ChainBuffers:
    readable: list[memoryview]
    writable: list[memoryview]

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


def map_chain(chain: DescriptorChain) -> ChainBuffers:
    """Views of every buffer of `chain`, device-readable ones first; raises ChainError."""
    if chain.error is not None:
        raise ChainError(chain.error)
    return ChainBuffers(chain.readable, chain.writable)


def status_byte(memory: GuestMemory, chain: DescriptorChain) -> memoryview | None:
    """The last byte of the chain's last descriptor if it is writable and in RAM (where a request's
    status goes), even when other parts of the chain are broken."""
    if not chain.descriptors:
        return None
    addr, length, writable = chain.descriptors[-1]
    if not writable or length == 0:
        return None
    try:
        return memory.view(addr + length - 1, 1)
    except GuestMemoryError:
        return None


def split_views(views: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """The first `n` bytes of a buffer list and the rest (no copies)."""
    head: list[memoryview] = []
    tail: list[memoryview] = []
    for v in views:
        if n >= len(v):
            head.append(v)
            n -= len(v)
        elif n > 0:
            head.append(v[:n])
            tail.append(v[n:])
            n = 0
        else:
            tail.append(v)
    return head, tail


def gather(views: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


def scatter(views: list[memoryview], data: bytes) -> int:
    """Copy `data` into the buffer list; returns the bytes written."""
    pos = 0
    for v in views:
        if pos >= len(data):
            break
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos : pos + n]
        pos += n
    return pos


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from old to new crosses the other side's event index (vring_need_event)."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


class Virtqueue:
    """One split virtqueue. Its configuration fields are written by the transport; the ring methods run
    on the device's worker thread."""

    def __init__(self, index: int, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.msix_vector = 0xFFFF
        self.event_idx = False
        self.indirect = False
        self._memory: GuestMemory | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None  # u16: flags, idx, ring[size], used_event
        self._used16: memoryview | None = None  # u16: flags, idx, ..., avail_event
        self._used32: memoryview | None = None  # u32: flags|idx, then (id, len) pairs
        self.last_avail = 0
        self.used_idx = 0
        self._signalled_used: int | None = None

    @property
    def ready(self) -> bool:
        return self._desc is not None

    def set_size(self, size: int) -> bool:
        """The driver chose a size (before enabling): powers of two up to the maximum only."""
        if self.enabled or not 1 <= size <= self.max_size or size & (size - 1):
            return False
        self.size = size
        return True

    def activate(self, memory: GuestMemory, event_idx: bool, indirect: bool) -> None:
        """Map the rings (queue_enable); raises QueueError when they are misaligned or not in RAM."""
        n = self.size
        for name, addr, align in (
            ("descriptor table", self.desc_addr, 16),
            ("available ring", self.avail_addr, 2),
            ("used ring", self.used_addr, 4),
        ):
            if addr % align:
                raise QueueError(f"queue {self.index}: {name} at {addr:#x} is not {align}-byte aligned")
        try:
            self._desc = memory.view(self.desc_addr, DESC_SIZE * n)
            self._avail = memory.view(self.avail_addr, 6 + 2 * n).cast("H")
            self._used16 = memory.view(self.used_addr, 6 + 8 * n).cast("H")
            self._used32 = memory.view(self.used_addr, 4 + 8 * n).cast("I")
        except GuestMemoryError as exc:
            self._desc = self._avail = self._used16 = self._used32 = None
            raise QueueError(f"queue {self.index}: {exc}") from None
        self._memory = memory
        self.event_idx = event_idx
        self.indirect = indirect
        self.enabled = True
        # The device starts from the indices the driver initialised (zero after reset).
        self.last_avail = 0
        self.used_idx = 0
        self._signalled_used = None

    # ---- available ring -----------------------------------------------------------------------------

    def pending(self) -> int:
        """How many heads the driver made available and the device has not taken yet."""
        assert self._avail is not None
        count = (self._avail[1] - self.last_avail) & 0xFFFF
        if count > self.size:
            raise QueueError(f"queue {self.index}: available index moved {count} entries ahead of a "
                             f"{self.size}-entry ring")
        return count

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises QueueError when the ring is corrupt."""
        avail = self._avail
        if avail is None:
            return None
        last = self.last_avail
        size = self.size
        count = (avail[1] - last) & 0xFFFF
        if not count:
            return None
        if count > size:
            raise QueueError(f"queue {self.index}: available index moved {count} entries ahead of a "
                             f"{size}-entry ring")
        head = avail[2 + (last & (size - 1))]  # sizes are powers of two
        if head >= size:
            raise QueueError(f"queue {self.index}: head {head} is outside the {size}-entry table")
        self.last_avail = (last + 1) & 0xFFFF
        return self._walk(head)

    def _linear_table(self, head: int, table: memoryview, n: int) -> DescriptorChain | None:
        """The chain of an indirect table laid out as drivers lay them out, decoded and mapped in bulk
        (a descriptor at a time, a 1 MiB read of 4 KiB pages cost the lab's worker thread about 3 ms).
        None for anything else, which the general walk then takes, with its error messages."""
        memory = self._memory
        assert memory is not None
        u16 = table.cast("H")
        if u16[7::8].tolist()[: n - 1] != _LINEAR_NEXT[: n - 1]:
            return None
        flags = u16[6::8].tolist()
        last = flags.pop()
        readable = flags.count(_F_NEXT)
        if flags != _READABLE_NEXT[:readable] + _WRITABLE_NEXT[: n - 1 - readable]:
            return None
        if last == 0 and readable == n - 1:  # all device-readable
            readable = n
        elif last != _F_WRITE:
            return None
        addrs = table.cast("Q")[0::2].tolist()
        lengths = table.cast("I")[2::4].tolist()
        try:
            views = memory.views(addrs, lengths)
        except GuestMemoryError:
            return None
        writable = _DEVICE_READABLE[:readable] + _DEVICE_WRITABLE[: n - readable]
        descriptors = list(zip(addrs, lengths, writable, strict=True))
        return DescriptorChain(head, descriptors, views[:readable], views[readable:])

    def _walk(self, head: int, bulk: bool = True) -> DescriptorChain:
        """The chain at `head`, a descriptor at a time, except a long indirect table when `bulk`."""
        assert self._desc is not None and self._memory is not None
        descriptors: list[Descriptor] = []
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        chain = DescriptorChain(head, descriptors, readable, writable)
        unpack = _DESC.unpack_from
        view_of = self._memory.view
        mapping_error: str | None = None  # the walk goes on, so the status descriptor is still found
        table = self._desc
        entries = self.size
        index = head
        budget = self.size  # a chain never has more descriptors than its table: more means a loop
        indirect_seen = False
        while True:
            if index >= entries:
                chain.error = f"chain {head}: next index {index} is outside its {entries}-entry table"
                return chain
            if budget == 0:
                chain.error = f"chain {head}: longer than the queue size {self.size} (a loop?)"
                return chain
            budget -= 1
            addr, length, flags, nxt = unpack(table, DESC_SIZE * index)
            if flags & _F_INDIRECT:
                problem = None
                if not self.indirect:
                    problem = "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
                elif indirect_seen:
                    problem = "indirect descriptor inside an indirect table"
                elif flags & _F_NEXT:
                    problem = "indirect descriptor with NEXT set"
                elif length == 0 or length % DESC_SIZE:
                    problem = f"indirect table of {length} bytes is not a multiple of {DESC_SIZE}"
                elif len(descriptors) + length // DESC_SIZE > self.size:
                    # The whole chain, direct part and table, is at most the queue size (§2.7.5.3.1).
                    problem = (f"indirect table of {length // DESC_SIZE} entries after {len(descriptors)} "
                               f"descriptors is longer than the queue size {self.size}")
                if problem is None:
                    try:
                        table = self._memory.view(addr, length)
                    except GuestMemoryError as exc:
                        problem = f"indirect table: {exc}"
                if problem is not None:
                    chain.error = f"chain {head}: {problem}"
                    return chain
                indirect_seen = True
                entries = length // DESC_SIZE
                if bulk and not descriptors and _LINEAR_MIN <= entries <= _LINEAR_MAX:
                    linear = self._linear_table(head, table, entries)
                    if linear is not None:
                        return linear
                budget = entries
                index = 0
                continue
            descriptors.append((addr, length, flags & _F_WRITE != 0))
            if mapping_error is None:
                try:
                    view = view_of(addr, length)
                except GuestMemoryError as exc:
                    mapping_error = f"descriptor {len(descriptors) - 1} of chain {head}: {exc}"
                else:
                    if flags & _F_WRITE:
                        writable.append(view)
                    elif writable:
                        mapping_error = f"chain {head}: device-readable descriptor after a writable one"
                    else:
                        readable.append(view)
            if not flags & _F_NEXT:
                chain.error = mapping_error
                return chain
            index = nxt

    # ---- used ring ----------------------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes stored in its writable buffers."""
        assert self._used16 is not None and self._used32 is not None
        slot = self.used_idx % self.size
        self._used32[1 + 2 * slot] = head
        self._used32[2 + 2 * slot] = written & 0xFFFF_FFFF
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # TSO keeps this store after the element stores above; the u16 item store is a single write.
        self._used16[1] = self.used_idx

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call."""
        assert self._avail is not None
        if self._signalled_used == self.used_idx:
            return False
        full_barrier()  # used idx store before the used_event / flags load
        old = self._signalled_used
        self._signalled_used = self.used_idx
        if self.event_idx:
            if old is None:
                return True
            return need_event(self._avail[2 + self.size], self.used_idx, old)
        return not self._avail[0] & AVAIL_F_NO_INTERRUPT

    # ---- driver notifications -----------------------------------------------------------------------

    def disable_notifications(self) -> None:
        """While the device is draining the ring, ask the driver not to notify."""
        if self._used16 is not None and not self.event_idx:
            self._used16[0] = USED_F_NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Ask for a notification on the next new buffer; True when buffers arrived meanwhile."""
        if self._used16 is None or self._avail is None:
            return False
        if self.event_idx:
            self._used16[2 + 4 * self.size] = self.last_avail
        else:
            self._used16[0] = 0
        full_barrier()  # avail_event / flags store before re-reading avail idx
        return self._avail[1] != self.last_avail
