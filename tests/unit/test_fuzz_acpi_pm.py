"""Fuzzing of the ACPI PM registers: any offset, width and value; power-off and reset exactly when due."""

from __future__ import annotations

import pytest
from hypothesis import given

from fuzz.acpi_pm import ACCESSES, run_accesses
from fuzz.budget import fuzz_settings
from pyvmm.devices.acpi_pm import AcpiPmDevice


@fuzz_settings(examples=1000)
@given(accesses=ACCESSES)
def test_acpi_pm_registers(accesses: list[tuple[int, int, int, bool]]) -> None:
    run_accesses(accesses)


@pytest.mark.parametrize(("offset", "size"), [(-1, 1), (8, 1), (0, 3), (0, 0)])
def test_accesses_a_bus_never_makes_are_refused_loudly(offset: int, size: int) -> None:
    pm = AcpiPmDevice(on_poweroff=lambda: None, on_reset=lambda: None)
    with pytest.raises(ValueError):
        pm.read(offset, size)
    with pytest.raises(ValueError):
        pm.write(offset, size, 0)
