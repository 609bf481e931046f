"""A bind killed by SIGKILL mid-way leaves a journal from which `restore --all` recovers (issue 4).

The kill is placed exactly: a wrapper runs the real CLI with sysfs writes passing through unchanged,
and SIGKILLs its own process right after the write named in argv[1] has reached the kernel."""

from __future__ import annotations

import json

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

PRELUDE = lab_script(
    r"""
cat > "$TMPDIR/die_after.py" <<'PY'
import os, signal, sys
from pyvmm.host import sysfs
from pyvmm.host.cli import main

real_write, fatal = sysfs.write_attr, sys.argv[1]

def write_then_die(path, value):
    real_write(path, value)
    if path.endswith(fatal):
        os.kill(os.getpid(), signal.SIGKILL)

sysfs.write_attr = write_then_die
sys.exit(main(sys.argv[2:]))
PY
""",
    SD="0000:00:03.0",
    NVME="0000:00:04.0",
)


CRASH = PRELUDE + r"""
sec killed; python "$TMPDIR/die_after.py" /unbind bind 00:03.0; echo "rc=$?"
sec left; drv $SD; cat /sys/bus/pci/devices/$SD/driver_override
sec journal; cat /run/pyvmm/host-journal.json
sec restore; pyvmm-host restore --all; echo "rc=$?"
sec restored; drv $SD; cat /sys/bus/pci/devices/$SD/driver_override; ls /run/pyvmm
sec card
i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "read=$(sha256sum /dev/mmcblk0 | cut -d' ' -f1)"
echo "want=$PYVMM_LAB_SD_SHA256"
sec killed-new-id; python "$TMPDIR/die_after.py" /new_id bind --method new_id 00:04.0; echo "rc=$?"
sec left-new-id; drv $NVME; cat /run/pyvmm/host-journal.json
sec restore-new-id; pyvmm-host restore; echo "rc=$?"
sec restored-new-id; drv $NVME; leftover
"""


def test_sigkill_between_unbind_and_bind_is_recoverable(lab) -> None:
    proc = lab(CRASH, devices="sd,nvme")
    out = sections(proc.stdout)
    assert proc.returncode == 0, proc.stdout

    # Killed after the native driver let go and before vfio-pci took the device.
    assert out["killed"].splitlines()[-1] == "rc=137", out["killed"]
    assert out["left"].splitlines() == ["none", "vfio-pci"]
    journal = json.loads(out["journal"])
    assert [(d["bdf"], d["driver"], d["driver_override"]) for d in journal["devices"]] == [
        ("0000:00:03.0", "sdhci-pci", None)
    ]

    assert "rc=0" in out["restore"] and "given back to sdhci-pci" in out["restore"], out["restore"]
    restored = out["restored"].splitlines()
    assert restored[:2] == ["sdhci-pci", "(null)"] and "host-journal.json" not in out["restored"]
    card = dict(line.split("=", 1) for line in out["card"].splitlines())
    assert card["read"] == card["want"]

    # new_id: killed after the id went in, before remove_id; restore takes the id out again too.
    assert out["killed-new-id"].splitlines()[-1] == "rc=137", out["killed-new-id"]
    left = out["left-new-id"].splitlines()
    assert left[0] == "vfio-pci"
    state = json.loads("\n".join(left[1:]))
    assert state["new_ids"] == [{"driver": "vfio-pci", "vendor_id": "1b36", "device_id": "0010"}]
    assert "rc=0" in out["restore-new-id"] and "given back to nvme" in out["restore-new-id"]
    assert out["restored-new-id"].splitlines() == ["nvme", "no-id-left"]
