"""HW-reduced ACPI power-management registers: sleep control, sleep status and reset (port I/O).

The register map and values here are the single source for the FADT (register addresses, reset value)
and the DSDT (`\\_S5_` sleep type), so the guest's view and the device cannot drift apart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import IntEnum, IntFlag

from pyvmm import layout


class PmRegister(IntEnum):
    """Byte offsets of the 8-bit registers from layout.ACPI_PM_PORT."""

    SLEEP_CONTROL = 0
    SLEEP_STATUS = 1
    RESET = 2


class SleepControl(IntFlag):
    """ACPI 6.5 §4.8.3.7: SLP_TYP in bits 4:2, SLP_EN in bit 5."""

    SLP_TYP_MASK = 0x07 << 2
    SLP_EN = 1 << 5


class SleepStatus(IntFlag):
    """ACPI 6.5 §4.8.3.8: WAK_STS in bit 7 (write 1 to clear)."""

    WAK_STS = 1 << 7


SLP_TYP_SHIFT = 2
SLP_TYP_S5 = 5  # the value published in \_S5_; the only sleep state we offer (soft off)
RESET_VALUE = 0x01
REGISTER_WIDTH_BITS = 8


def register_port(register: PmRegister) -> int:
    return layout.ACPI_PM_PORT + register


class AcpiPmDevice:
    """Bus device at layout.ACPI_PM_PORT (ACPI_PM_SIZE bytes); wider accesses act on each byte in turn.

    `on_poweroff` and `on_reset` run on the vCPU thread that wrote the register.
    """

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._status = 0

    def read(self, offset: int, size: int) -> int:
        _check_access(offset, size)
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        _check_access(offset, size)
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        if offset >= layout.ACPI_PM_SIZE:
            return 0xFF  # past the end of the device, like an unclaimed port
        if offset == PmRegister.SLEEP_STATUS:
            with self._lock:
                return self._status
        return 0  # control and reset registers are write-only

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == PmRegister.SLEEP_CONTROL:
            sleep_type = (value & SleepControl.SLP_TYP_MASK) >> SLP_TYP_SHIFT
            # Other sleep types are not advertised (no \_S1_.._S4_), so a request for one is ignored.
            if value & SleepControl.SLP_EN and sleep_type == SLP_TYP_S5:
                self._on_poweroff()
        elif offset == PmRegister.SLEEP_STATUS:
            with self._lock:
                self._status &= ~(value & SleepStatus.WAK_STS)
        elif offset == PmRegister.RESET and value == RESET_VALUE:
            self._on_reset()


def _check_access(offset: int, size: int) -> None:
    # Guest accesses that run past the end are tolerated byte by byte; these are bus bugs.
    if size not in (1, 2, 4, 8) or not 0 <= offset < layout.ACPI_PM_SIZE:
        raise ValueError(f"invalid ACPI PM access of {size} bytes at offset {offset}")
