"""Issue 9 soak: consecutive guests on the passed-through SD reader and NVMe drive in one lab session, with
no growth.

Each cycle boots a pyvmm guest given the lab's SD reader and NVMe drive (both bound to vfio-pci once, before
the first cycle); the guest's sdhci-pci reads the whole card and its nvme driver the whole drive (their
SHA-256s must equal $PYVMM_LAB_SD_SHA256 and $PYVMM_LAB_NVME_SHA256) and it powers off. While each guest
runs (after it has read both), the lab records pyvmm's open file descriptors, its VFIO ones (the container
and group nodes under /dev/vfio and the device fds), its locked and pinned memory (VmLck, VmPin), and the
lab's Mlocked; after each pyvmm exit, the lab's Mlocked again. The suite runs PYVMM_SOAK_CYCLES cycles
(default 3); `make soak` runs 50 (about 60 s a cycle, more under load).

Asserted: every cycle's guest read the card and the drive exactly and pyvmm exited 0; the figures of the
last cycle equal the first cycle's (no leaked descriptors, no vfio group held twice, no locked memory left
behind); after the last cycle both devices go back to their native drivers and the host reads them.
"""

from __future__ import annotations

import os
import re

import pytest

pytestmark = pytest.mark.lab

CYCLES = int(os.environ.get("PYVMM_SOAK_CYCLES", "3"))

GUEST = (
    "modprobe mmc_block; modprobe nvme; i=0; "
    "while { [ ! -b /dev/mmcblk0 ] || [ ! -b /dev/nvme0n1 ]; } && [ $i -lt 300 ]; do "
    "sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-SD=$(sha256sum /dev/mmcblk0 | cut -c1-64); "
    "echo GUEST-NVME=$(sha256sum /dev/nvme0n1 | cut -c1-64); sleep 2"
)

LAB = r"""
SD=; NVME=
for d in /sys/bus/pci/devices/*; do
  case "$(cat $d/vendor):$(cat $d/device)" in
    0x1b36:0x0007) SD=${d##*/};;
    0x1b36:0x0010) NVME=${d##*/};;
  esac
done
pyvmm-host bind "$SD" "$NVME" >/dev/null || echo BIND-FAILED
n=1
while [ $n -le @CYCLES@ ]; do
  pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" --cpus boot=1 --memory size=128M \
    --serial tty --console off \
    --device path=/sys/bus/pci/devices/$SD/,x_allow_no_reset=on --device path=/sys/bus/pci/devices/$NVME/ \
    --cmdline 'console=ttyS0 panic=-1 pyvmm.cmd="@GUEST@"' > /tmp/guest-$n.log 2>&1 &
  pid=$!
  i=0
  # (the kernel echoes its command line, which holds "GUEST-NVME=" too: wait for the digest itself)
  while ! grep -q 'GUEST-NVME=[0-9a-f]\{64\}' /tmp/guest-$n.log && kill -0 $pid 2>/dev/null \
        && [ $i -lt 1800 ]; do
    sleep 0.1; i=$((i + 1))
  done
  fds=$(ls /proc/$pid/fd | wc -l)
  vfio=$(ls -l /proc/$pid/fd | grep -c -e /dev/vfio/ -e 'anon_inode:\[vfio-device\]')
  lck=$(awk '/^VmLck/ {print $2}' /proc/$pid/status)
  pin=$(awk '/^VmPin/ {print $2}' /proc/$pid/status)
  mlocked=$(awk '/^Mlocked/ {print $2}' /proc/meminfo)
  wait $pid
  status=$?
  after=$(awk '/^Mlocked/ {print $2}' /proc/meminfo)
  sd=$(grep -o 'GUEST-SD=[0-9a-f]\{64\}' /tmp/guest-$n.log | head -1)
  nvme=$(grep -o 'GUEST-NVME=[0-9a-f]\{64\}' /tmp/guest-$n.log | head -1)
  echo "CYCLE $n status=$status $sd $nvme fds=$fds vfio=$vfio VmLck=$lck VmPin=$pin Mlocked=$mlocked" \
       "after_exit_Mlocked=$after"
  n=$((n + 1))
done
pyvmm-host unbind "$SD" "$NVME" >/dev/null || echo UNBIND-FAILED
l=$(readlink /sys/bus/pci/devices/$SD/driver) && echo "HOST-DRIVER-SD=${l##*/}"
l=$(readlink /sys/bus/pci/devices/$NVME/driver) && echo "HOST-DRIVER-NVME=${l##*/}"
i=0; while { [ ! -b /dev/mmcblk0 ] || [ ! -b /dev/nvme0n1 ]; } && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i + 1)); done
echo "HOST-SD=$(sha256sum /dev/mmcblk0 | cut -c1-64)"
echo "HOST-NVME=$(sha256sum /dev/nvme0n1 | cut -c1-64)"
echo "WANT-SD=$PYVMM_LAB_SD_SHA256"
echo "WANT-NVME=$PYVMM_LAB_NVME_SHA256"
"""

_CYCLE = re.compile(
    r"^CYCLE (\d+) status=(\d+) GUEST-SD=(\w*) GUEST-NVME=(\w*) fds=(\d+) vfio=(\d+) VmLck=(\d+) VmPin=(\d*) "
    r"Mlocked=(\d+) after_exit_Mlocked=(\d+)$",
    re.MULTILINE,
)


def test_soak_sd_reader_and_nvme(lab) -> None:
    command = LAB.replace("@CYCLES@", str(CYCLES)).replace("@GUEST@", GUEST)
    proc = lab(command, devices="sd,nvme", timeout=180 + 200 * CYCLES)
    out = proc.stdout
    assert "BIND-FAILED" not in out and "UNBIND-FAILED" not in out, out
    want_sd = re.search(r"^WANT-SD=(\w{64})$", out, re.MULTILINE)
    want_nvme = re.search(r"^WANT-NVME=(\w{64})$", out, re.MULTILINE)
    assert want_sd and want_nvme, out
    cycles = _CYCLE.findall(out)
    assert len(cycles) == CYCLES, out
    figures = []
    for n, status, sd, nvme, fds, vfio, lck, pin, mlocked, after in cycles:
        assert status == "0", f"cycle {n}:\n{out}"
        assert sd == want_sd.group(1) and nvme == want_nvme.group(1), f"cycle {n}:\n{out}"
        figures.append((int(fds), int(vfio), int(lck), pin, int(mlocked), int(after)))
    first, last = figures[0], figures[-1]
    print(
        "soak figures (fds, vfio fds, VmLck kB, VmPin kB, Mlocked kB, Mlocked after exit kB): "
        f"cycle 1 {first}, cycle {CYCLES} {last}"
    )
    # The container and the two groups (/dev/vfio/...) and the two device fds are open while the guest runs.
    assert first[1] == 5, out
    assert first[2] > 0 or (first[3] and int(first[3]) > 0), out  # VFIO pinned the guest's RAM
    assert last[:4] == first[:4], f"growth between cycle 1 and {CYCLES}: {first} -> {last}\n{out}"
    assert last[5] <= first[5], out  # nothing stays locked after pyvmm exits
    assert "HOST-DRIVER-SD=sdhci-pci" in out and "HOST-DRIVER-NVME=nvme" in out, out
    assert f"HOST-SD={want_sd.group(1)}" in out and f"HOST-NVME={want_nvme.group(1)}" in out, out
