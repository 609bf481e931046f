"""pyvmm-host on the lab's SD card reader: bind to vfio-pci, give back, the card still reads the same;
idempotence, DEVICE spellings and the journal on the real kernel (issue 4)."""

from __future__ import annotations

import json

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

PRELUDE = lab_script(
    "",
    SD="0000:00:03.0",
)


SD_ROUND_TRIP = PRELUDE + r"""
sec bind; pyvmm-host bind /sys/bus/pci/devices/$SD/; echo "rc=$?"
sec bound
drv $SD
g=$(basename "$(readlink /sys/bus/pci/devices/$SD/iommu_group)")
test -c "/dev/vfio/$g" && echo "vfio-node=/dev/vfio/$g"
sec journal; cat /run/pyvmm/host-journal.json
sec again; pyvmm-host bind 00:03.0; echo "rc=$?"
sec unbind; pyvmm-host unbind 00:03.0; echo "rc=$?"
sec given-back; drv $SD; cat /sys/bus/pci/devices/$SD/driver_override; ls /run/pyvmm
sec card
i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "read=$(sha256sum /dev/mmcblk0 | cut -d' ' -f1)"
echo "want=$PYVMM_LAB_SD_SHA256"
sec unbind-again; pyvmm-host unbind $SD; echo "rc=$?"
sec unknown; pyvmm-host bind 00:1e.0; echo "rc=$?"
"""


def test_sd_reader_goes_to_vfio_and_comes_back_reading_the_same(lab) -> None:
    proc = lab(SD_ROUND_TRIP, devices="sd")
    out = sections(proc.stdout)
    assert proc.returncode == 0, proc.stdout

    # Bound (spelled as a sysfs path with its trailing slash), verified, group node present.
    assert "rc=0" in out["bind"] and "0000:00:03.0: bound to vfio-pci (was sdhci-pci)" in out["bind"]
    bound = out["bound"].splitlines()
    assert bound[0] == "vfio-pci" and bound[1].startswith("vfio-node=/dev/vfio/"), out["bound"]

    # The journal recorded the original state before the change.
    journal = json.loads(out["journal"])
    assert journal["devices"] == [{
        "bdf": "0000:00:03.0", "driver": "sdhci-pci", "driver_override": None, "ids": "1b36:0007",
        "method": "driver_override",
    }]

    # Binding a bound device is a no-op that says so (spelled short this time).
    assert "rc=0" in out["again"] and "already bound to vfio-pci, nothing to do" in out["again"]

    # unbind gives it back to sdhci-pci, clears the override, empties the journal.
    assert "rc=0" in out["unbind"] and "given back to sdhci-pci" in out["unbind"]
    back = out["given-back"].splitlines()
    assert back[0] == "sdhci-pci" and back[1] == "(null)" and "host-journal.json" not in out["given-back"]

    # The card behind the reader reads exactly as before.
    lines = dict(line.split("=", 1) for line in out["card"].splitlines())
    assert lines["read"] == lines["want"] and len(lines["want"]) == 64

    assert "rc=0" in out["unbind-again"] and "not bound to vfio-pci, nothing to do" in out["unbind-again"]
    unknown = out["unknown"].splitlines()
    assert unknown == ["pyvmm-host: 00:1e.0: no such PCI device (see `pyvmm-host list`)", "rc=2"]
