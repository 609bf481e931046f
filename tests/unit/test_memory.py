"""Guest RAM mappings: huge-page placement and bounds-checked access."""

from __future__ import annotations

import ctypes

import pytest

from pyvmm.memory import HUGE_PAGE_SIZE, GuestMemory, GuestMemoryError


def test_regions_start_on_huge_page_boundaries_and_views_agree_with_host_addresses() -> None:
    memory = GuestMemory([(0, 0xA0000), (0x100000, 8 << 20), (0x1_0000_0000, 4 << 20)])
    try:
        high = memory.regions[2]
        assert high.host_address % HUGE_PAGE_SIZE == 0
        for gpa in (0x9F000, 0x100000 + (8 << 20) - 8, 0x1_0000_0000, 0x1_0000_0000 + (4 << 20) - 8):
            memory.write_u64(gpa, 0x1122334455667788 ^ gpa)
            raw = ctypes.c_uint64.from_address(memory.host_address(gpa, 8)).value
            assert raw == memory.read_u64(gpa) == 0x1122334455667788 ^ gpa
        with pytest.raises(GuestMemoryError):
            memory.read(0x1_0000_0000 + (4 << 20) - 4, 8)
    finally:
        memory.close()


def test_low_ram_from_zero_is_huge_page_aligned() -> None:
    memory = GuestMemory([(0, 64 << 20)])
    try:
        assert memory.regions[0].host_address % HUGE_PAGE_SIZE == 0
        memory.write((64 << 20) - 1, b"\xff")
        assert memory.read((64 << 20) - 1, 1) == b"\xff"
    finally:
        memory.close()


def test_views_of_many_ranges_match_view_and_are_all_checked() -> None:
    memory = GuestMemory([(0, 8 << 20), (0x1_0000_0000, 4 << 20)])
    try:
        ranges = [(0x1000, 16), (0x7F_F000, 0x1000), (0x2000, 0)]
        for gpas, lengths in (
            ([g for g, _ in ranges], [n for _, n in ranges]),  # one region: checked as a whole
            ([0x1000, 0x1_0000_0000], [8, 8]),  # two regions: one at a time
        ):
            got = memory.views(gpas, lengths)
            for view, gpa, length in zip(got, gpas, lengths, strict=True):
                assert len(view) == length
                if length:
                    view[0] = 0x5A
                    assert memory.read(gpa, 1) == b"\x5a"
        assert memory.views([], []) == []
        for gpas, lengths in (
            ([0x1000, (8 << 20) - 8], [8, 16]),  # the second runs off the region's end
            ([0x1000, 0x1_0000_0000 + (4 << 20)], [8, 1]),
            ([0x1000], [-1]),
        ):
            with pytest.raises(GuestMemoryError):
                memory.views(gpas, lengths)
    finally:
        memory.close()
