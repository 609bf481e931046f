"""Fuzzing of one PCI configuration space byte by byte against a byte model; budget from PYVMM_FUZZ."""

from __future__ import annotations

from hypothesis import given

from fuzz.budget import fuzz_settings
from fuzz.pci_config import ACCESSES, VENDOR_BODY, run_accesses


@fuzz_settings(examples=500)
@given(body=VENDOR_BODY, writable=VENDOR_BODY, accesses=ACCESSES)
def test_config_space_bytes(body: bytes, writable: bytes, accesses: list[tuple[bool, int, int, int]]) -> None:
    run_accesses(body, (writable * len(body))[: len(body)], accesses)
