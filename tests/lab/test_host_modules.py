"""pyvmm-host loads vfio_iommu_type1 and vfio-pci when a host has not, and sets allow_unsafe_interrupts
only when asked: as a modprobe parameter when it loads the module, through /sys/module when the module
is already there; restore puts the parameter back (issue 4)."""

from __future__ import annotations

import json

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

PRELUDE = lab_script(
    r"""
param() { cat /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts 2>/dev/null || echo unloaded; }
""",
    EDU="0000:00:03.0",
)


MODULES = PRELUDE + r"""
sec unload; rmmod vfio_pci vfio_pci_core vfio_iommu_type1 && echo rc=0
test -d /sys/bus/pci/drivers/vfio-pci || echo no-vfio-driver; param
sec check; pyvmm-host check --json 00:03.0; echo "rc=$?"
sec dry; pyvmm-host bind --dry-run --allow-unsafe-interrupts 00:03.0; echo "rc=$?"; param
sec bind; pyvmm-host bind -v --allow-unsafe-interrupts 00:03.0; echo "rc=$?"
sec loaded; param; drv $EDU; cat /run/pyvmm/host-journal.json
sec restore; pyvmm-host restore -v; echo "rc=$?"
sec restored; param; drv $EDU
sec bind-loaded
pyvmm-host bind -v 00:03.0
pyvmm-host bind -v --allow-unsafe-interrupts 00:03.0; echo "rc=$?"
sec param-loaded; param; cat /run/pyvmm/host-journal.json
sec restore-loaded; pyvmm-host unbind 00:03.0; echo "rc=$?"; param; drv $EDU
"""


def test_modules_are_loaded_and_unsafe_interrupts_only_when_asked(lab) -> None:
    proc = lab(MODULES, devices="edu")
    out = sections(proc.stdout)
    assert proc.returncode == 0, proc.stdout
    assert out["unload"].splitlines() == ["rc=0", "no-vfio-driver", "unloaded"]

    # check: modules absent is a warning with its fix, not a blocker.
    check = out["check"]
    assert check.splitlines()[-1] == "rc=0"
    (info,) = json.loads(check.rsplit("\n", 1)[0])
    assert info["verdict"] == "ok"
    absent = [f for f in info["findings"] if f["problem"] == "vfio-not-loaded"]
    assert {f["severity"] for f in absent} == {"warning"} and len(absent) == 2
    assert any("modprobe vfio-pci" in f["fix"] for f in absent)

    # The dry run names the modprobe commands and changes nothing.
    assert out["dry"].splitlines()[:4] == [
        "modprobe vfio_iommu_type1 allow_unsafe_interrupts=1",
        "modprobe vfio-pci",
        "echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override",
        "echo 0000:00:03.0 > /sys/bus/pci/drivers_probe",
    ], out["dry"]
    assert out["dry"].splitlines()[-2:] == ["rc=0", "unloaded"]

    # The real bind loads them, the parameter given to modprobe; the journal says the module was absent.
    assert "+ modprobe vfio_iommu_type1 allow_unsafe_interrupts=1" in out["bind"] and "rc=0" in out["bind"]
    loaded = out["loaded"].splitlines()
    assert loaded[:2] == ["Y", "vfio-pci"]
    journal = json.loads("\n".join(loaded[2:]))
    assert journal["params"] == [
        {"module": "vfio_iommu_type1", "name": "allow_unsafe_interrupts", "original": None}
    ]

    # restore: the device is reprobed (it had no driver) and the parameter is off again.
    assert "+ echo N > /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts" in out["restore"]
    assert out["restored"].splitlines() == ["N", "none"]

    # Module already loaded: no parameter change without the flag; with it, a write to /sys/module.
    bind_loaded = out["bind-loaded"]
    assert "modprobe" not in bind_loaded
    assert bind_loaded.count("allow_unsafe_interrupts") == 1
    assert "+ echo 1 > /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts" in bind_loaded
    assert "already bound to vfio-pci" in bind_loaded
    param_loaded = out["param-loaded"].splitlines()
    assert param_loaded[0] == "Y"
    assert json.loads("\n".join(param_loaded[1:]))["params"][0]["original"] == "N"
    assert out["restore-loaded"].splitlines()[-2:] == ["N", "none"]
