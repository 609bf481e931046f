"""Which functions a bind takes, from plain function data: --group expansion and partial-group refusal."""

from __future__ import annotations

import pytest

from pyvmm.host.bdf import parse_bdf
from pyvmm.host.errors import RefusedError
from pyvmm.host.pciids import PciIds
from pyvmm.host.selection import select_targets
from pyvmm.host.sysfs import PciFunction

DB = PciIds(subclasses={(0x04, 0x03): "Audio device", (0x06, 0x01): "ISA bridge", (0x03, 0x00): "VGA"})


def fn(bdf: str, driver: str | None, klass: int, group: int | None, header: int = 0) -> PciFunction:
    return PciFunction(
        bdf=parse_bdf(bdf), vendor_id=0x1234, device_id=0x1111, subsystem_vendor_id=0, subsystem_device_id=0,
        class_code=klass, revision=0, header_type=header, driver=driver, driver_override=None,
        iommu_group=group, sysfs_path=f"/sys/devices/pci0000:00/{bdf}",
    )


DISPLAY = fn("0000:00:04.0", "bochs-drm", 0x030000, 3)
AUDIO = fn("0000:00:04.1", "snd_hda_intel", 0x040300, 3)
NVME = fn("0000:00:05.0", "nvme", 0x010802, 4)
LPC = fn("0000:00:1f.0", "lpc_ich", 0x060100, 7)
SATA = fn("0000:00:1f.2", "ahci", 0x010601, 7)
SMBUS = fn("0000:00:1f.3", "i801_smbus", 0x0C0500, 7)
NO_GROUP = fn("0000:00:06.0", "e1000e", 0x020000, None)
ALL = [DISPLAY, AUDIO, NVME, LPC, SATA, SMBUS, NO_GROUP]


def bdfs(*functions: PciFunction) -> list:
    return [f.bdf for f in functions]


def test_a_lone_device_is_taken_alone() -> None:
    assert select_targets(bdfs(NVME), ALL, False, DB) == [NVME]


def test_a_partial_group_is_refused_naming_what_is_missing() -> None:
    with pytest.raises(RefusedError) as err:
        select_targets(bdfs(DISPLAY), ALL, False, DB)
    message = str(err.value)
    assert "0000:00:04.1 (Audio device, driver snd_hda_intel)" in message and "--group" in message


def test_naming_every_member_is_as_good_as_group() -> None:
    assert select_targets(bdfs(DISPLAY, AUDIO), ALL, False, DB) == [DISPLAY, AUDIO]


def test_group_takes_every_endpoint() -> None:
    assert select_targets(bdfs(AUDIO), ALL, True, DB) == [AUDIO, DISPLAY]


def test_group_with_a_driven_bridge_is_refused() -> None:
    with pytest.raises(RefusedError, match=r"bridge 0000:00:1f\.0"):
        select_targets(bdfs(SATA), ALL, True, DB)


def test_bridges_and_ungrouped_devices_are_refused() -> None:
    with pytest.raises(RefusedError, match="is a bridge"):
        select_targets(bdfs(LPC), ALL, True, DB)
    with pytest.raises(RefusedError, match="no IOMMU group"):
        select_targets(bdfs(NO_GROUP), ALL, False, DB)


def test_already_unbound_members_do_not_need_naming() -> None:
    idle_audio = fn("0000:00:04.1", None, 0x040300, 3)
    assert select_targets(bdfs(DISPLAY), [DISPLAY, idle_audio], False, DB) == [DISPLAY]
