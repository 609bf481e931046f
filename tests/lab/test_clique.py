"""Issue 7 acceptance in the lab: the NVIDIA GPUDirect P2P clique capability
(docs/vfio.md#gpudirect-clique-capability) on the
NVMe drive as the guest reads it, and the two refusals (an id above 15; a device whose MSI capability
already covers 0xD4, the e1000e NIC)."""

from __future__ import annotations

import re

import pytest
from test_segments import dry_run_bars, guest_bars

pytestmark = pytest.mark.lab

PYVMM = (
    'pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" --cpus boot=1 '
    "--memory size=512M --serial tty --console off"
)
NVME = "path=/sys/bus/pci/devices/0000:00:03.0/"
NIC = "path=/sys/bus/pci/devices/0000:00:04.0/"

GUEST = (
    "i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-NVME=$(sha256sum /dev/nvme0n1); for d in /sys/bus/pci/devices/*; do "
    "echo CFG ${d##*/} $(readlink $d/driver) $(od -An -tx1 -v -N256 $d/config); n=0; "
    "while read s e f; do echo RES ${d##*/} $n $s $e; n=$((n+1)); done < $d/resource; done"
)
# The drive on segment 1: its 64-bit BAR in segment 1's 64-bit window, where --dry-run says.
ON_SEGMENT_1 = f"--platform num_pci_segments=2 --device {NVME},pci_segment=1,x_nv_gpudirect_clique=5"

COMMAND = f"""
pyvmm-host bind 0000:00:03.0 >/dev/null; pyvmm-host bind 0000:00:04.0 >/dev/null
{PYVMM} --device {NVME},x_nv_gpudirect_clique=16 --cmdline x; echo "ID16-STATUS=$?"
{PYVMM} --device {NIC},x_nv_gpudirect_clique=0 --cmdline x; echo "NIC-STATUS=$?"
{PYVMM} --device {NIC},x_nv_gpudirect_clique=0 --cmdline x --dry-run; echo "NIC-DRY-STATUS=$?"
{PYVMM} {ON_SEGMENT_1} --cmdline x --dry-run; echo "DRY-STATUS=$?"
{PYVMM} {ON_SEGMENT_1} --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd="{GUEST}"'
echo "PYVMM-STATUS=$?"
echo "WANT-NVME=$PYVMM_LAB_NVME_SHA256"
"""


def test_clique_5_on_the_nvme_and_the_refusals(lab) -> None:
    out = lab(COMMAND, devices="nvme,nic", timeout=110).stdout
    # Refusals, before any guest: the id has 4 bits; the NIC's MSI capability covers 0xD4-0xDB.
    assert "ID16-STATUS=2" in out and "x_nv_gpudirect_clique=16" in out, out
    assert "NIC-STATUS=2" in out and "NIC-DRY-STATUS=2" in out, out
    taken = "already used by the device's MSI capability at 0xd0"
    refusals = [line for line in out.splitlines() if taken in line]
    assert len(refusals) == 2 and all("0000:00:04.0" in line for line in refusals), out
    # The guest: nvme still drives the device and reads the drive exactly.
    assert "DRY-STATUS=0" in out and "PYVMM-STATUS=0" in out and "PYVMM-GUEST-EXIT=0" in out, out
    assert "not where planned" not in out, out  # the builder placed every BAR where the plan said
    want = re.search(r"^WANT-NVME=(\w+)", out, re.MULTILINE)
    got = re.search(r"^GUEST-NVME=(\w+)", out, re.MULTILINE)
    assert want and got and got.group(1) == want.group(1) != "", out
    planned, seen = dry_run_bars(out), guest_bars(out)
    assert list(planned) == ["0001:00:00.0"] and seen["0001:00:00.0"] == planned["0001:00:00.0"], out
    pattern = r"^PCI segment 1: .*\n.*\n  64-bit window \[0x([0-9a-f]+)-0x([0-9a-f]+)\]"
    window = re.search(pattern, out, re.MULTILINE)
    assert window, out
    start, end = seen["0001:00:00.0"][0]
    assert int(window.group(1), 16) <= start and end <= int(window.group(2), 16), out
    match = re.search(r"^CFG (0001:00:00.0) \S*/nvme ((?:[0-9a-f]{2} ?){256})$", out, re.MULTILINE)
    assert match, out
    config = bytes.fromhex(match.group(2).replace(" ", ""))
    # 8 bytes at 0xD4 exactly as docs/vfio.md#gpudirect-clique-capability lays them out for clique 5.
    assert config[0xD4:0xDC].hex(" ") == "09 00 08 50 32 50 28 00", config.hex(" ")
    # The capability list reaches 0xD4 from the previous last capability and ends there.
    chain = []
    ptr = config[0x34] & 0xFC
    while ptr and ptr not in chain:
        chain.append(ptr)
        ptr = config[ptr + 1] & 0xFC
    assert chain[-1] == 0xD4 and len(chain) >= 2, [hex(c) for c in chain]
    assert config[chain[-2] + 1] == 0xD4, [hex(c) for c in chain]
