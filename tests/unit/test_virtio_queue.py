"""Split virtqueue: chain walking (direct, indirect, hostile), used ring, notification suppression."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_virtio_driver import F_INDIRECT, F_NEXT, F_WRITE, MiB, Ring

from pyvmm.devices.virtio.queue import (
    ChainError,
    QueueError,
    Virtqueue,
    map_chain,
    need_event,
    split_views,
    status_byte,
)
from pyvmm.memory import GuestMemory

RAM = 4 * MiB


def setup(
    size: int = 8, event_idx: bool = False, indirect: bool = True
) -> tuple[GuestMemory, Ring, Virtqueue]:
    memory = GuestMemory([(0, RAM)])
    ring = Ring.at(memory, 0x10000, size)
    q = Virtqueue(0, size)
    q.desc_addr, q.avail_addr, q.used_addr = ring.desc, ring.avail, ring.used
    q.activate(memory, event_idx=event_idx, indirect=indirect)
    return memory, ring, q


def test_direct_chain_maps_views_in_place() -> None:
    memory, ring, q = setup()
    memory.write(0x100000, b"request!")
    head = ring.add([(0x100000, 8, False), (0x101000, 4, True)])
    ring.publish(head)
    chain = q.pop()
    assert chain is not None and chain.head == head and chain.error is None
    bufs = map_chain(chain)
    assert bytes(bufs.readable[0]) == b"request!"
    bufs.writable[0][:] = b"done"  # a view, not a copy: the guest sees it
    assert memory.read(0x101000, 4) == b"done"
    assert q.pop() is None
    q.push(head, 4)
    assert ring.take_used() == [(head, 4)]


def test_indirect_chain() -> None:
    _memory, ring, q = setup()
    head = ring.add_indirect(0x20000, [(0x100000, 16, False), (0x102000, 512, True), (0x103000, 1, True)])
    ring.publish(head)
    chain = q.pop()
    assert chain is not None and chain.error is None
    assert chain.descriptors == [
        (0x100000, 16, False), (0x102000, 512, True), (0x103000, 1, True)]


def test_indirect_refused_without_feature() -> None:
    _memory, ring, q = setup(indirect=False)
    ring.publish(ring.add_indirect(0x20000, [(0x100000, 16, False)]))
    chain = q.pop()
    assert chain is not None and chain.error is not None and "INDIRECT" in chain.error


def test_descriptor_loop_is_cut() -> None:
    _memory, ring, q = setup(size=8)
    ring.write_desc(0, 0x100000, 16, F_NEXT, 1)
    ring.write_desc(1, 0x101000, 16, F_NEXT, 0)  # back to 0
    ring.publish(0)
    chain = q.pop()
    assert chain is not None and chain.error is not None and "loop" in chain.error
    assert len(chain.descriptors) <= 8


def test_indirect_loop_and_nesting_are_cut() -> None:
    memory, ring, q = setup(size=8)
    table = 0x20000
    ring.write_desc(0, 0x100000, 16, F_NEXT, 1, table=table)
    ring.write_desc(1, 0x100000, 16, F_NEXT, 0, table=table)
    ring.write_desc(0, table, 32, F_INDIRECT)
    ring.write_desc(1, table, 32, F_NEXT | F_INDIRECT, 2)
    ring.publish(0, 1)
    looped = q.pop()
    assert looped is not None and looped.error is not None
    both = q.pop()
    assert both is not None and both.error is not None and "NEXT" in both.error
    # An indirect descriptor inside an indirect table.
    ring.write_desc(0, table, 16, F_INDIRECT, table=table + 0x100)
    ring.write_desc(2, table + 0x100, 16, F_INDIRECT)
    ring.publish(2)
    nested = q.pop()
    assert nested is not None and nested.error is not None and "inside" in nested.error
    assert memory.read_u16(ring.used + 2) == 0


@pytest.mark.parametrize(
    ("addr", "length", "flags", "nxt", "words"),
    [
        (0x100000, 16, F_NEXT, 200, "outside"),  # next index out of the table
        (0x20000, 24, F_INDIRECT, 0, "multiple"),  # indirect length not a multiple of 16
        (0x20000, 0, F_INDIRECT, 0, "multiple"),
        (0x20000, 16 * 9, F_INDIRECT, 0, "longer"),  # more entries than the queue
        (RAM - 16, 32, F_INDIRECT, 0, "not in guest RAM"),
        (1 << 40, 16, F_INDIRECT, 0, "not in guest RAM"),
    ],
)
def test_malformed_chains(addr: int, length: int, flags: int, nxt: int, words: str) -> None:
    _memory, ring, q = setup(size=8)
    ring.write_desc(0, addr, length, flags, nxt)
    ring.publish(0)
    chain = q.pop()
    assert chain is not None and chain.error is not None and words in chain.error


def test_out_of_ram_buffers_fail_mapping_but_status_is_found() -> None:
    memory, ring, q = setup()
    head = ring.add([(0x100000, 16, False), (RAM - 8, 0xFFFF_FFFF, True), (0x103000, 1, True)])
    ring.publish(head)
    chain = q.pop()
    assert chain is not None and chain.error is not None and "not in guest RAM" in chain.error
    assert len(chain.descriptors) == 3  # the walk went on past the bad buffer
    with pytest.raises(ChainError, match="not in guest RAM"):
        map_chain(chain)
    status = status_byte(memory, chain)
    assert status is not None
    status[0] = 1
    assert memory.read(0x103000, 1) == b"\x01"


def test_readable_after_writable_is_refused() -> None:
    memory, ring, q = setup()
    ring.publish(ring.add([(0x100000, 16, True), (0x101000, 16, False)]))
    chain = q.pop()
    assert chain is not None
    with pytest.raises(ChainError, match="after a writable"):
        map_chain(chain)
    assert status_byte(memory, chain) is None  # last descriptor is not writable


def test_bad_head_and_runaway_avail_index_break_the_queue() -> None:
    memory, ring, q = setup(size=8)
    memory.write_u16(ring.avail + 4, 9)
    memory.write_u16(ring.avail + 2, 1)
    with pytest.raises(QueueError, match="head 9"):
        q.pop()
    _memory, ring, q = setup(size=8)
    ring.memory.write_u16(ring.avail + 2, 9)  # 9 new entries in an 8-entry ring
    with pytest.raises(QueueError, match="ahead"):
        q.pop()


def test_activate_checks_ring_addresses() -> None:
    memory = GuestMemory([(0, RAM)])
    q = Virtqueue(0, 8)
    q.desc_addr, q.avail_addr, q.used_addr = 0x1008, 0x2000, 0x3000
    with pytest.raises(QueueError, match="aligned"):
        q.activate(memory, False, False)
    q.desc_addr, q.used_addr = 0x1000, RAM - 8
    with pytest.raises(QueueError, match="not in guest RAM"):
        q.activate(memory, False, False)
    assert not q.ready


def test_set_size_accepts_powers_of_two_up_to_max() -> None:
    q = Virtqueue(0, 128)
    assert not q.set_size(0) and not q.set_size(96) and not q.set_size(256)
    assert q.set_size(64) and q.size == 64


def test_used_ring_wraps_and_avail_index_wraps_at_16_bits() -> None:
    _memory, ring, q = setup(size=4)
    ring.avail_idx = q.last_avail = 0xFFFE
    ring.memory.write_u16(ring.avail + 2, 0xFFFE)
    q.used_idx = ring.last_used = 0xFFFE
    for i in range(6):
        head = ring.add([(0x100000 + i * 0x100, 1, True)])
        ring.publish(head)
        chain = q.pop()
        assert chain is not None and chain.head == head
        q.push(chain.head, i)
        assert ring.take_used() == [(head, i)]
    assert q.used_idx == 4 and q.last_avail == 4


def test_flags_notification_suppression() -> None:
    _memory, ring, q = setup(event_idx=False)
    q.disable_notifications()
    assert ring.used_flags == 1
    assert q.enable_notifications() is False
    assert ring.used_flags == 0
    ring.publish(ring.add([(0x100000, 1, True)]))
    assert q.enable_notifications() is True  # work arrived: the device must look again
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 1)
    ring.set_avail_flags(1)  # driver: no interrupts please
    assert q.needs_interrupt() is False
    ring.set_avail_flags(0)
    assert q.needs_interrupt() is False  # nothing new pushed since the last decision


def test_event_idx_suppression() -> None:
    _memory, ring, q = setup(event_idx=True)
    assert q.enable_notifications() is False
    assert ring.avail_event == 0
    heads = [ring.add([(0x100000 + i * 16, 1, True)]) for i in range(3)]
    ring.publish(*heads)
    for _ in range(3):
        chain = q.pop()
        assert chain is not None
        q.push(chain.head, 1)
    q.enable_notifications()
    assert ring.avail_event == 3  # the driver notifies again once it adds entry 3
    ring.set_used_event(5)  # driver: interrupt me when used idx passes 5
    assert q.needs_interrupt() is True  # the first decision after activation always signals
    heads = [ring.add([(0x100000, 1, True)]) for _ in range(2)]
    ring.publish(*heads)
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 1)  # used idx 4
    assert q.needs_interrupt() is False
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 1)  # used idx 5
    assert q.needs_interrupt() is False
    ring.set_used_event(5)
    heads = [ring.add([(0x100000, 1, True)])]
    ring.publish(*heads)
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 1)  # used idx 6 crosses used_event 5
    assert q.needs_interrupt() is True


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(1, 0x8000))
@settings(max_examples=300)
def test_need_event_matches_definition(event: int, old: int, step: int) -> None:
    new = (old + step) & 0xFFFF
    crossed = any((old + k) & 0xFFFF == event for k in range(step))
    assert need_event(event, new, old) == crossed


@given(st.lists(st.integers(0, 40), max_size=6), st.integers(0, 120))
def test_split_views(lengths: list[int], n: int) -> None:
    data = bytes(range(256)) * 2
    views, pos = [], 0
    for length in lengths:
        views.append(memoryview(data)[pos : pos + length])
        pos += length
    head, tail = split_views(views, n)
    joined = b"".join(bytes(v) for v in views)
    assert b"".join(bytes(v) for v in head) == joined[:n]
    assert b"".join(bytes(v) for v in tail) == joined[n:]


@given(st.binary(min_size=16 * 8, max_size=16 * 8), st.integers(0, 7))
@settings(max_examples=200)
def test_random_descriptor_tables_never_escape(table: bytes, head: int) -> None:
    """Whatever the descriptor table holds, walking ends with descriptors or an error, never an exception."""
    memory, ring, q = setup(size=8)
    memory.write(ring.desc, table)
    memory.write(0x20000, table)  # also what an indirect descriptor could point at
    ring.publish(head)
    chain = q.pop()
    assert chain is not None
    assert len(chain.descriptors) <= 8 or chain.error is not None
    with contextlib.suppress(ChainError):
        map_chain(chain)


def _positions(memory: GuestMemory, views: list[memoryview]) -> list[tuple[int, int]]:
    """Where each view lies in guest RAM, as (host address, length): views can only be compared so."""
    import ctypes

    return [(ctypes.addressof(ctypes.c_char.from_buffer(v)) if len(v) else 0, len(v)) for v in views]


def test_a_linux_style_request_of_scattered_pages_is_one_chain() -> None:
    """Header, 256 scattered 4 KiB pages, status: what a 1 MiB read looks like when the guest's buffer is
    not contiguous. The bulk decode gives what the one-at-a-time walk gives."""
    memory, ring, q = setup(size=512)
    pages = [(0x200000 + ((i * 37) % 256) * 4096, 4096, True) for i in range(256)]
    buffers = [(0x100000, 16, False), *pages, (0x100010, 1, True)]
    ring.publish(ring.add_indirect(0x40000, buffers))
    chain = q.pop()
    assert chain is not None and chain.error is None
    assert chain.descriptors == buffers
    assert [len(v) for v in chain.readable] == [16]
    assert len(chain.writable) == 257
    general = q._walk(chain.head, bulk=False)
    assert _positions(memory, chain.readable) == _positions(memory, general.readable)
    assert _positions(memory, chain.writable) == _positions(memory, general.writable)
    chain.writable[5][:4] = b"page"
    assert memory.read(pages[5][0], 4) == b"page"


_HEADER = (0x100000, 16, F_NEXT, 1)
_DATA = (0x101000, 512, F_NEXT | F_WRITE, 2)
_STATUS = (0x103000, 1, F_WRITE, 3)


@pytest.mark.parametrize(
    ("entries", "valid"),
    [
        # entry 0 links to 2, 2 to 1: a valid chain, not in table order
        ([(*_HEADER[:3], 2), _STATUS, (*_DATA[:3], 1)], True),
        ([_HEADER, (0x101000, 512, F_NEXT, 2), (0x103000, 1, 0, 3)], True),  # all device-readable
        ([(0x100000, 16, F_NEXT | F_WRITE, 1), (0x101000, 512, F_NEXT, 2), _STATUS], False),  # R after W
        ([_HEADER, (RAM - 8, 512, F_NEXT | F_WRITE, 2), _STATUS], False),  # a buffer beyond RAM
        ([_HEADER, (0x30000, 16, F_INDIRECT, 2), _STATUS], False),  # an indirect table inside one
        ([_HEADER, (0x101000, 512, F_WRITE, 2), _STATUS], True),  # ends before the table's end
    ],
)
def test_irregular_indirect_tables_take_the_general_walk(
    entries: list[tuple[int, int, int, int]], valid: bool
) -> None:
    _memory, ring, q = setup(size=8)
    table = 0x20000
    for i, (addr, length, flags, nxt) in enumerate(entries):
        ring.write_desc(i, addr, length, flags, nxt, table=table)
    ring.write_desc(0, table, 16 * len(entries), F_INDIRECT)
    ring.publish(0)
    chain = q.pop()
    assert chain is not None and (chain.error is None) == valid
    bulk = q._linear_table(0, ring.memory.view(table, 48), 3)  # what a longer table of each kind would get
    linear = entries[1][2] == F_NEXT and entries[2][2] == 0  # all device-readable: that one is linear
    assert (bulk is not None) == linear
    if bulk is not None:
        assert bulk.descriptors == chain.descriptors and bulk.error is None
        assert _positions(ring.memory, bulk.readable) == _positions(ring.memory, chain.readable)


_buffer = st.tuples(
    st.integers(0, 511).map(lambda i: 0x100000 + 0x1000 * i),  # a page of guest RAM
    st.sampled_from([4096, 4096, 4096, 0, 1, 16, 8192]),
    st.booleans(),  # device-writable
)
# At most one field of one entry set to something else: the flags (NEXT, WRITE, INDIRECT, mixes), the
# link, or an address or a length that leaves RAM.
_mutation = st.none() | st.tuples(
    st.integers(0, 40),
    st.sampled_from(["flags", "next", "addr", "length"]),
    st.integers(0, 40),
)
_BAD_ADDRESSES = (RAM - 8, RAM, 1 << 40, (1 << 64) - 4096)
_BAD_LENGTHS = (0xFFFF_FFFF, RAM, 0x8000_0000)


@given(buffers=st.lists(_buffer, min_size=10, max_size=40), ordered=st.booleans(), mutation=_mutation)
@settings(max_examples=400, deadline=None)
def test_bulk_decode_agrees_with_the_general_walk(
    buffers: list[tuple[int, int, bool]], ordered: bool, mutation: tuple[int, str, int] | None
) -> None:
    """Whatever an indirect table holds, pop() gives the chain the descriptor-at-a-time walk gives."""
    memory, ring, q = setup(size=64)
    table = 0x20000
    if ordered:  # device-readable first, as drivers lay requests out
        buffers = sorted(buffers, key=lambda b: b[2])
    entries = [[addr, length, (F_WRITE if w else 0) | (F_NEXT if i < len(buffers) - 1 else 0), i + 1]
               for i, (addr, length, w) in enumerate(buffers)]
    if mutation is not None:
        index, field, value = mutation
        entry = entries[index % len(entries)]
        if field == "flags":
            entry[2] = value % 8
        elif field == "next":
            entry[3] = value
        elif field == "addr":
            entry[0] = _BAD_ADDRESSES[value % len(_BAD_ADDRESSES)]
        else:
            entry[1] = _BAD_LENGTHS[value % len(_BAD_LENGTHS)]
    for i, (addr, length, flags, nxt) in enumerate(entries):
        ring.write_desc(i, addr, length, flags, nxt, table=table)
    ring.write_desc(0, table, 16 * len(entries), F_INDIRECT)
    ring.publish(0)
    chain = q.pop()
    general = q._walk(0, bulk=False)
    assert chain is not None
    assert chain.descriptors == general.descriptors
    assert chain.error == general.error
    if chain.error is None:
        assert _positions(memory, chain.readable) == _positions(memory, general.readable)
        assert _positions(memory, chain.writable) == _positions(memory, general.writable)


def test_a_chain_is_at_most_the_queue_size_with_its_indirect_table() -> None:
    """§2.7.5.3.1: direct descriptors before an indirect one count toward the queue size too."""
    _memory, ring, q = setup(size=8)
    for table, entries in ((0x20000, 8), (0x21000, 7)):
        for i in range(entries - 1):
            ring.write_desc(i, 0x100000, 16, F_NEXT, i + 1, table=table)
        ring.write_desc(entries - 1, 0x101000, 1, F_WRITE, 0, table=table)
    ring.write_desc(0, 0x100000, 16, F_NEXT, 1)
    ring.write_desc(1, 0x20000, 16 * 8, F_INDIRECT)  # 1 + 8 descriptors
    ring.write_desc(2, 0x100000, 16, F_NEXT, 3)
    ring.write_desc(3, 0x21000, 16 * 7, F_INDIRECT)  # 1 + 7
    ring.publish(0, 2)
    over = q.pop()
    assert over is not None and over.error is not None and "longer than the queue" in over.error
    at_limit = q.pop()
    assert at_limit is not None and at_limit.error is None and len(at_limit.descriptors) == 8
