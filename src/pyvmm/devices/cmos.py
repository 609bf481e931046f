"""The PC's CMOS real-time clock (an MC146818 at ports 0x70/0x71), as cloud-hypervisor provides on x86-64.

Port 0x70 selects a register (bit 7 is the NMI-disable bit of PC chipsets: ignored), port 0x71 reads or
writes it. The clock registers are computed from the host's wall clock (UTC) at each read, so the guest
never sees a stale or drifting time; writes to them are accepted and forgotten (`hwclock -w` changes
nothing, as in cloud-hypervisor). Register B starts in 24-hour BCD mode: Linux's rtc_cmos refuses a clock
with an interrupt line that is not in 24-hour mode ("only 24-hr supported"). The device raises no
interrupts (no alarm, periodic or update interrupts). The rest of the 128 bytes is plain CMOS RAM, with the
memory-size bytes firmware and old loaders read filled in from the RAM layout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import IntEnum, IntFlag

from pyvmm import layout


class CmosPort(IntEnum):
    """Offsets from layout.CMOS_PORT."""

    INDEX = 0
    DATA = 1


class CmosReg(IntEnum):
    """MC146818 register indexes (and the PC's conventional CMOS RAM bytes)."""

    SECONDS = 0x00
    SECONDS_ALARM = 0x01
    MINUTES = 0x02
    MINUTES_ALARM = 0x03
    HOURS = 0x04
    HOURS_ALARM = 0x05
    DAY_OF_WEEK = 0x06
    DAY_OF_MONTH = 0x07
    MONTH = 0x08
    YEAR = 0x09
    A = 0x0A
    B = 0x0B
    C = 0x0C
    D = 0x0D
    CENTURY = 0x32  # the byte the FADT's CENTURY field names
    EXT_MEM_LOW = 0x34  # RAM from 16 MiB to 4 GiB in 64 KiB units (two bytes)
    EXT_MEM_HIGH = 0x35
    HIGH_MEM_0 = 0x5B  # RAM above 4 GiB in 64 KiB units (three bytes)
    HIGH_MEM_1 = 0x5C
    HIGH_MEM_2 = 0x5D


class RegA(IntFlag):
    UIP = 1 << 7  # update in progress: the time registers are about to change
    WRITABLE = 0x7F  # divider (bits 6:4) and periodic rate (bits 3:0)


class RegB(IntFlag):
    DST = 1 << 0
    HOUR_24 = 1 << 1
    BINARY = 1 << 2  # DM: binary instead of BCD
    SQWE = 1 << 3
    UIE = 1 << 4
    AIE = 1 << 5
    PIE = 1 << 6
    SET = 1 << 7


class RegD(IntFlag):
    VRT = 1 << 7  # valid RAM and time: the battery is good


INDEX_MASK = 0x7F  # bit 7 of a write to port 0x70 is the chipset's NMI mask, not part of the index
CMOS_RAM_SIZE = 128
REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate: what PC firmware leaves there
REG_B_DEFAULT = RegB.HOUR_24  # BCD, 24-hour, no interrupts
HOUR_PM = 1 << 7  # in 12-hour mode
EXT_MEM_BASE = 16 * layout.MiB
MEM_UNIT = 64 * layout.KiB
EXT_MEM_MAX = 0xFFFF
HIGH_MEM_MAX = 0xFF_FFFF
NS_PER_S = 1_000_000_000
# An MC146818 raises UIP 244 us before the registers change; reads in that window see it set.
UIP_WINDOW_NS = 244_000


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class CmosDevice:
    """Bus device at layout.CMOS_PORT (layout.CMOS_SIZE ports). `clock_ns` returns the wall-clock time
    in nanoseconds since the epoch (UTC); tests substitute a fixed one."""

    def __init__(self, mem_below_4g: int, mem_above_4g: int,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._index = 0
        self._last_index_write = 0
        ram = bytearray(CMOS_RAM_SIZE)
        ram[CmosReg.A] = REG_A_DEFAULT
        ram[CmosReg.B] = REG_B_DEFAULT
        ext = min(EXT_MEM_MAX, max(0, mem_below_4g - EXT_MEM_BASE) // MEM_UNIT)
        ram[CmosReg.EXT_MEM_LOW], ram[CmosReg.EXT_MEM_HIGH] = ext & 0xFF, ext >> 8
        high = min(HIGH_MEM_MAX, mem_above_4g // MEM_UNIT)
        ram[CmosReg.HIGH_MEM_0:CmosReg.HIGH_MEM_2 + 1] = high.to_bytes(3, "little")
        self._ram = ram

    @classmethod
    def for_ram_size(cls, ram_size: int, clock_ns: Callable[[], int] = time.time_ns) -> CmosDevice:
        """The device for a guest of `ram_size` bytes laid out by layout.ram_regions."""
        below = above = 0
        for gpa, length in layout.ram_regions(ram_size):
            if gpa < layout.HIGH_RAM_BASE:
                below += length
            else:
                above += length
        return cls(below, above, clock_ns)

    # --- bus interface (vCPU threads) ----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        with self._lock:
            if offset == CmosPort.INDEX:
                return self._last_index_write  # write-only on real chipsets; echo it as CH does
            if offset != CmosPort.DATA:
                return 0xFF
            return self._register(self._index)

    def _write_byte(self, offset: int, value: int) -> None:
        with self._lock:
            if offset == CmosPort.INDEX:
                self._last_index_write = value
                self._index = value & INDEX_MASK
            elif offset == CmosPort.DATA:
                self._store(self._index, value)

    # --- registers (lock held) -----------------------------------------------------------------------------

    def _register(self, index: int) -> int:
        if index == CmosReg.A:
            now_ns = self._clock_ns()
            uip = RegA.UIP if now_ns % NS_PER_S >= NS_PER_S - UIP_WINDOW_NS else 0
            return (self._ram[CmosReg.A] & RegA.WRITABLE) | uip
        if index == CmosReg.C:
            return 0  # no interrupt flags ever set
        if index == CmosReg.D:
            return RegD.VRT
        if index in _TIME_FIELDS or index == CmosReg.CENTURY:
            return self._time_register(index)
        return self._ram[index]

    def _store(self, index: int, value: int) -> None:
        if index in _TIME_FIELDS or index in (CmosReg.C, CmosReg.D, CmosReg.CENTURY):
            return  # the host clock is the time; C and D are read-only
        if index == CmosReg.A:
            value &= RegA.WRITABLE
        self._ram[index] = value

    def _time_register(self, index: int) -> int:
        t = time.gmtime(self._clock_ns() // NS_PER_S)
        mode = RegB(self._ram[CmosReg.B])
        value = {
            CmosReg.SECONDS: t.tm_sec,
            CmosReg.MINUTES: t.tm_min,
            CmosReg.HOURS: t.tm_hour,
            CmosReg.DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1,  # 1 = Sunday (tm_wday: 0 = Monday)
            CmosReg.DAY_OF_MONTH: t.tm_mday,
            CmosReg.MONTH: t.tm_mon,
            CmosReg.YEAR: t.tm_year % 100,
            CmosReg.CENTURY: t.tm_year // 100,
        }[CmosReg(index)]
        pm = 0
        if index == CmosReg.HOURS and not mode & RegB.HOUR_24:
            pm = HOUR_PM if value >= 12 else 0
            value = value % 12 or 12
        encoded = value if mode & RegB.BINARY else _bcd(value)
        return encoded | pm


_TIME_FIELDS = frozenset({
    CmosReg.SECONDS, CmosReg.MINUTES, CmosReg.HOURS, CmosReg.DAY_OF_WEEK, CmosReg.DAY_OF_MONTH,
    CmosReg.MONTH, CmosReg.YEAR,
})
