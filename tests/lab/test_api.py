"""The REST API on --api-socket (issue 18, part 1): Kata Containers' start and stop replayed against pyvmm
in one lab boot and one guest boot, the API's error cases and pyvmm-remote (tests/lab/helpers/kata_api.py)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

# Kata SIGKILLs the VMM 3 s after vmm.shutdown; the lab is an emulated (TCG) machine running a nested
# guest, so the bound holds there with room to spare only if pyvmm's teardown is quick.
KATA_EXIT_SECONDS = 3.0


def test_kata_start_stop_errors_and_remote(lab) -> None:
    proc = lab('python3 tests/lab/helpers/kata_api.py "$TMPDIR"', devices="sd", timeout=600)
    out = proc.stdout
    assert proc.returncode == 0 and "KATA-API-DONE" in out, out
    assert "Traceback" not in out, out
    steps = {m.group(1): m.group(2) for m in re.finditer(r"^STEP (\S+) ?(.*)$", out, re.MULTILINE)}
    assert "bad_json=400 unknown=404 boot_before_create=500" in steps["errors"], steps
    assert "status=500" in steps["unbound-device"] and "vfio-pci" in steps["unbound-device"], steps
    assert "state=Running" in steps["kata-start"] and "vcpu0" in steps["kata-start"], steps
    assert "ticks_while_paused=0" in steps["pause-resume"], steps
    stop = dict(item.split("=") for item in steps["kata-stop"].split())
    assert float(stop["exited"]) < KATA_EXIT_SECONDS, steps["kata-stop"]
    assert stop["rc"] == "0"
