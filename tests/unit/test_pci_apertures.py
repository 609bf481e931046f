"""Aperture split among PCI segments: every worked example of docs/pci.md#aperture-weights."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm import layout
from pyvmm.pci.apertures import (
    MMIO32_ALIGN,
    MMIO64_ALIGN,
    Window,
    mmio32_aperture,
    mmio64_aperture,
    segment_windows,
    split_aperture,
)

MiB = 1 << 20


def _mmio32(weights: list[int]) -> list[tuple[int, int]]:
    return [(w.start, w.end) for w in split_aperture(mmio32_aperture(), weights, MMIO32_ALIGN)]


def test_32bit_area_bounds() -> None:
    area = mmio32_aperture()
    assert (area.start, area.end, area.size) == (0xC000_0000, 0xE7FF_FFFF, 640 * MiB)


def test_one_segment_gets_everything() -> None:
    assert _mmio32([1]) == [(0xC000_0000, 0xE7FF_FFFF)]


def test_two_segments_equal_weights() -> None:
    assert _mmio32([1, 1]) == [(0xC000_0000, 0xD3FF_FFFF), (0xD400_0000, 0xE7FF_FFFF)]


def test_two_segments_weights_2_to_1() -> None:
    windows = split_aperture(mmio32_aperture(), [2, 1], MMIO32_ALIGN)
    assert [(w.start, w.end) for w in windows] == [
        (0xC000_0000, 0xDAAA_9FFF),
        (0xDAAA_A000, 0xE7FF_FFFF),
    ]
    assert [w.size for w in windows] == [0x1AAA_A000, 0xD55_6000]


def test_96_segments() -> None:
    windows = _mmio32([1] * 96)
    unit = 0x6A_A000
    assert windows[0] == (0xC000_0000, 0xC06A_9FFF)
    for s in range(95):
        assert windows[s] == (0xC000_0000 + s * unit, 0xC000_0000 + (s + 1) * unit - 1)
    assert windows[95] == (0xE791_6000, 0xE7FF_FFFF)
    assert windows[95][1] - windows[95][0] + 1 == 0x6E_A000


def test_64bit_example_pb46_two_segments() -> None:
    area = mmio64_aperture(2 * layout.GiB, 46)
    assert (area.start, area.end) == (0x1_0000_0000, 0x3FFF_FFEE_FFFF)
    windows = segment_windows([1, 1], [1, 1], area)
    assert (windows[0].mmio64.start, windows[0].mmio64.end) == (0x1_0000_0000, 0x1FFF_FFFF_FFFF)
    assert (windows[1].mmio64.start, windows[1].mmio64.end) == (0x2000_0000_0000, 0x3FFF_FFEE_FFFF)
    assert windows[1].mmio32 == Window(0xD400_0000, 0xE7FF_FFFF)
    assert [w.segment for w in windows] == [0, 1]


def test_64bit_area_starts_after_high_ram() -> None:
    area = mmio64_aperture(8 * layout.GiB, 46)
    assert area.start == layout.HIGH_RAM_BASE + 8 * layout.GiB - layout.LOW_RAM_END


@pytest.mark.parametrize(
    ("weights", "message"),
    [([], "at least one"), ([1, 0], "weight: 0"), ([2, -1], "weight: -1")],
)
def test_bad_weights(weights: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_aperture(mmio32_aperture(), weights, MMIO32_ALIGN)


def test_area_too_small_to_split() -> None:
    with pytest.raises(ValueError, match="too small"):
        split_aperture(Window(0x1_0000_0000, 0x1_FFFF_FFFF), [1, 1], MMIO64_ALIGN)


def test_weight_lists_must_match() -> None:
    with pytest.raises(ValueError, match="weights"):
        segment_windows([1, 1], [1], mmio64_aperture(layout.GiB))


@given(
    start_units=st.integers(0, 1 << 20),
    length=st.integers(1 << 24, 1 << 36),
    weights=st.lists(st.integers(1, 8), min_size=1, max_size=96),
)
def test_split_properties(start_units: int, length: int, weights: list[int]) -> None:
    area = Window(start_units * 0x1000, start_units * 0x1000 + length - 1)
    if area.size // (MMIO32_ALIGN * sum(weights)) == 0 and len(weights) > 1:
        with pytest.raises(ValueError):
            split_aperture(area, weights, MMIO32_ALIGN)
        return
    windows = split_aperture(area, weights, MMIO32_ALIGN)
    assert windows[0].start == area.start
    assert windows[-1].end == area.end
    for a, b in itertools.pairwise(windows):
        assert a.end + 1 == b.start
    if len(weights) == 1:
        assert windows == [area]
        return
    assert windows[0].size % weights[0] == 0
    unit = windows[0].size // weights[0]
    assert unit % MMIO32_ALIGN == 0
    for w, weight in zip(windows[:-1], weights[:-1], strict=True):
        assert w.size == unit * weight
    # The last segment absorbs a remainder smaller than one more aligned unit per weight.
    assert unit * weights[-1] <= windows[-1].size < unit * weights[-1] + MMIO32_ALIGN * sum(weights)
