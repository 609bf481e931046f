"""Fuzzing of split virtqueues against the real virtio-blk device model; budget from PYVMM_FUZZ."""

from __future__ import annotations

from fuzz.budget import fuzz_settings
from fuzz.virtqueue import VirtqueueBlkMachine

VirtqueueBlkMachine.TestCase.settings = fuzz_settings(examples=60, steps=40)
TestVirtqueueBlk = VirtqueueBlkMachine.TestCase
