"""`--device ...,managed=on` in the lab (issue 5, acceptance 4): pyvmm binds the reader's IOMMU group to
vfio-pci itself and gives it back to sdhci-pci on every way out it sees — guest poweroff, guest panic
(panic=-1: the guest reboots, pyvmm exits), SIGTERM during guest boot or right after the bind, a refusal
while building — and a SIGKILL of a pyvmm holding several managed devices (the reader, the NVMe drive, the
display + audio group) leaves a journal from which `pyvmm-host restore --all` gives every one of them back
to its driver (issue 9). Afterwards the host reads the card and the drive again and the display and
audio functions have their DRM and sound cards."""

from __future__ import annotations

import json
import re

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

GUEST = (
    "modprobe mmc_block; i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-SD=$(sha256sum /dev/mmcblk0); "
    "for d in /sys/bus/pci/devices/*; do echo GUEST-DRV $(readlink $d/driver); done"
)

PRELUDE = lab_script(
    r"""
PYVMM="pyvmm --kernel $PYVMM_GUEST_KERNEL --initramfs $PYVMM_GUEST_INITRAMFS --cpus boot=2 --memory size=512M
  --serial tty --console off"
boot_then() {  # boot_then SIGNAL [DEVICE...]: start a guest with the managed DEVICEs (default: the reader),
               # send SIGNAL once its kernel prints, wait for pyvmm
  sig=$1; shift
  [ $# -gt 0 ] || set -- path=/sys/bus/pci/devices/$SD/,managed=on,x_allow_no_reset=on
  $PYVMM --device "$@" --cmdline 'console=ttyS0 panic=-1' > $TMPDIR/boot.log 2>&1 &
  pid=$!
  i=0; while ! grep -q 'Linux version' $TMPDIR/boot.log && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
  echo "during boot: $(drv $SD)"
  kill -$sig $pid; wait $pid; echo "rc=$?"
  grep -o -e 'pyvmm: .*' -e Traceback $TMPDIR/boot.log
}
""",
    SD="0000:00:03.0",
    DISP="0000:00:04.0",
    AUD="0000:00:04.1",
    NVME="0000:00:05.0",
)

EXITS = PRELUDE + r"""
release_fbcon
sec before; echo "$(drv $SD) $(drv $DISP) $(drv $AUD)"
sec poweroff
$PYVMM --device path=/sys/bus/pci/devices/$SD/,managed=on,x_allow_no_reset=on \
  --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd="@GUEST@"' > $TMPDIR/off.log 2>&1
echo "rc=$?"; grep -e ^GUEST -e 'pyvmm: ' -e Traceback $TMPDIR/off.log
echo "after: $(drv $SD)"; ls /run/pyvmm
sec sigterm; boot_then TERM; echo "after: $(drv $SD)"; ls /run/pyvmm
sec card
i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "read=$(sha256sum /dev/mmcblk0 | cut -d' ' -f1)"
echo "want=$PYVMM_LAB_SD_SHA256"
sec end
""".replace("@GUEST@", GUEST)

FAILURES = PRELUDE + r"""
release_fbcon
sec before; echo "$(drv $SD) $(drv $DISP) $(drv $AUD)"
sec panic
$PYVMM --device path=/sys/bus/pci/devices/$SD/,managed=on,x_allow_no_reset=on \
  --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd="echo c > /proc/sysrq-trigger"' > $TMPDIR/panic.log 2>&1
echo "rc=$?"; grep -c 'Kernel panic' $TMPDIR/panic.log; grep -o -e 'pyvmm: .*' -e Traceback $TMPDIR/panic.log
echo "after: $(drv $SD)"
sec refused
$PYVMM --device path=/sys/bus/pci/devices/$DISP/,managed=on --cmdline 'console=ttyS0' 2>&1; echo "rc=$?"
echo "after: $(drv $DISP) $(drv $AUD)"
sec early-sigterm  # right after the bind: while pyvmm builds the VM (or even while it binds)
$PYVMM --device path=/sys/bus/pci/devices/$SD/,managed=on,x_allow_no_reset=on --cmdline 'console=ttyS0' \
  > $TMPDIR/early.log 2>&1 &
pid=$!
i=0; while [ "$(drv $SD)" != vfio-pci ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
kill -TERM $pid; wait $pid; echo "rc=$?"; grep -o -e 'pyvmm: .*' -e Traceback $TMPDIR/early.log
echo "after: $(drv $SD)"; ls /run/pyvmm
sec sigkill  # several managed devices at once: the reader, the NVMe drive, the display + audio group
release_fbcon  # the refused display above went back to bochs-drm, and fbcon took its new framebuffer
boot_then KILL path=/sys/bus/pci/devices/$SD/,managed=on,x_allow_no_reset=on \
  path=/sys/bus/pci/devices/$NVME/,managed=on \
  path=/sys/bus/pci/devices/$DISP/,managed=on,x_allow_no_reset=on \
  path=/sys/bus/pci/devices/$AUD/,managed=on,x_allow_no_reset=on
echo "after: $(drv $SD) $(drv $NVME) $(drv $DISP) $(drv $AUD)"; cat /run/pyvmm/host-journal.json
pyvmm-host restore --all; echo "rc=$?"; echo "after: $(drv $SD) $(drv $NVME) $(drv $DISP) $(drv $AUD)"
ls /run/pyvmm
sec card
echo "read=$(sha_of /dev/mmcblk0)"
echo "want=$PYVMM_LAB_SD_SHA256"
sec nvme
echo "read=$(sha_of /dev/nvme0n1)"
echo "want=$PYVMM_LAB_NVME_SHA256"
sec display-audio  # each function's driver made its device again: a DRM card, a sound card
i=0; while ! ls /sys/bus/pci/devices/$DISP/drm/ 2>/dev/null | grep -q '^card' && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i + 1)); done
ls /sys/bus/pci/devices/$DISP/drm/ 2>/dev/null | grep '^card' | sed 's/^/drm: /'
i=0; while ! ls /sys/bus/pci/devices/$AUD/sound/ 2>/dev/null | grep -q '^card' && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i + 1)); done
ls /sys/bus/pci/devices/$AUD/sound/ 2>/dev/null | grep '^card' | sed 's/^/sound: /'
sec end
"""


def _card_read_right(out: dict[str, str]) -> None:
    card = dict(line.split("=", 1) for line in out["card"].splitlines())
    assert card["read"] == card["want"] != ""


def test_managed_reader_back_after_poweroff_and_sigterm(lab) -> None:
    proc = lab(EXITS, devices="sd,gpu-audio", timeout=300)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout
    assert out["before"].split()[0] == "sdhci-pci", out["before"]

    poweroff = out["poweroff"]  # the guest's own sdhci-pci read the card through pyvmm
    want = re.search(r"^want=(\w+)", out["card"], re.MULTILINE).group(1)
    assert re.search(rf"^GUEST-SD={want}\b", poweroff, re.MULTILINE), poweroff
    assert re.search(r"^GUEST-DRV \S*/sdhci-pci$", poweroff, re.MULTILINE), poweroff
    assert "rc=0" in poweroff and "after: sdhci-pci" in poweroff and "Traceback" not in poweroff, poweroff
    assert "host-journal.json" not in poweroff, poweroff  # nothing left to restore

    sigterm = out["sigterm"]
    assert "during boot: vfio-pci" in sigterm and "rc=0" in sigterm, sigterm
    assert "stopped by SIGTERM" in sigterm and "Traceback" not in sigterm, sigterm
    assert "after: sdhci-pci" in sigterm and "host-journal.json" not in sigterm, sigterm
    _card_read_right(out)


def test_managed_after_guest_panic_build_error_and_sigkill(lab) -> None:
    proc = lab(FAILURES, devices="sd,gpu-audio,nvme", timeout=360)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout
    before = out["before"].split()

    panic = out["panic"].splitlines()
    assert panic[0] == "rc=0" and int(panic[1]) >= 1, out["panic"]  # the guest did panic, pyvmm exited
    assert "after: sdhci-pci" in out["panic"] and "Traceback" not in out["panic"], out["panic"]

    refused = out["refused"]  # a build error: the whole group was bound, then all of it given back
    assert "rc=2" in refused and "0000:00:04.1" in refused and "Traceback" not in refused, refused
    assert f"after: {before[1]} {before[2]}" in refused, (before, refused)

    early = out["early-sigterm"]
    assert "rc=0" in early and "stopped by SIGTERM" in early and "Traceback" not in early, early
    assert "after: sdhci-pci" in early and "host-journal.json" not in early, early

    # Nothing runs on a SIGKILL: the journal lets `pyvmm-host restore --all` undo it, for every device.
    sigkill = out["sigkill"]
    assert "during boot: vfio-pci" in sigkill and "rc=137" in sigkill, sigkill
    assert "Traceback" not in sigkill, sigkill
    assert "after: vfio-pci vfio-pci vfio-pci vfio-pci" in sigkill, sigkill
    journal = json.loads(sigkill[sigkill.index("{") : sigkill.rindex("}") + 1])
    assert {d["bdf"]: d["driver"] for d in journal["devices"]} == {
        "0000:00:03.0": "sdhci-pci",
        "0000:00:05.0": "nvme",
        "0000:00:04.0": before[1],
        "0000:00:04.1": before[2],
    }, sigkill
    for driver in ("sdhci-pci", "nvme", before[1], before[2]):
        assert f"given back to {driver}" in sigkill, sigkill
    assert f"after: sdhci-pci nvme {before[1]} {before[2]}" in sigkill and "rc=0" in sigkill, sigkill
    assert "host-journal.json" not in sigkill.rsplit("after: ", 1)[1], sigkill
    _card_read_right(out)
    nvme = dict(line.split("=", 1) for line in out["nvme"].splitlines())
    assert nvme["read"] == nvme["want"] != "", out["nvme"]
    assert re.search(r"^drm: card\d+$", out["display-audio"], re.MULTILINE), out["display-audio"]
    assert re.search(r"^sound: card\d+$", out["display-audio"], re.MULTILINE), out["display-audio"]
