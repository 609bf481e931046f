"""Issue 6 acceptance: the walkthrough VM with the disk and the passed-through SD card reader together."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

GUEST = (
    "modprobe mmc_block; i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
    "grep -e vda1 /proc/mounts; echo GUEST-SD=$(sha256sum /dev/mmcblk0); "
    "echo disk-and-reader > /guest-note; sync"
)

COMMAND = r"""
pyvmm-host bind 0000:00:03.0 >/dev/null
pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" --disk path="$PYVMM_GUEST_DISK" \
  --cpus boot=2 --memory size=512M --serial tty --console off \
  --device path=/sys/bus/pci/devices/0000:00:03.0/,x_allow_no_reset=on \
  --cmdline 'console=ttyS0 root=/dev/vda1 rw pyvmm.cmd="@GUEST_CMD@"' < /dev/null
echo "PYVMM-STATUS=$?"
echo "WANT-SD=$PYVMM_LAB_SD_SHA256"
pyvmm-host unbind 0000:00:03.0 >/dev/null
debugfs -R "cat /guest-note" "$PYVMM_GUEST_DISK?offset=1048576" 2>/dev/null | sed "s/^/IMAGE: /"
""".replace("@GUEST_CMD@", GUEST)


def value(out: str, key: str) -> str:
    match = re.search(rf"^{key}=(\w*)", out, re.MULTILINE)
    assert match, out
    return match.group(1)


def test_disk_and_sd_reader_in_one_guest(lab) -> None:
    proc = lab(COMMAND, devices="sd,nvme", timeout=600)
    out = proc.stdout
    assert "PYVMM-GUEST-EXIT=0" in out and "PYVMM-STATUS=0" in out, out
    assert re.search(r"^/dev/vda1 / ext4 rw", out, re.M), out
    assert value(out, "GUEST-SD") == value(out, "WANT-SD") != ""
    assert "IMAGE: disk-and-reader" in out, out
