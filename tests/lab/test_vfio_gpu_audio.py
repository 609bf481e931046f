"""Issue 5, acceptance 3: the display + HDMI-audio pair of one IOMMU group goes to one guest together; the
display alone is refused (exit 2) with a message naming the audio function. Both end on their host drivers."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

GUEST = (
    "i=0; while ! ls /sys/bus/pci/drivers/snd_hda_intel 2>/dev/null | grep -q : && [ $i -lt 100 ]; "
    "do sleep 0.1; i=$((i+1)); done; "
    "for d in /sys/bus/pci/devices/*; do l=$(readlink $d/driver) || l=none; "
    "echo GUEST-PCI $(cat $d/vendor):$(cat $d/device) $(cat $d/class) ${l##*/}; done"
)

SCRIPT = r"""
drv() { l=$(readlink "/sys/bus/pci/devices/$1/driver") && basename "$l" || echo none; }
DISP=0000:00:03.0; AUD=0000:00:03.1
release_fbcon() {  # the host's text console leaves the framebuffers, so a display is no longer in use
  for v in /sys/class/vtconsole/vtcon*; do
    grep -q "frame buffer" "$v/name" 2>/dev/null && echo 0 > "$v/bind"
  done
  true
}
release_fbcon
echo "HOST-BEFORE $(drv $DISP) $(drv $AUD)"
pyvmm-host bind --group $DISP >/dev/null; echo "HOST-BOUND $(drv $DISP) $(drv $AUD)"
PYVMM="pyvmm --kernel $PYVMM_GUEST_KERNEL --initramfs $PYVMM_GUEST_INITRAMFS --cpus boot=2 --memory size=512M
  --serial tty --console off"
echo "== display alone"
$PYVMM --device path=/sys/bus/pci/devices/$DISP/ --cmdline 'console=ttyS0' 2>&1; echo "STATUS=$?"
echo "== both"
$PYVMM --device path=/sys/bus/pci/devices/$DISP/,x_allow_no_reset=on \
  path=/sys/bus/pci/devices/$AUD/,x_allow_no_reset=on \
  --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd="@GUEST@"' 2>&1; echo "STATUS=$?"
echo "== end"
pyvmm-host unbind $DISP $AUD >/dev/null; echo "HOST-AFTER $(drv $DISP) $(drv $AUD)"
""".replace("@GUEST@", GUEST)


def test_display_and_audio_of_one_group(lab) -> None:
    out = lab(SCRIPT, devices="gpu-audio", timeout=300).stdout
    assert "HOST-AFTER" in out, out
    before = re.search(r"^HOST-BEFORE (\S+) (\S+)$", out, re.MULTILINE)
    assert before and "HOST-BOUND vfio-pci vfio-pci" in out, out

    alone = out.split("== display alone\n", 1)[1].split("== both\n", 1)[0]
    assert "STATUS=2" in alone and "0000:00:03.1" in alone and "Traceback" not in alone, alone
    assert len([line for line in alone.splitlines() if line.startswith("pyvmm:")]) == 1, alone  # one line

    both = out.split("== both\n", 1)[1].split("== end\n", 1)[0]
    assert "PYVMM-GUEST-EXIT=0" in both and "STATUS=0" in both, both
    guest = re.findall(r"^GUEST-PCI (0x\w+):(0x\w+) (0x\w+) (\S+)$", both, re.MULTILINE)
    found = {(v, d): (cls, drv) for v, d, cls, drv in guest}
    assert ("0x1234", "0x1111") in found, both  # the display (secondary-vga: class 0x038000)
    assert found[("0x1234", "0x1111")][0].startswith("0x03"), both
    assert found[("0x8086", "0x293e")] == ("0x040300", "snd_hda_intel"), both  # the audio, on its driver

    assert f"HOST-AFTER {before.group(1)} {before.group(2)}" in out, out
