"""Fuzzing of MSI and MSI-X emulation against a register model; budget from PYVMM_FUZZ."""

from __future__ import annotations

from fuzz.budget import fuzz_settings
from fuzz.msi import MsiMachine, MsixMachine

MsiMachine.TestCase.settings = fuzz_settings(examples=60, steps=50)
MsixMachine.TestCase.settings = fuzz_settings(examples=60, steps=50)
TestMsi = MsiMachine.TestCase
TestMsix = MsixMachine.TestCase
