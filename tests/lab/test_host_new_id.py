"""`bind --method new_id` on two identical NVMe drives, as the manual walkthrough does it, leaving no id
behind; and the lab's own virtio-9p root device refused as in use by the host (issue 4)."""

from __future__ import annotations

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

PRELUDE = lab_script(
    "",
    A="0000:00:03.0",
    B="0000:00:04.0",
)


NEW_ID = PRELUDE + r"""
sec native; echo "$(drv $A) $(drv $B)"; cat /sys/bus/pci/devices/$A/vendor /sys/bus/pci/devices/$B/device
sec bind; pyvmm-host bind -v --method new_id 00:03.0 00:04.0; echo "rc=$?"
sec bound; echo "$(drv $A) $(drv $B)"; leftover
sec restore; pyvmm-host restore --all; echo "rc=$?"
sec restored; echo "$(drv $A) $(drv $B)"; leftover
sec bystander
echo $B > /sys/bus/pci/drivers/nvme/unbind
pyvmm-host bind --method new_id 00:03.0; echo "rc=$?"
sec bystander-after; echo "$(drv $A) $(drv $B)"; leftover
sec ninep
pyvmm-host bind 00:02.0; echo "rc=$?"
pyvmm-host bind --method new_id --group 00:02.0; echo "rc=$?"
sec alive; drv 0000:00:02.0; test -r "$PYVMM_LAB_CWD/pyproject.toml" && echo root-fs-ok
"""


def test_new_id_binds_identical_devices_and_removes_the_id(lab) -> None:
    proc = lab(NEW_ID, devices="nvme,nvme")
    out = sections(proc.stdout)
    assert proc.returncode == 0, proc.stdout
    assert out["native"].splitlines()[0] == "nvme nvme"

    # The walkthrough's steps in its order: unbind, new_id, unbind + bind for the twin, then remove_id.
    steps = [line[2:] for line in out["bind"].splitlines() if line.startswith("+ ")]
    assert steps == [
        "echo 0000:00:03.0 > /sys/bus/pci/drivers/nvme/unbind",
        "echo '1b36 0010' > /sys/bus/pci/drivers/vfio-pci/new_id",
        "echo 0000:00:04.0 > /sys/bus/pci/drivers/nvme/unbind",
        "echo 0000:00:04.0 > /sys/bus/pci/drivers/vfio-pci/bind",
        "echo '1b36 0010' > /sys/bus/pci/drivers/vfio-pci/remove_id",
    ], out["bind"]
    assert "rc=0" in out["bind"]
    assert out["bound"].splitlines() == ["vfio-pci vfio-pci", "no-id-left"]

    assert "rc=0" in out["restore"]
    assert out["restored"].splitlines() == ["nvme nvme", "no-id-left"]

    # An unbound twin is captured by new_id too: pyvmm releases it and says so.
    bystander = out["bystander"]
    assert "rc=0" in bystander and "0000:00:04.0: new_id bound it to vfio-pci too" in bystander, bystander
    assert out["bystander-after"].splitlines() == ["vfio-pci none", "no-id-left"]

    # The lab's own root filesystem device is refused, whatever the method, and the lab lives on.
    ninep = out["ninep"].splitlines()
    assert ninep[1] == ninep[3] == "rc=1", out["ninep"]
    for refusal in (ninep[0], ninep[2]):
        assert "0000:00:02.0: in use by the host" in refusal and "'hostroot'" in refusal
    assert out["alive"].splitlines() == ["virtio-pci", "root-fs-ok"]
