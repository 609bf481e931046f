"""Issue 5's note: the guest's sequential NVMe read speed under pyvmm and under QEMU's vfio-pci, in one lab.

The guest reads the whole 64 MiB drive with `dd bs=1M iflag=direct` several times; the lab timestamps the
console lines around each read as they arrive (busybox dd prints no timing), and an empty pair of lines
between reads measures what the console itself costs (pyvmm's serial port is emulated in Python). In the
suite this is a smoke run of the measurement (no test asserts a time): it checks that every read reached the
drive under both VMMs and prints the figures; bench/ runs the real comparison."""

from __future__ import annotations

import re
import statistics

import pytest

pytestmark = pytest.mark.lab

READS = 2
MIB64 = 64 << 20

SCRIPT = r"""
NV=0000:00:03.0
pyvmm-host bind $NV >/dev/null || exit 1
W='i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done'
DD='echo NL-START; echo NL-END; echo DD-START; dd if=/dev/nvme0n1 of=/dev/null bs=1M iflag=direct 2>/dev/null'
DD="$DD; echo DD-END"
CMD="$W; S=/sys/block/nvme0n1/stat; cat \$S; for i in $(seq -s " " @READS@); do $DD; done; cat \$S"
ts() { python3 -u -c '
import sys, time
for l in sys.stdin: print(f"{time.monotonic():.4f} {l}", end="")'; }
echo "== pyvmm"
K=$PYVMM_GUEST_KERNEL; I=$PYVMM_GUEST_INITRAMFS
timeout 150 pyvmm --kernel $K --initramfs $I --cpus boot=1 --memory size=512M \
  --serial tty --console off --device path=/sys/bus/pci/devices/$NV/ \
  --cmdline "console=ttyS0 quiet panic=-1 pyvmm.cmd=\"$CMD\"" 2>&1 | ts
echo "== qemu"
timeout 150 qemu-system-x86_64 -enable-kvm -M q35 -cpu host -m 512 -nodefaults -nographic -no-reboot \
  -serial stdio \
  -kernel $K -initrd $I -device vfio-pci,host=$NV \
  -append "console=ttyS0 quiet panic=-1 pyvmm.cmd=\"$CMD\"" 2>&1 | ts
echo "== end"
pyvmm-host unbind $NV >/dev/null
""".replace("@READS@", str(READS))


def _measure(section: str) -> tuple[float, list[float]]:
    """(median MB/s, every read's MB/s) from the timestamped console lines of one VMM's run."""
    spans: dict[str, list[float]] = {"NL": [], "DD": []}
    start: float | None = None
    for stamp, tag, edge in re.findall(r"^(\d+\.\d+) (NL|DD)-(START|END)\r?$", section, re.MULTILINE):
        if edge == "START":
            start = float(stamp)
        elif start is not None:
            spans[tag].append(float(stamp) - start)
            start = None
    assert len(spans["DD"]) == READS and len(spans["NL"]) == READS, section
    console = statistics.median(spans["NL"])
    rates = [MIB64 / max(t - console, 1e-3) / 1e6 for t in spans["DD"]]
    stats = [line for line in section.splitlines() if re.match(r"^\S+\s+\d+\s+0\s+\d+\s", line)]
    sectors = [int(line.split()[3]) for line in stats]  # /sys/block/nvme0n1/stat: sectors read
    assert sectors and sectors[-1] - sectors[0] == READS * MIB64 // 512, section  # every read hit the drive
    return statistics.median(rates), rates


def test_nvme_sequential_read_pyvmm_and_qemu(lab) -> None:
    out = lab(SCRIPT, devices="nvme", timeout=400).stdout
    assert "== end" in out, out
    pyvmm = out.split("== pyvmm\n", 1)[1].split("== qemu\n", 1)[0]
    qemu = out.split("== qemu\n", 1)[1].split("== end", 1)[0]
    ours, our_reads = _measure(pyvmm)
    theirs, their_reads = _measure(qemu)
    report = (f"guest NVMe sequential read (dd bs=1M iflag=direct, 64 MiB, median of {READS}): "
              f"pyvmm {ours:.0f} MB/s {[round(r) for r in our_reads]}, "
              f"QEMU vfio-pci {theirs:.0f} MB/s {[round(r) for r in their_reads]}")
    print(report)
    assert ours > 0 and theirs > 0, report
