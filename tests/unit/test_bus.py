from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.devices.bus import BusError, IoBus


class Recorder:
    """A device answering reads with offset + size * 0x10 and recording every access."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int | None]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, None))
        return offset + size * 0x10

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


class Wide:
    def read(self, offset: int, size: int) -> int:
        return 0x1122_3344_5566_7788_99

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def test_dispatch_passes_offset_from_base() -> None:
    bus = IoBus("pio", 1 << 16)
    dev = Recorder()
    bus.insert(0x3F8, 8, dev)
    assert bus.read(0x3FD, 1) == 5 + 0x10
    bus.write(0x3F8, 1, 0x41)
    assert dev.log == [("r", 5, 1, None), ("w", 0, 1, 0x41)]


def test_unclaimed_reads_all_ones_and_drops_writes() -> None:
    bus = IoBus()
    dev = Recorder()
    bus.insert(0x1000, 0x10, dev)
    assert bus.read(0xFFF, 1) == 0xFF
    assert bus.read(0x1010, 2) == 0xFFFF
    assert bus.read(0x0, 4) == 0xFFFF_FFFF
    assert bus.read(0x5000, 8) == (1 << 64) - 1
    bus.write(0x1010, 4, 7)
    bus.write(0x0, 4, 7)
    assert dev.log == []


def test_read_value_is_masked_to_access_size() -> None:
    bus = IoBus()
    bus.insert(0, 4, Wide())
    assert bus.read(0, 1) == 0x99
    assert bus.read(0, 2) == 0x8899
    assert bus.read(0, 4) == 0x6677_8899


def test_boundaries_of_adjacent_ranges() -> None:
    bus = IoBus()
    a, b = Recorder(), Recorder()
    bus.insert(0x100, 0x10, a)
    bus.insert(0x110, 0x10, b)
    bus.write(0x10F, 1, 1)
    bus.write(0x110, 1, 2)
    bus.write(0x11F, 1, 3)
    assert a.log == [("w", 0xF, 1, 1)]
    assert b.log == [("w", 0, 1, 2), ("w", 0xF, 1, 3)]


@pytest.mark.parametrize(
    ("base", "length"),
    [(0x100, 0x10), (0x0FF, 2), (0x10F, 1), (0x0F0, 0x100), (0x108, 4)],
)
def test_overlap_refused(base: int, length: int) -> None:
    bus = IoBus("mmio")
    bus.insert(0x100, 0x10, Recorder())
    with pytest.raises(BusError, match="overlaps"):
        bus.insert(base, length, Recorder())
    assert len(bus.ranges()) == 1


def test_bad_ranges_refused() -> None:
    bus = IoBus("pio", 1 << 16)
    with pytest.raises(BusError, match="empty"):
        bus.insert(0x10, 0, Recorder())
    with pytest.raises(BusError, match="outside"):
        bus.insert(0xFFFF, 2, Recorder())
    with pytest.raises(BusError, match="outside"):
        bus.insert(-1, 2, Recorder())


def test_remove_and_find() -> None:
    bus = IoBus()
    dev = Recorder()
    bus.insert(0x200, 0x20, dev)
    found = bus.find(0x21F)
    assert found is not None and found.device is dev and found.base == 0x200
    assert bus.find(0x220) is None
    with pytest.raises(BusError, match="no range"):
        bus.remove(0x201)
    assert bus.remove(0x200) is dev
    assert bus.find(0x200) is None
    assert bus.read(0x200, 1) == 0xFF
    bus.insert(0x200, 0x20, dev)  # the range is free again


def test_move_keeps_device_and_refuses_overlap() -> None:
    bus = IoBus()
    a, b = Recorder(), Recorder()
    bus.insert(0x1000, 0x100, a)
    bus.insert(0x3000, 0x100, b)
    bus.move(0x1000, 0x2000)
    assert bus.find(0x1000) is None
    bus.write(0x2004, 4, 9)
    assert a.log == [("w", 4, 4, 9)]
    with pytest.raises(BusError, match="overlaps"):
        bus.move(0x2000, 0x2F80)
    found = bus.find(0x2000)  # a failed move leaves the range where it was
    assert found is not None and found.device is a
    bus.move(0x2000, 0x2000, 0x200)
    assert bus.find(0x21FF) is not None


@given(
    st.lists(st.tuples(st.integers(0, 0xFFF), st.integers(1, 0x40)), max_size=12),
    st.lists(st.integers(0, 0x1100), max_size=30),
)
def test_matches_linear_scan(candidates: list[tuple[int, int]], probes: list[int]) -> None:
    bus = IoBus("model", 1 << 16)
    accepted: list[tuple[int, int, Recorder]] = []
    for base, length in candidates:
        dev = Recorder()
        overlapping = any(base < b + n and b < base + length for b, n, _ in accepted)
        if overlapping:
            with pytest.raises(BusError):
                bus.insert(base, length, dev)
        else:
            bus.insert(base, length, dev)
            accepted.append((base, length, dev))
    for addr in probes:
        owners = [(b, d) for b, n, d in accepted if b <= addr < b + n]
        found = bus.find(addr)
        if owners:
            assert found is not None and (found.base, found.device) == owners[0]
            assert bus.read(addr, 2) == (addr - owners[0][0]) + 0x20
        else:
            assert found is None
            assert bus.read(addr, 2) == 0xFFFF


def test_concurrent_readers_see_consistent_bus() -> None:
    bus = IoBus()
    fixed = Recorder()
    bus.insert(0x0, 0x10, fixed)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            value = bus.read(0x4, 1)
            if value != 0x14:
                errors.append(f"read {value:#x}")
            bus.read(0x1000, 4)  # the range churned by the writer

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(2000):
        dev = Recorder()
        bus.insert(0x1000, 0x10 + i % 7, dev)
        bus.remove(0x1000)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.base for r in bus.ranges()] == [0x0]
