"""CMOS RTC: driven through its two ports the way Linux's mc146818 code and rtc_cmos drive it."""

from __future__ import annotations

import calendar

import pytest

from pyvmm import layout
from pyvmm.devices.cmos import CmosDevice, CmosPort, CmosReg, RegB

# Sunday 2026-12-06 07:08:09 UTC, half-way through the second.
WHEN = calendar.timegm((2026, 12, 6, 7, 8, 9)) * 10**9 + 500_000_000


class Clock:
    def __init__(self, ns: int = WHEN) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def dev(clock: Clock) -> CmosDevice:
    return CmosDevice(512 * layout.MiB, 0, clock_ns=clock)


def read(dev: CmosDevice, index: int, nmi_bit: bool = False) -> int:
    dev.write(CmosPort.INDEX, 1, index | (0x80 if nmi_bit else 0))
    return dev.read(CmosPort.DATA, 1)


def write(dev: CmosDevice, index: int, value: int) -> None:
    dev.write(CmosPort.INDEX, 1, index)
    dev.write(CmosPort.DATA, 1, value)


def test_time_is_bcd_24_hour_utc(dev: CmosDevice) -> None:
    fields = [CmosReg.SECONDS, CmosReg.MINUTES, CmosReg.HOURS, CmosReg.DAY_OF_WEEK, CmosReg.DAY_OF_MONTH,
              CmosReg.MONTH, CmosReg.YEAR, CmosReg.CENTURY]
    assert [read(dev, f) for f in fields] == [0x09, 0x08, 0x07, 0x01, 0x06, 0x12, 0x26, 0x20]


def test_time_follows_the_clock_at_read_time(dev: CmosDevice, clock: Clock) -> None:
    clock.ns = calendar.timegm((2031, 3, 9, 23, 59, 58)) * 10**9
    assert [read(dev, r) for r in (CmosReg.HOURS, CmosReg.MINUTES, CmosReg.SECONDS)] == [0x23, 0x59, 0x58]
    assert read(dev, CmosReg.YEAR) == 0x31


def test_status_registers(dev: CmosDevice) -> None:
    assert read(dev, CmosReg.B) == RegB.HOUR_24  # what rtc_cmos insists on when it has an IRQ
    assert read(dev, CmosReg.A) == 0x26  # not updating, 32.768 kHz time base
    assert read(dev, CmosReg.C) == 0
    assert read(dev, CmosReg.D) == 0x80  # valid RAM and time
    assert not read(dev, 0x0D) & 0x40  # Linux's "not accessible" check


def test_update_in_progress_only_just_before_the_second_changes(dev: CmosDevice, clock: Clock) -> None:
    second = WHEN - WHEN % 10**9
    clock.ns = second + 999_900_000
    assert read(dev, CmosReg.A) & 0x80
    clock.ns = second + 999_000_000
    assert not read(dev, CmosReg.A) & 0x80
    clock.ns = second
    assert not read(dev, CmosReg.A) & 0x80


def test_nmi_mask_bit_is_not_part_of_the_index(dev: CmosDevice) -> None:
    assert read(dev, CmosReg.MINUTES, nmi_bit=True) == 0x08
    write(dev, 0x40 | 0x80, 0x5A)  # index 0x40 with NMI disabled
    assert read(dev, 0x40) == 0x5A


def test_index_register_reads_back_and_selects(dev: CmosDevice) -> None:
    dev.write(CmosPort.INDEX, 1, 0x8B)
    assert dev.read(CmosPort.INDEX, 1) == 0x8B
    assert dev.read(CmosPort.DATA, 1) == RegB.HOUR_24


def test_binary_and_12_hour_modes(dev: CmosDevice, clock: Clock) -> None:
    clock.ns = calendar.timegm((2026, 12, 6, 19, 45, 30)) * 10**9
    write(dev, CmosReg.B, RegB.HOUR_24 | RegB.BINARY)
    assert [read(dev, r) for r in (CmosReg.HOURS, CmosReg.MINUTES, CmosReg.YEAR)] == [19, 45, 26]
    write(dev, CmosReg.B, 0)  # BCD, 12-hour: 7 PM
    assert read(dev, CmosReg.HOURS) == 0x80 | 0x07
    clock.ns = calendar.timegm((2026, 12, 6, 0, 5, 0)) * 10**9
    assert read(dev, CmosReg.HOURS) == 0x12  # midnight is 12 AM


def test_time_writes_are_ignored_ram_writes_kept(dev: CmosDevice) -> None:
    write(dev, CmosReg.SECONDS, 0x42)
    assert read(dev, CmosReg.SECONDS) == 0x09
    write(dev, CmosReg.D, 0)
    assert read(dev, CmosReg.D) == 0x80
    write(dev, CmosReg.A, 0xA6)  # UIP is read-only
    assert read(dev, CmosReg.A) == 0x26
    write(dev, 0x7F, 0x11)
    assert read(dev, 0x7F) == 0x11
    write(dev, 0xFF, 0x22)  # the index wraps at 128 bytes
    assert read(dev, 0x7F) == 0x22


@pytest.mark.parametrize(("ram", "ext", "high"), [
    (512 * layout.MiB, (512 - 16) * 16, 0),
    (8 * layout.MiB, 0, 0),
    (4 * layout.GiB, (3072 - 16) * 16, 1024 * 16),  # 3 GiB below the hole, 1 GiB above 4 GiB
])
def test_memory_size_bytes(ram: int, ext: int, high: int) -> None:
    dev = CmosDevice.for_ram_size(ram)
    assert read(dev, 0x34) | read(dev, 0x35) << 8 == ext
    assert read(dev, 0x5B) | read(dev, 0x5C) << 8 | read(dev, 0x5D) << 16 == high


def test_memory_size_bytes_saturate() -> None:
    dev = CmosDevice(8 * layout.GiB, 2 << 40)
    assert read(dev, 0x34) | read(dev, 0x35) << 8 == 0xFFFF
    assert read(dev, 0x5B) | read(dev, 0x5C) << 8 | read(dev, 0x5D) << 16 == 0xFF_FFFF


def test_wide_access_is_byte_by_byte(dev: CmosDevice) -> None:
    dev.write(CmosPort.INDEX, 2, 0x0D)  # outw 0x70: index 0x0D, then data port gets 0 (D is read-only)
    assert dev.read(CmosPort.INDEX, 2) == 0x0D | 0x80 << 8
