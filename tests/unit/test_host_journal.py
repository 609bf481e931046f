"""The journal format and its durable, first-record-wins bookkeeping (a plain file, no sysfs)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pyvmm.host.errors import HostError
from pyvmm.host.journal import (
    JOURNAL_NAME,
    LOCK_NAME,
    TMP_NAME,
    BindMethod,
    DeviceRecord,
    Journal,
    JournalState,
    NewIdRecord,
    NodeRecord,
    ParamRecord,
    read_state,
)

SD = DeviceRecord("0000:00:03.0", "sdhci-pci", None, "1b36:0007", BindMethod.DRIVER_OVERRIDE)
NVME_ID = NewIdRecord("vfio-pci", 0x1B36, 0x0010)
UNSAFE = ParamRecord("vfio_iommu_type1", "allow_unsafe_interrupts", "N")


def test_round_trip() -> None:
    state = JournalState({SD.bdf: SD}, [NVME_ID], [UNSAFE])
    again = JournalState.from_text(state.to_text())
    assert again == state
    doc = json.loads(state.to_text())
    assert doc["format"] == "pyvmm-host-journal" and doc["version"] == 1
    assert doc["new_ids"] == [{"driver": "vfio-pci", "vendor_id": "1b36", "device_id": "0010"}]


def test_group_nodes_round_trip_and_an_older_journal_has_none() -> None:
    node = NodeRecord("12", 0, 0, 0o600)
    state = JournalState({SD.bdf: SD}, nodes={"12": node})
    assert JournalState.from_text(state.to_text()) == state
    assert json.loads(state.to_text())["nodes"] == [{"group": "12", "uid": 0, "gid": 0, "mode": 0o600}]
    older = json.loads(JournalState({SD.bdf: SD}).to_text())
    del older["nodes"]  # written before `bind --owner` existed
    assert JournalState.from_text(json.dumps(older)).nodes == {}
    assert not JournalState(nodes={"12": node}).empty  # a handed-over node keeps the journal


def test_a_node_record_is_journalled_and_forgotten(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    with Journal(directory) as journal:
        journal.record_node(NodeRecord("7", 0, 0, 0o600))
        journal.record_node(NodeRecord("7", 1000, 1000, 0o666))  # the first record is the original
    assert read_state(directory).nodes == {"7": NodeRecord("7", 0, 0, 0o600)}
    with Journal(directory) as journal:
        journal.forget_node("7")
    assert not (directory / JOURNAL_NAME).exists()


def test_new_id_line_is_what_new_id_takes() -> None:
    assert NVME_ID.line == "1b36 0010"


def test_unloaded_module_records_none() -> None:
    state = JournalState(params=[ParamRecord("vfio_iommu_type1", "allow_unsafe_interrupts", None)])
    assert JournalState.from_text(state.to_text()).params[0].original is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "not JSON"),
        ('{"format": "other"}', "not a pyvmm-host journal"),
        ('{"format": "pyvmm-host-journal", "version": 9}', "version 9"),
        ('{"format": "pyvmm-host-journal", "version": 1, "devices": [{"bdf": "x"}], "new_ids": [], '
         '"params": []}', "malformed"),
    ],
)
def test_damaged_documents_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        JournalState.from_text(text)


def test_every_record_is_on_disk_before_the_call_returns(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        journal.record_device(SD)
        assert read_state(tmp_path).devices == {SD.bdf: SD}
        journal.record_new_id(NVME_ID)
        assert read_state(tmp_path).new_ids == [NVME_ID]
        journal.record_param(UNSAFE)
        assert read_state(tmp_path).params == [UNSAFE]
    assert not (tmp_path / "host-journal.tmp").exists()


def test_first_record_of_a_device_wins(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        journal.record_device(SD)
        journal.record_device(DeviceRecord(SD.bdf, "vfio-pci", "vfio-pci", SD.ids, BindMethod.NEW_ID))
        journal.record_param(UNSAFE)
        journal.record_param(ParamRecord(UNSAFE.module, UNSAFE.name, "Y"))
    state = read_state(tmp_path)
    assert state.devices[SD.bdf] == SD
    assert state.params == [UNSAFE]


def test_an_emptied_journal_leaves_no_file(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        journal.record_device(SD)
        journal.record_new_id(NVME_ID)
        journal.forget_new_id(NVME_ID)
        journal.forget_device(SD.bdf)
    assert not (tmp_path / JOURNAL_NAME).exists()
    assert read_state(tmp_path).empty


def test_a_second_opening_sees_the_first_ones_records(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        journal.record_device(SD)
    with Journal(tmp_path) as journal:
        assert journal.state.devices == {SD.bdf: SD}


def test_a_damaged_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_text("garbage")
    with pytest.raises(HostError, match=r"damaged.*repair or remove it") as err:
        read_state(tmp_path)
    assert "\n" not in str(err.value)


# ---- the directory and its files are pyvmm-host's alone (issue 19) -----------------------------------------


def _journal_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pyvmm"
    directory.mkdir(mode=0o700)
    return directory


def _one_line_refusal(directory: Path, match: str) -> str:
    with pytest.raises(HostError, match=match) as err, Journal(directory):
        pass
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_missing_directory_is_created_0700_and_a_read_creates_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "pyvmm"
    assert read_state(directory).empty and not directory.exists()
    with Journal(directory) as journal:
        journal.record_device(SD)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / JOURNAL_NAME).stat().st_mode) == 0o600


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = _journal_dir(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    message = _one_line_refusal(link, "is a symbolic link")
    assert message == (f"journal directory {link} is a symbolic link: remove it "
                       "(pyvmm-host creates a real directory)")
    with pytest.raises(HostError, match="symbolic link"):
        read_state(link)
    assert list(real.iterdir()) == []  # not even the lock was made through the link


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    directory.chmod(0o777)
    message = _one_line_refusal(directory, "writable by group or others")
    assert f"(mode 0777): check its files, then `chmod go-w {directory}`" in message
    directory.chmod(0o750)
    with Journal(directory):
        pass


def test_a_file_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pyvmm"
    path.write_text("")
    _one_line_refusal(path, "is not a directory: move it out of the way")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_directory_or_file_of_another_user_is_refused(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    os.chown(directory, 65534, 65534)
    _one_line_refusal(directory, r"owned by uid 65534, not root")
    os.chown(directory, 0, 0)
    (directory / JOURNAL_NAME).write_text(JournalState({SD.bdf: SD}).to_text())
    os.chown(directory / JOURNAL_NAME, 65534, 65534)
    message = _one_line_refusal(directory, "owned by uid 65534")
    assert message.startswith(f"journal file {directory / JOURNAL_NAME} is owned by uid 65534")


@pytest.mark.parametrize("name", [JOURNAL_NAME, LOCK_NAME])
def test_a_symlinked_journal_or_lock_file_is_refused(tmp_path: Path, name: str) -> None:
    directory = _journal_dir(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    (directory / name).symlink_to(target)
    message = _one_line_refusal(directory, "is a symbolic link")
    assert message == f"journal file {directory / name} is a symbolic link: remove it"
    assert target.read_text() == "precious\n"


def test_a_planted_temporary_file_is_replaced_not_written_through(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    (directory / TMP_NAME).symlink_to(target)
    with Journal(directory) as journal:
        journal.record_device(SD)
    assert target.read_text() == "precious\n"
    assert read_state(directory).devices == {SD.bdf: SD}


def test_the_lock_excludes_a_second_process_and_gives_up_in_one_line(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    with Journal(directory):
        with pytest.raises(HostError, match=r"another pyvmm process has held .*host.lock for 0 s") as err, \
                Journal(directory, lock_wait=0.1):
            pass
        assert "\n" not in str(err.value)
    with Journal(directory, lock_wait=0.1):
        pass


def _doc(**device: object) -> str:
    record = {"bdf": SD.bdf, "driver": SD.driver, "driver_override": None, "ids": SD.ids,
              "method": "driver_override", **device}
    return json.dumps({"format": "pyvmm-host-journal", "version": 1, "devices": [record], "new_ids": [],
                       "params": []})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bdf", "../../../../tmp/x"),
        ("bdf", "00:03.0"),  # a spelling users type, never what pyvmm writes
        ("bdf", "0000:00:03.0/../../../kernel"),
        ("driver", "../../../../module/x"),
        ("driver", "sdhci/pci"),
        ("driver", ".."),
        ("driver", ""),
        ("driver", 7),
        ("driver_override", "vfio-pci\nsdhci-pci"),
        ("ids", "1b36:0007/x"),
    ],
)
def test_tampered_device_fields_are_refused(tmp_path: Path, field: str, value: object) -> None:
    directory = _journal_dir(tmp_path)
    (directory / JOURNAL_NAME).write_text(_doc(**{field: value}))
    message = _one_line_refusal(directory, r"is damaged: malformed entry.*; repair or remove it by hand$")
    assert field.split("_")[0] in message


@pytest.mark.parametrize(
    "entry",
    [
        {"new_ids": [{"driver": "../vfio-pci", "vendor_id": "1b36", "device_id": "0010"}]},
        {"new_ids": [{"driver": "vfio-pci", "vendor_id": "1b36 0010\n", "device_id": "0010"}]},
        {"params": [{"module": "../../kernel", "name": "x", "original": "N"}]},
        {"params": [{"module": "vfio_iommu_type1", "name": "../../uevent", "original": "N"}]},
        {"params": [{"module": "vfio_iommu_type1", "name": "allow_unsafe_interrupts", "original": "N\nY"}]},
        {"nodes": [{"group": "../../etc/shadow", "uid": 0, "gid": 0, "mode": 384}]},
        {"nodes": [{"group": "12", "uid": "0", "gid": 0, "mode": 384}]},
        {"nodes": [{"group": "12", "uid": 0, "gid": -1, "mode": 384}]},
        {"nodes": [{"group": "12", "uid": 0, "gid": 0, "mode": 0o104755}]},
    ],
)
def test_tampered_id_and_parameter_fields_are_refused(tmp_path: Path, entry: dict[str, object]) -> None:
    directory = _journal_dir(tmp_path)
    doc = {"format": "pyvmm-host-journal", "version": 1, "devices": [], "new_ids": [], "params": [], **entry}
    (directory / JOURNAL_NAME).write_text(json.dumps(doc))
    _one_line_refusal(directory, r"is damaged: malformed entry")


def test_what_pyvmm_writes_it_reads_back_and_what_it_could_not_it_does_not_write(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    odd = DeviceRecord(SD.bdf, "sdhci-pci", "some driver", SD.ids, BindMethod.DRIVER_OVERRIDE)
    with Journal(directory) as journal:
        journal.record_device(DeviceRecord("10000:00:03.0", None, None, SD.ids, BindMethod.NEW_ID))  # VMD
        unusual = "unusual host state: malformed entry: driver_override 'some driver' is not a plain"
        with pytest.raises(HostError, match=unusual):
            journal.record_device(odd)
        assert list(journal.state.devices) == ["10000:00:03.0"]  # memory and disk agree
    assert list(read_state(directory).devices) == ["10000:00:03.0"]
