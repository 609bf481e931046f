"""`check`, `list --json`, `groups --json`, `--dry-run` and in-use detection on every lab device (issue 4)."""

from __future__ import annotations

import json

import pytest
from helpers.lab_script import sections

pytestmark = pytest.mark.lab

PRELUDE = r"""
sec() { echo "=== $1"; }
drv() { l=$(readlink "/sys/bus/pci/devices/$1/driver") && basename "$l" || echo none; }
snapshot() {
  for d in /sys/bus/pci/devices/*; do b=$(basename $d); echo "$b $(drv $b) $(cat $d/driver_override)"; done
}
release_fbcon() {  # the host's text console leaves the framebuffers, so a display is no longer in use
  for v in /sys/class/vtconsole/vtcon*; do
    grep -q "frame buffer" "$v/name" 2>/dev/null && echo 0 > "$v/bind"
  done
  true
}
release_fbcon  # the display would be in use while it shows the console (tests/lab/test_host_sd.py)
"""


def json_and_status(text: str) -> tuple[object, str]:
    body, status = text.rsplit("\n", 1)
    return json.loads(body), status


CHECK = PRELUDE + r"""
sec check; pyvmm-host check --json; echo "rc=$?"
sec list; pyvmm-host list --json; echo "rc=$?"
sec list-text; pyvmm-host list; echo "rc=$?"
sec groups; pyvmm-host groups --json; echo "rc=$?"
sec before; snapshot
sec dry
pyvmm-host bind --dry-run --group 00:04.0 00:03.0 00:05.0 00:07.0; echo "rc=$?"
pyvmm-host bind --dry-run --method new_id 00:06.0; echo "rc=$?"
pyvmm-host restore --dry-run --all; echo "rc=$?"
sec after; snapshot; ls /run/pyvmm 2>&1 | grep -c journal
sec in-use
i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
modprobe ext4; mkfs.ext4 -q -F /dev/nvme0n1 && mkdir -p "$TMPDIR/m" && mount /dev/nvme0n1 "$TMPDIR/m"
mkswap /dev/mmcblk0 >/dev/null && swapon /dev/mmcblk0
busybox ip link set eth0 up  # busybox-static is a project dependency; iproute2 is not
pyvmm-host check --json 00:03.0 00:05.0 00:06.0; echo "rc=$?"
sec refused; pyvmm-host bind 00:05.0; echo "rc=$?"; drv 0000:00:05.0
sec forced
pyvmm-host bind 00:06.0 --force; echo "rc=$?"
pyvmm-host unbind 00:06.0 >/dev/null; drv 0000:00:06.0
sec memlock
ulimit -l 64
# Root without CAP_IPC_LOCK (dropped from the bounding set) is held to RLIMIT_MEMLOCK like any user.
setpriv --inh-caps=-ipc_lock --bounding-set=-ipc_lock pyvmm-host check --json --memory 512M 00:07.0
echo "rc=$?"
sec memlock-root; pyvmm-host check --memory 512M 00:07.0; echo "rc=$?"
"""

EXPECTED_VERDICTS = {
    "0000:00:00.0": "bridge",  # host bridge
    "0000:00:02.0": "in-use",  # the lab's own 9p root filesystem
    "0000:00:03.0": "ok",  # SD reader
    "0000:00:04.0": "group",  # display: its audio function is on snd_hda_intel
    "0000:00:04.1": "group",
    "0000:00:05.0": "ok",  # NVMe
    "0000:00:06.0": "ok",  # NIC, link down
    "0000:00:07.0": "ok",  # edu, no driver
    "0000:00:1f.0": "bridge",  # ICH9 LPC (ISA bridge)
    "0000:00:1f.2": "shared",  # SATA and SMBus share their group with the LPC bridge
    "0000:00:1f.3": "shared",
}


def test_check_list_groups_dry_run_and_in_use(lab) -> None:
    proc = lab(CHECK, timeout=600)
    out = sections(proc.stdout)
    assert proc.returncode == 0, proc.stdout

    # check: one verdict per device, each blocker with its fix; exit 1 because some are blocked.
    checked, status = json_and_status(out["check"])
    assert status == "rc=1"
    assert {d["bdf"]: d["verdict"] for d in checked} == EXPECTED_VERDICTS
    by_bdf = {d["bdf"]: d for d in checked}
    display = by_bdf["0000:00:04.0"]["findings"]
    assert any("0000:00:04.1" in f["message"] and "snd_hda_intel" in f["message"] and "--group" in f["fix"]
               for f in display)
    ninep = by_bdf["0000:00:02.0"]["findings"]
    assert any(f["problem"] == "in-use" and "'hostroot'" in f["message"] for f in ninep)
    assert all(f["fix"] for d in checked for f in d["findings"])

    # list --json: the fields the issue asks for, names from pci.ids, ids alone when it has none.
    listed, status = json_and_status(out["list"])
    assert status == "rc=0" and {d["bdf"] for d in listed} == set(EXPECTED_VERDICTS)
    sd = next(d for d in listed if d["bdf"] == "0000:00:03.0")
    assert sd["class_name"] == "SD Host controller" and sd["vendor_name"] == "Red Hat, Inc."
    assert sd["device_name"] == "PCI SD Card Host Controller Interface"
    ids = (sd["ids"], sd["vendor_id"], sd["device_id"], sd["driver"])
    assert ids == ("1b36:0007", "1b36", "0007", "sdhci-pci")
    assert sd["revision"] == "00" and isinstance(sd["iommu_group"], int) and sd["verdict"] == "ok"
    edu = next(d for d in listed if d["bdf"] == "0000:00:07.0")
    assert edu["ids"] == "1234:11e8" and edu["driver"] is None and edu["class_name"] == "Unclassified device"
    assert {d["bdf"]: d["verdict"] for d in listed} == EXPECTED_VERDICTS
    text = out["list-text"].splitlines()
    assert text[0].split()[:6] == ["DEVICE", "IDS", "REV", "DRIVER", "GROUP", "VERDICT"]
    audio = next(line for line in text if line.startswith("0000:00:04.1"))
    assert "snd_hda_intel" in audio and " group " in audio

    # groups --json: the display and audio functions share one group with their drivers.
    groups, status = json_and_status(out["groups"])
    assert status == "rc=0"
    pair = next(g for g in groups if any(m["bdf"] == "0000:00:04.0" for m in g["devices"]))
    assert [(m["bdf"], m["driver"]) for m in pair["devices"]][1] == ("0000:00:04.1", "snd_hda_intel")
    assert pair["viable"] is False and isinstance(pair["group"], int)

    # --dry-run prints the exact writes and leaves every driver link (and override) as it was.
    dry = out["dry"].splitlines()
    assert "echo vfio-pci > /sys/bus/pci/devices/0000:00:04.1/driver_override" in dry
    assert "echo 0000:00:04.1 > /sys/bus/pci/drivers/snd_hda_intel/unbind" in dry
    assert "echo 0000:00:05.0 > /sys/bus/pci/drivers/nvme/unbind" in dry
    assert "echo '8086 10d3' > /sys/bus/pci/drivers/vfio-pci/new_id" in dry
    assert "echo '8086 10d3' > /sys/bus/pci/drivers/vfio-pci/remove_id" in dry
    assert dry.count("rc=0") == 3 and "0000:00:07.0: would be bound to vfio-pci (was no driver)" in dry
    after = out["after"].splitlines()
    assert after[:-1] == out["before"].splitlines() and after[-1] == "0"

    # In use: a mounted filesystem, swap, and an up interface under the function are each named.
    used, status = json_and_status(out["in-use"])
    uses = {d["bdf"]: " ".join(d["in_use"]) for d in used}
    assert {d["bdf"]: d["verdict"] for d in used} == dict.fromkeys(uses, "in-use")
    assert "nvme0n1 is mounted at" in uses["0000:00:05.0"]
    assert "/dev/mmcblk0 is in use as swap" in uses["0000:00:03.0"]
    assert "network interface eth0 is up" in uses["0000:00:06.0"]
    refused = out["refused"].splitlines()
    assert "0000:00:05.0: in use by the host: nvme0n1 is mounted at" in refused[0] and "--force" in refused[0]
    assert refused[1:] == ["rc=1", "nvme"]
    forced = out["forced"]
    assert "taken although in use by the host (--force)" in forced and "rc=0" in forced
    assert forced.splitlines()[-1] == "e1000e"

    # Memory locking: without CAP_IPC_LOCK a 64 KiB limit cannot hold a 512M guest; with it, it can.
    (memlock,), status = json_and_status(out["memlock"])
    assert status == "rc=1" and memlock["verdict"] == "memlock"
    finding = next(f for f in memlock["findings"] if f["problem"] == "memlock")
    assert "64K" in finding["message"] and "512M" in finding["message"] and "ulimit -l" in finding["fix"]
    assert "ok" in out["memlock-root"].splitlines()[0] and out["memlock-root"].endswith("rc=0")
