"""pyvmm-host scans and checks only under the journal's lock, and refuses a host without interrupt remapping
unless told (issue 19). Plain data and stubs: no sysfs."""

from __future__ import annotations

import dataclasses
import fcntl
import os
from pathlib import Path

import pytest

from pyvmm.host import binding, hostfacts, restoring, sysfs
from pyvmm.host.bdf import parse_bdf
from pyvmm.host.errors import HostError, RefusedError
from pyvmm.host.hostfacts import HostFacts
from pyvmm.host.journal import LOCK_NAME
from pyvmm.host.modules import ModuleState
from pyvmm.host.sysfs import PciFunction

SD = parse_bdf("0000:00:03.0")
HOST = HostFacts(
    iommu=True, vfio_pci=ModuleState.LOADED, vfio_iommu_type1=ModuleState.LOADED, interrupt_remapping=True,
    unsafe_interrupts_allowed=False, memlock_limit=None, can_lock_memory=True,
)
NO_REMAPPING = dataclasses.replace(HOST, interrupt_remapping=False)


class Stop(HostError):
    """Ends the operation once the stub has seen what it wanted."""


def _locked_by_someone(directory: Path) -> bool:
    """Another open file description of the lock cannot take it: the caller holds it."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_bind_scans_only_under_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def scan() -> list[PciFunction]:
        seen.append(_locked_by_someone(tmp_path))
        raise Stop("scanned")

    monkeypatch.setattr(sysfs, "resolve_all", lambda devices: [SD])
    monkeypatch.setattr(sysfs, "scan", scan)
    with pytest.raises(Stop):
        binding.bind_to_vfio([str(SD)], journal_dir=tmp_path)
    assert seen == [True]
    assert not _locked_by_someone(tmp_path)  # and let go on the way out


def test_restore_resolves_only_under_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def resolve(name: str) -> object:
        seen.append(_locked_by_someone(tmp_path))
        raise Stop("resolved")

    monkeypatch.setattr(sysfs, "resolve", resolve)
    with pytest.raises(Stop):
        restoring.unbind([str(SD)], journal_dir=tmp_path)
    assert seen == [True]


def test_no_interrupt_remapping_is_refused_in_one_line_naming_the_flag() -> None:
    with pytest.raises(RefusedError) as err:
        binding._check_interrupt_isolation(NO_REMAPPING, allow_unsafe_interrupts=False)
    message = str(err.value)
    assert "\n" not in message and message.endswith("accept the risk with --allow-unsafe-interrupts")
    assert message.startswith("no interrupt remapping on this host: ")
    assert err.value.exit_status == 1


def test_a_parameter_someone_else_set_is_no_consent() -> None:
    someone = dataclasses.replace(NO_REMAPPING, unsafe_interrupts_allowed=True)
    with pytest.raises(RefusedError, match=r"allow_unsafe_interrupts is already on, set by someone else\)"):
        binding._check_interrupt_isolation(someone, allow_unsafe_interrupts=False)


def test_the_flag_or_remapping_lets_bind_go_on() -> None:
    assert binding._check_interrupt_isolation(HOST, allow_unsafe_interrupts=False) == []
    [warning] = binding._check_interrupt_isolation(NO_REMAPPING, allow_unsafe_interrupts=True)
    assert "--allow-unsafe-interrupts" in warning and "not isolated" in warning


def test_bind_refuses_before_it_changes_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    function = PciFunction(
        bdf=SD, vendor_id=0x1B36, device_id=0x7, subsystem_vendor_id=0, subsystem_device_id=0,
        class_code=0x080501, revision=1, header_type=0, driver="sdhci-pci", driver_override=None,
        iommu_group=3, sysfs_path="/sys/devices/pci0000:00/0000:00:03.0",
    )
    monkeypatch.setattr(sysfs, "resolve_all", lambda devices: [SD])
    monkeypatch.setattr(sysfs, "scan", lambda: [function])
    monkeypatch.setattr(binding, "select_targets", lambda requested, functions, group, db: [function])
    monkeypatch.setattr(binding, "host_uses", lambda path: [])
    monkeypatch.setattr(hostfacts, "gather", lambda: NO_REMAPPING)

    def no_write(path: str, value: str) -> None:
        raise AssertionError(f"wrote {value!r} to {path}")

    monkeypatch.setattr(sysfs, "write_attr", no_write)
    with pytest.raises(RefusedError, match="--allow-unsafe-interrupts"):
        binding.bind_to_vfio([str(SD)], journal_dir=tmp_path)
    assert not (tmp_path / "host-journal.json").exists()
