"""Fuzzing of the VFIO PCI device model over a memfd stand-in for the device fd; budget from PYVMM_FUZZ."""

from __future__ import annotations

from fuzz.budget import fuzz_settings
from fuzz.vfio import VfioPciMachine

VfioPciMachine.TestCase.settings = fuzz_settings(examples=100, steps=40)
TestVfioPci = VfioPciMachine.TestCase
