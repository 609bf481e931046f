"""The CMOS real-time clock (issue 17): Linux's rtc_cmos finds it and the guest's wall clock is today."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

GUEST_CMD = "date -u +GUEST-DATE=%Y-%m-%d; echo RTC-DATE=$(cat /sys/class/rtc/rtc0/date); dmesg | grep -i rtc"

SCRIPT = (
    'echo "LAB-DATE=$(date -u +%Y-%m-%d)"; '
    'pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" --cpus boot=2 '
    "--memory size=512M --serial tty --console off "
    f"--cmdline 'console=ttyS0 pyvmm.cmd=\"{GUEST_CMD}\"'; status=$?; "
    'echo "LAB-DATE-AFTER=$(date -u +%Y-%m-%d)"; echo "PYVMM-STATUS=$status"; exit $status'
)


def _value(out: str, key: str) -> str:
    match = re.search(rf"^{key}=(\S+)", out, re.MULTILINE)
    assert match, f"no {key} in:\n{out}"
    return match.group(1)


def test_guest_wall_clock_comes_from_the_rtc(lab) -> None:
    proc = lab(SCRIPT, devices="none")
    out = proc.stdout.replace("\r", "")
    assert proc.returncode == 0, out
    assert "PYVMM-GUEST-EXIT=0" in out, out
    lab_dates = {_value(out, "LAB-DATE"), _value(out, "LAB-DATE-AFTER")}  # a boot across midnight
    assert _value(out, "GUEST-DATE") in lab_dates, out
    assert _value(out, "RTC-DATE") in lab_dates, out
    assert re.search(r"rtc_cmos \S+: registered as rtc0", out), out
    assert re.search(r"rtc_cmos \S+: setting system clock to \d{4}-\d\d-\d\d", out), out
    assert "rtc_cmos 00:" in out, out  # bound to the DSDT's PNP0B00, not to a fallback device with IRQ 8
    for bad in ("only 24-hr supported", "not accessible", "probe of rtc_cmos failed"):
        assert bad not in out, out
