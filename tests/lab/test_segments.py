"""Issue 7 acceptance in the lab: PCI segments with weighted 32-bit windows, 32-bit BAR exhaustion found
before the guest starts, and `--dry-run` printing the addresses the guest then sees."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

PYVMM = (
    'pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" --cpus boot=2 '
    "--memory size=512M --serial tty --console off"
)

# Every guest PCI function's BARs (sysfs resource lines: index start end), then the command's own output.
GUEST_RESOURCES = (
    "for d in /sys/bus/pci/devices/*; do n=0; while read s e f; do echo RES ${d##*/} $n $s $e; n=$((n+1)); "
    "done < $d/resource; echo DRV ${d##*/} $(readlink $d/driver); done; ls -1 /sys/class/pci_bus; "
    "grep -e PCI.Bus /proc/iomem"
)


def dry_run_bars(out: str) -> dict[str, dict[int, tuple[int, int]]]:
    """{guest BDF: {BAR index: (start, end)}} from `pyvmm --dry-run` output."""
    bars: dict[str, dict[int, tuple[int, int]]] = {}
    current: dict[int, tuple[int, int]] | None = None
    for line in out.splitlines():
        dev = re.match(r"^  ([0-9a-f]{4}:00:[0-9a-f]{2}\.0) --device ", line)
        if dev:
            current = bars.setdefault(dev.group(1), {})
            continue
        bar = re.match(r"^    (?:BAR(\d)|ROM) \(.*\) at \[0x([0-9a-f]+)-0x([0-9a-f]+)\]", line)
        if bar and current is not None:
            index = int(bar.group(1)) if bar.group(1) else 6
            current[index] = (int(bar.group(2), 16), int(bar.group(3), 16))
    return bars


def guest_bars(out: str) -> dict[str, dict[int, tuple[int, int]]]:
    bars: dict[str, dict[int, tuple[int, int]]] = {}
    lines = re.findall(r"^RES (\S+) (\d) (0x[0-9a-f]+) (0x[0-9a-f]+)$", out, re.MULTILINE)
    for bdf, index, start, end in lines:
        if int(start, 16):
            bars.setdefault(bdf, {})[int(index)] = (int(start, 16), int(end, 16))
    return bars


TWO_SEGMENTS = (
    "--platform num_pci_segments=2 --pci-segment pci_segment=0,mmio32_aperture_weight=2 "
    "--pci-segment pci_segment=1,mmio32_aperture_weight=1 "
    "--device path=/sys/bus/pci/devices/0000:00:03.0/,pci_segment=1,x_allow_no_reset=on"
)

SD_GUEST = (
    "modprobe mmc_block; i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-SD=$(sha256sum /dev/mmcblk0); " + GUEST_RESOURCES
)

SD_COMMAND = f"""
pyvmm-host bind 0000:00:03.0 >/dev/null
{PYVMM} {TWO_SEGMENTS} --cmdline x --dry-run; echo "DRY-STATUS=$?"
{PYVMM} {TWO_SEGMENTS} --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd="{SD_GUEST}"'
echo "PYVMM-STATUS=$?"
echo "WANT-SD=$PYVMM_LAB_SD_SHA256"
"""


def test_two_segments_2_to_1_with_the_sd_reader_on_segment_1(lab) -> None:
    out = lab(SD_COMMAND, devices="sd", timeout=110).stdout
    assert "DRY-STATUS=0" in out and "PYVMM-STATUS=0" in out and "PYVMM-GUEST-EXIT=0" in out, out
    assert "not where planned" not in out, out  # the builder placed every BAR where the plan said
    # Dry run: both segments' ECAM windows and the 2:1 split of the 32-bit area.
    assert "PCI segment 0: ECAM [0xe8000000-0xe80fffff]" in out, out
    assert "PCI segment 1: ECAM [0xe8100000-0xe81fffff]" in out, out
    assert "32-bit window [0xc0000000-0xdaaa9fff]" in out, out
    assert "32-bit window [0xdaaaa000-0xe7ffffff]" in out, out
    # The guest: a second root bus, the reader on it, read by sdhci-pci.
    assert re.search(r"^0001:00$", out, re.MULTILINE), out
    reader = re.search(r"^DRV (0001:00:[0-9a-f]{2}\.\d) \S*/sdhci-pci$", out, re.MULTILINE)
    assert reader, out
    want = re.search(r"^WANT-SD=(\w+)", out, re.MULTILINE)
    got = re.search(r"^GUEST-SD=(\w+)", out, re.MULTILINE)
    assert want and got and got.group(1) == want.group(1) != "", out
    assert re.search(r"^\s*c0000000-daaa9fff : PCI Bus 0000:00$", out, re.MULTILINE), out
    assert re.search(r"^\s*daaaa000-e7ffffff : PCI Bus 0001:00$", out, re.MULTILINE), out
    # The reader's BAR is where --dry-run said, inside segment 1's window.
    planned = dry_run_bars(out)
    seen = guest_bars(out)
    bdf = reader.group(1)
    assert planned[bdf] and seen[bdf] == planned[bdf], out
    assert all(start >= 0xDAAAA000 and end <= 0xE7FFFFFF for start, end in seen[bdf].values()), out


VGAS = " ".join(  # the displays have no reset
    f"path=/sys/bus/pci/devices/0000:00:0{n}.0/,pci_segment=1,x_allow_no_reset=on" for n in (3, 4, 5)
)
SIXTEEN = f"--platform num_pci_segments=16 --device {VGAS}"
WEIGHTED = f"{SIXTEEN} --pci-segment pci_segment=1,mmio32_aperture_weight=4"

VGA_COMMAND = f"""
for v in /sys/class/vtconsole/vtcon*; do  # fbcon leaves the displays' framebuffers (else they are in use)
  grep -q "frame buffer" $v/name 2>/dev/null && echo 0 > $v/bind
done
for f in 03 04 05; do pyvmm-host bind 0000:00:$f.0 >/dev/null; done
{PYVMM} {SIXTEEN} --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd="true"'; echo "REFUSED-STATUS=$?"
{PYVMM} {WEIGHTED} --cmdline x --dry-run; echo "DRY-STATUS=$?"
{PYVMM} {WEIGHTED} --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd="{GUEST_RESOURCES}"'
echo "PYVMM-STATUS=$?"
"""

SEGMENT1_WINDOW = (0xC21AF000, 0xCA86AFFF)  # 16 segments, weights 1, 4, 1, ... (docs/pci.md#aperture-weights)


def test_three_16m_displays_exhaust_segment_1_until_it_gets_weight_4(lab) -> None:
    out = lab(VGA_COMMAND, devices="vga16,vga16,vga16,sd", timeout=110).stdout
    # Refused before the guest starts, in one line with the remedy.
    assert "REFUSED-STATUS=2" in out, out
    refusal = next(line for line in out.splitlines() if "does not fit" in line)
    assert "--device path=/sys/bus/pci/devices/0000:00:04.0" in refusal, refusal
    assert "BAR0 (32-bit memory, 16 MiB)" in refusal and "PCI segment 1" in refusal, refusal
    assert "[0xc2800000-0xc4ffffff] (40 MiB; largest free 16 MiB-aligned range:" in refusal, refusal
    assert "--pci-segment pci_segment=1,mmio32_aperture_weight=" in refusal, refusal
    assert "pci_segment=" in refusal.split("mmio32_aperture_weight=", 1)[1], refusal
    assert "PYVMM-GUEST-EXIT" not in out.split("REFUSED-STATUS")[0], out
    # With weight 4 it boots; all three displays on segment 1, 16 MiB BARs inside its window, at the
    # addresses the dry run printed.
    assert "DRY-STATUS=0" in out and "PYVMM-STATUS=0" in out and "PYVMM-GUEST-EXIT=0" in out, out
    assert "not where planned" not in out, out  # the builder placed every BAR where the plan said
    planned = dry_run_bars(out)
    seen = guest_bars(out)
    displays = sorted(bdf for bdf in seen if bdf.startswith("0001:"))
    assert len(displays) == 3 and sorted(planned) == displays, out
    lo, hi = SEGMENT1_WINDOW
    for bdf in displays:
        assert seen[bdf] == planned[bdf], (bdf, seen[bdf], planned[bdf])
        start, end = seen[bdf][0]
        assert end - start + 1 == 16 << 20 and start >= lo and end <= hi, (bdf, hex(start))
