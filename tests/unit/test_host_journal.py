"""The journal format and its durable, first-record-wins bookkeeping (a plain file, no sysfs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyvmm.host.errors import HostError
from pyvmm.host.journal import (
    JOURNAL_NAME,
    BindMethod,
    DeviceRecord,
    Journal,
    JournalState,
    NewIdRecord,
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
