"""ACPI PM register device: driven the way Linux's HW-reduced sleep and reset paths drive it."""

from __future__ import annotations

import pytest

from pyvmm import layout
from pyvmm.devices.acpi_pm import (
    RESET_VALUE,
    SLP_TYP_S5,
    AcpiPmDevice,
    PmRegister,
    SleepControl,
    SleepStatus,
    register_port,
)


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def poweroff(self) -> None:
        self.events.append("poweroff")

    def reset(self) -> None:
        self.events.append("reset")


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def dev(rec: Recorder) -> AcpiPmDevice:
    return AcpiPmDevice(rec.poweroff, rec.reset)


def test_linux_poweroff_sequence(dev: AcpiPmDevice, rec: Recorder) -> None:
    # acpi_hw_extended_sleep: clear WAK_STS, write SLP_TYP, then SLP_TYP | SLP_EN.
    dev.write(PmRegister.SLEEP_STATUS, 1, SleepStatus.WAK_STS)
    dev.write(PmRegister.SLEEP_CONTROL, 1, SLP_TYP_S5 << 2)
    assert rec.events == []
    dev.write(PmRegister.SLEEP_CONTROL, 1, (SLP_TYP_S5 << 2) | SleepControl.SLP_EN)
    assert rec.events == ["poweroff"]


@pytest.mark.parametrize("sleep_type", [0, 1, 3, 4, 6, 7])
def test_other_sleep_types_ignored(dev: AcpiPmDevice, rec: Recorder, sleep_type: int) -> None:
    dev.write(PmRegister.SLEEP_CONTROL, 1, (sleep_type << 2) | SleepControl.SLP_EN)
    assert rec.events == []


def test_reset_register(dev: AcpiPmDevice, rec: Recorder) -> None:
    dev.write(PmRegister.RESET, 1, RESET_VALUE ^ 0xFF)
    assert rec.events == []
    dev.write(PmRegister.RESET, 1, RESET_VALUE)
    assert rec.events == ["reset"]


def test_reset_value_in_control_register_does_nothing(dev: AcpiPmDevice, rec: Recorder) -> None:
    dev.write(PmRegister.SLEEP_CONTROL, 1, RESET_VALUE)
    assert rec.events == []


def test_wide_write_reaches_each_byte(dev: AcpiPmDevice, rec: Recorder) -> None:
    # A 32-bit write at 0 covers control, status and reset registers.
    value = ((SLP_TYP_S5 << 2) | SleepControl.SLP_EN) | (RESET_VALUE << 16)
    dev.write(0, 4, value)
    assert rec.events == ["poweroff", "reset"]


def test_reads(dev: AcpiPmDevice) -> None:
    assert dev.read(PmRegister.SLEEP_STATUS, 1) & SleepStatus.WAK_STS == 0
    assert dev.read(PmRegister.SLEEP_CONTROL, 1) == 0
    assert dev.read(layout.ACPI_PM_SIZE - 1, 2) == 0xFF00  # second byte lies past the device


def test_invalid_access_rejected(dev: AcpiPmDevice) -> None:
    with pytest.raises(ValueError, match="ACPI PM access"):
        dev.read(0, 3)
    with pytest.raises(ValueError, match="ACPI PM access"):
        dev.write(layout.ACPI_PM_SIZE, 1, 0)


def test_register_ports_inside_the_pm_range() -> None:
    for reg in PmRegister:
        assert layout.ACPI_PM_PORT <= register_port(reg) < layout.ACPI_PM_PORT + layout.ACPI_PM_SIZE
