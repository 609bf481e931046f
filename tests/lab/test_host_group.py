"""pyvmm-host and IOMMU groups on the lab's display + HDMI-audio pair (issue 4)."""

from __future__ import annotations

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

PRELUDE = lab_script(
    "",
    VGA="0000:00:03.0",
    AUDIO="0000:00:03.1",
)


GROUP = PRELUDE + r"""
release_fbcon
sec native; echo "$(drv $VGA) $(drv $AUDIO)"
sec alone; pyvmm-host bind 00:03.0 2>&1; echo "rc=$?"
sec after-refusal; echo "$(drv $VGA) $(drv $AUDIO)"
sec group; pyvmm-host bind --group 00:03.0; echo "rc=$?"
sec grouped; echo "$(drv $VGA) $(drv $AUDIO)"
g=$(basename "$(readlink /sys/bus/pci/devices/$VGA/iommu_group)"); test -c "/dev/vfio/$g" && echo node-ok
sec restore; pyvmm-host restore --all; echo "rc=$?"
sec restored; echo "$(drv $VGA) $(drv $AUDIO)"; ls /run/pyvmm
sec restore-again; pyvmm-host restore --all; echo "rc=$?"
"""


def test_display_alone_is_refused_and_the_group_goes_together(lab) -> None:
    proc = lab(GROUP, devices="gpu-audio")
    out = sections(proc.stdout)
    assert proc.returncode == 0, proc.stdout
    native = out["native"].split()
    assert native[1] == "snd_hda_intel", out["native"]

    # Alone: refused, naming the audio function and its driver; nothing changed.
    refusal = out["alone"].splitlines()
    assert refusal[-1] == "rc=1" and len(refusal) == 2, out["alone"]
    assert "0000:00:03.1" in refusal[0] and "snd_hda_intel" in refusal[0] and "--group" in refusal[0]
    assert out["after-refusal"].split() == native

    # With --group both functions are on vfio-pci and the group's node exists.
    assert "rc=0" in out["group"], out["group"]
    for bdf in ("0000:00:03.0", "0000:00:03.1"):
        assert f"{bdf}: bound to vfio-pci" in out["group"]
    assert out["grouped"].splitlines() == ["vfio-pci vfio-pci", "node-ok"]

    # restore --all puts both back on the drivers they had, and empties the journal.
    assert "rc=0" in out["restore"]
    assert out["restored"].split()[:2] == native and "host-journal.json" not in out["restored"]
    assert "nothing to restore" in out["restore-again"] and "rc=0" in out["restore-again"]
