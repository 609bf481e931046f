"""Fuzzing of MSI and MSI-X emulation against a register model; budget from PYVMM_FUZZ."""

from __future__ import annotations

import pytest

from fuzz.budget import fuzz_settings
from fuzz.msi import MsiMachine, MsixMachine

MsiMachine.TestCase.settings = fuzz_settings(examples=150, steps=50)
MsixMachine.TestCase.settings = fuzz_settings(examples=150, steps=50)
TestMsi = MsiMachine.TestCase
TestMsix = MsixMachine.TestCase

KvmMsixMachine = pytest.importorskip("fuzz.msi_kvm").KvmMsixMachine
KvmMsixMachine.TestCase.settings = fuzz_settings(examples=100, steps=50)
TestMsixToKvmRoutes = KvmMsixMachine.TestCase
