"""Fuzzing of the PCI platform (ECAM, 0xCF8, BARs, capabilities, MSI/MSI-X); budget from PYVMM_FUZZ."""

from __future__ import annotations

from fuzz.budget import fuzz_settings
from fuzz.pci import PciPlatformMachine

PciPlatformMachine.TestCase.settings = fuzz_settings(examples=200, steps=60)
TestPciPlatform = PciPlatformMachine.TestCase
