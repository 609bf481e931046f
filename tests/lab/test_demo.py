"""`make demo` (issue 5): the classic walkthrough runs through in one lab and says what it showed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]


def test_make_demo_walkthrough(slots) -> None:
    with slots(1):  # the demo's lab has one CPU
        proc = subprocess.run(
            [sys.executable, "-m", "pyvmm.lab.demo"], cwd=REPO, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", timeout=600,
        )
    out = proc.stdout
    assert proc.returncode == 0 and "DEMO FAILED" not in out, out
    assert "$ pyvmm-host list" in out and "$ pyvmm-host bind 0000:00:03.0" in out, out
    assert re.search(r"\[guest\] .*sdhci-pci 0000:00:0\d\.0: SDHCI controller found", out), out
    assert re.search(r"\[guest\] 0000:00:0\d\.0 0x1b36:0x0007 sdhci-pci$", out, re.MULTILINE), out
    assert "=> the guest read the card exactly" in out, out
    assert "0000:00:03.0 is on sdhci-pci again" in out, out
