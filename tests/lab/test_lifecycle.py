"""pyvmm's lifecycle in the lab: reboot, signals, triple faults (issue: pyvmm boots Linux)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

PYVMM = (
    'pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" --memory size=256M '
    "--serial tty --console off"
)

SCRIPT = rf"""
echo "== reboot"
timeout 300 {PYVMM} --cmdline 'console=ttyS0 quiet pyvmm.cmd="reboot -f"' 2>&1; echo "STATUS=$?"
echo "== sigterm"
{PYVMM} --cmdline 'console=ttyS0 quiet' > $TMPDIR/term.log 2>&1 &
pid=$!
for i in $(seq 120); do grep -q pyvmm-guest $TMPDIR/term.log && break; sleep 1; done
kill -TERM $pid; wait $pid; echo "STATUS=$?"
cat $TMPDIR/term.log | tail -3
echo "== fault"
python3 tests/lab/helpers/fault_kernel.py $TMPDIR/fault.bzImage
timeout 120 pyvmm --kernel $TMPDIR/fault.bzImage --memory size=256M --serial tty --console off 2>&1
echo "STATUS=$?"
echo "== end"
"""


def _section(out: str, name: str) -> str:
    return out.split(f"== {name}\n", 1)[1].split("\n== ", 1)[0]


def test_reboot_sigterm_and_triple_fault(lab) -> None:
    proc = lab(SCRIPT, devices="none")
    out = proc.stdout
    assert "== end" in out, out
    reboot = _section(out, "reboot")
    assert "STATUS=0" in reboot, reboot  # decision: a guest reboot ends pyvmm with status 0
    assert "reboot" in reboot and "Traceback" not in reboot
    term = _section(out, "sigterm")
    assert "STATUS=0" in term and "stopped by SIGTERM" in term, term
    assert "Traceback" not in term
    fault = _section(out, "fault")
    status = int(re.search(r"STATUS=(\d+)", fault).group(1))
    assert status not in (0, 2), fault
    assert "triple fault" in fault.lower() or "shutdown" in fault.lower(), fault
    # The registers come with it (on AMD, KVM has already reset the vCPU when it reports the shutdown).
    assert re.search(r"RIP=[0-9a-f]{16}", fault) and "CR0=" in fault, fault
    assert "Traceback" not in fault
