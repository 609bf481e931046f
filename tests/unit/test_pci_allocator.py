"""AddressAllocator: top-down first-fit placement, exact placement, freeing, free-range queries."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.pci.allocator import (
    IO_BAR_ALIGN,
    AddressAllocator,
    AddressRange,
    AllocatorError,
    io_allocator,
)

MiB = 1 << 20


def test_first_allocation_goes_to_the_top_of_the_window() -> None:
    a = AddressAllocator(0xC000_0000, 0xE7FF_FFFF)
    assert a.allocate(16 * MiB, 16 * MiB) == 0xE700_0000
    assert a.allocate(16 * MiB, 16 * MiB) == 0xE600_0000
    assert a.allocate(0x1000, 0x1000) == 0xE5FF_F000


def test_unaligned_window_fits_thirteen_16mib_bars() -> None:
    # docs/pci.md#32-bit-exhaustion: segment 1 of a 2:1 split.
    a = AddressAllocator(0xDAAA_A000, 0xE7FF_FFFF)
    got = [a.allocate(16 * MiB, 16 * MiB) for _ in range(13)]
    assert got == [0xE700_0000 - i * 16 * MiB for i in range(13)]
    assert got[-1] == 0xDB00_0000
    assert a.allocate(16 * MiB, 16 * MiB) is None
    assert a.largest_free_aligned(16 * MiB) is None
    assert a.largest_free_aligned(0x1000) == AddressRange(0xDAAA_A000, 0xDB00_0000 - 0xDAAA_A000)


def test_freed_hole_is_reused_and_upper_gaps_are_preferred() -> None:
    a = AddressAllocator(0, 0xFFFF)
    addrs = [a.allocate(0x4000, 0x4000) for _ in range(4)]
    assert addrs == [0xC000, 0x8000, 0x4000, 0x0]
    assert a.allocate(0x10) is None
    assert a.free(0x8000) == 0x4000
    assert a.free(0x4000) == 0x4000
    # Two free pages [0x4000, 0xC000): the request lands at the top of that gap.
    assert a.allocate(0x4000, 0x4000) == 0x8000
    assert a.allocate(0x4000, 0x4000) == 0x4000


def test_gap_too_small_after_alignment_is_skipped() -> None:
    a = AddressAllocator(0, 0xFFFF)
    assert a.allocate_at(0xF000, 0x1000)
    assert a.allocate_at(0x7000, 0x7000)  # leaves [0xE000, 0xF000) and [0, 0x7000)
    assert a.allocate(0x1000, 0x1000) == 0xE000
    assert a.allocate(0x2000, 0x2000) == 0x4000


def test_allocate_at() -> None:
    a = AddressAllocator(0x1000, 0x1FFF)
    assert a.allocate_at(0x1000, 0x100)  # the window base itself is usable
    assert not a.allocate_at(0x10F0, 0x100)  # overlaps the previous one
    assert a.allocate_at(0x1100, 0x100)  # adjacent
    assert not a.allocate_at(0x1F80, 0x100)  # runs past the end
    assert not a.allocate_at(0x0F00, 0x100)  # starts before the window
    assert not a.allocate_at(0x1210, 0x100, align=0x100)  # misaligned
    assert a.allocate_at(0x1300, 0x100, align=0x100)
    assert not a.allocate_at(0x1280, 0x100)  # overlaps the next one
    assert a.allocations() == [
        AddressRange(0x1000, 0x100),
        AddressRange(0x1100, 0x100),
        AddressRange(0x1300, 0x100),
    ]


def test_io_allocator_places_bars_near_the_top_of_port_space() -> None:
    io = io_allocator()
    assert (io.start, io.end) == (0, 0xFFFF)
    assert io.allocate(0x20, IO_BAR_ALIGN) == 0xFFE0
    assert io.allocate(0x8, IO_BAR_ALIGN) == 0xFFD8
    assert io.allocate(0x100, IO_BAR_ALIGN) == 0xFED8


def test_bad_requests_raise() -> None:
    a = AddressAllocator(0, 0xFFF)
    with pytest.raises(AllocatorError, match="power of two"):
        a.allocate(0x10, 3)
    with pytest.raises(AllocatorError, match="size"):
        a.allocate(0, 1)
    with pytest.raises(AllocatorError, match="no allocation"):
        a.free(0x10)
    with pytest.raises(AllocatorError):
        AddressAllocator(0x10, 0x0F)


def test_free_ranges_and_largest_free_aligned() -> None:
    a = AddressAllocator(0, 0xFFFF)
    a.allocate_at(0x1000, 0x1000)
    a.allocate_at(0x9000, 0x100)
    assert a.free_ranges() == [
        AddressRange(0, 0x1000),
        AddressRange(0x2000, 0x7000),
        AddressRange(0x9100, 0x6F00),
    ]
    assert a.largest_free_aligned(0x1000) == AddressRange(0x2000, 0x7000)
    assert a.largest_free_aligned(0x4000) == AddressRange(0x4000, 0x5000)
    assert a.largest_free_aligned(0x10000) == AddressRange(0, 0x1000)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, 0x3000), st.integers(0, 13)),
        st.tuples(st.just("at"), st.integers(0, 0x10000), st.integers(1, 0x3000)),
        st.tuples(st.just("free"), st.integers(0, 50), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(start=st.integers(0, 0x10000), length=st.integers(1, 0x10000), operations=ops)
def test_allocator_invariants(start: int, length: int, operations: list[tuple[str, int, int]]) -> None:
    a = AddressAllocator(start, start + length - 1)
    for op, x, y in operations:
        if op == "alloc":
            size, align = x, 1 << y
            gaps = a.free_ranges()
            got = a.allocate(size, align)
            feasible = [c for g in gaps if (c := ((g.start + g.size - size) // align) * align) >= g.start]
            if got is None:
                assert not feasible
            else:
                assert got == max(feasible)  # top-down: the highest feasible placement
                assert got % align == 0
        elif op == "at":
            addr = start + x
            expected = any(
                g.start <= addr and addr + y <= g.start + g.size for g in _gaps_of(a, a.allocations())
            )
            assert a.allocate_at(addr, y) == expected
        else:
            allocs = a.allocations()
            if allocs:
                victim = allocs[x % len(allocs)]
                assert a.free(victim.start) == victim.size
        allocs = a.allocations()
        for r in allocs:
            assert a.contains(r.start, r.size)
        for r1, r2 in itertools.pairwise(allocs):
            assert r1.start + r1.size <= r2.start
        covered = sum(r.size for r in allocs) + sum(g.size for g in a.free_ranges())
        assert covered == a.size


def _gaps_of(a: AddressAllocator, allocs: list[AddressRange]) -> list[AddressRange]:
    """Free gaps of `a`'s window given an explicit allocation list (independent of `a`'s state)."""
    gaps = []
    cursor = a.start
    for r in allocs:
        if r.start > cursor:
            gaps.append(AddressRange(cursor, r.start - cursor))
        cursor = r.start + r.size
    if cursor <= a.end:
        gaps.append(AddressRange(cursor, a.end + 1 - cursor))
    return gaps
