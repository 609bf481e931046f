"""One id space for a VM's disks and passed-through functions, at boot and hot-plugged (pyvmm.device_ids)."""

from __future__ import annotations

import pytest

from pyvmm.device_ids import BootNames, DeviceIdError, DeviceIds, boot_ids


def test_boot_names_share_one_counter_and_skip_given_ids() -> None:
    ids, names = boot_ids([None, "data", None], device_ids=[None, "_vfio2", None, "gpu"])
    # _vfio2 was given: the generated name that would have had it skips it
    assert names.disks == ["_disk0", "data", "_disk1"]
    assert names.devices == ["_vfio3", "_vfio2", "_vfio4", "gpu"]
    # hot-plugged devices continue the same counter
    assert ids.new("_disk") == "_disk5" and ids.new("_vfio") == "_vfio6"
    ids.take("_disk7")  # a user's id that a generated name would have had
    assert ids.new("_disk") == "_disk8"


def test_boot_names_follow_cloud_hypervisors_creation_order() -> None:
    # disks, nets, fs, vsock, then passed-through functions: one counter
    _ids, names = boot_ids([None], [None, None], [None, "share"], [None], [None])
    assert names == BootNames(disks=["_disk0"], nets=["_net1", "_net2"], fs=["_fs3", "share"],
                              vsock=["_vsock4"], devices=["_vfio5"])


def test_user_ids_must_be_new_and_not_reserved() -> None:
    ids, _names = boot_ids(["data"], [])
    with pytest.raises(DeviceIdError, match="id data is already in use"):
        ids.take("data")
    with pytest.raises(DeviceIdError, match="id __rng is reserved"):
        ids.assign("_disk", "__rng")
    with pytest.raises(DeviceIdError, match="id x is already in use"):
        ids.check("x", also_taken=["x"])  # taken earlier in the same request
    ids.release("data")
    assert ids.assign("_disk", "data") == "data"


def test_a_refused_request_uses_up_nothing_and_removed_numbers_are_not_reused() -> None:
    ids = DeviceIds()
    assert ids.new("_disk") == "_disk0"
    mark = ids.mark()
    ids.new("_vfio")
    ids.take("extra")
    ids.rollback(mark)
    assert "extra" not in ids and ids.new("_vfio") == "_vfio1"
    ids.release("_disk0")
    assert "_disk0" not in ids and ids.new("_disk") == "_disk2"
