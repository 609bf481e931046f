"""The host's requests for a device back (VFIO_PCI_REQ_IRQ_INDEX): the watcher over real eventfds, as the
kernel signals them, and restore of a journalled device that is gone from the host (issue 9)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pyvmm.host.errors import HostUsageError
from pyvmm.host.journal import BindMethod, DeviceRecord, Journal, read_state
from pyvmm.host.restoring import restore
from pyvmm.vfio.requests import DeviceRequests, removal_message

GONE = "0000:7e:1f.6"  # no host has this function (checked below)


def test_each_device_is_reported_once_by_name() -> None:
    calls: list[tuple[str, str]] = []
    second = threading.Event()

    def on_request(name: str, message: str) -> None:
        calls.append((name, message))
        if len(calls) == 2:
            second.set()

    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    requests = DeviceRequests(on_request)
    requests.add("0000:00:04.0", fds[0])
    requests.add("0000:00:05.0", fds[1])
    requests.start()
    try:
        for _ in range(3):  # the kernel repeats its request every 10 s until the device is released
            os.eventfd_write(fds[0], 1)
        os.eventfd_write(fds[1], 1)
        assert second.wait(30), calls
    finally:
        requests.close()
    assert sorted(calls) == [
        ("0000:00:04.0", removal_message("0000:00:04.0")),
        ("0000:00:05.0", removal_message("0000:00:05.0")),
    ]
    message = calls[0][1]
    assert "\n" not in message and message.startswith(calls[0][0] + ": ") and "stopped" in message
    for fd in fds:  # close() closed them
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_watcher_without_devices_starts_and_closes() -> None:
    requests = DeviceRequests(lambda name, message: None)
    requests.start()
    assert requests.watched == []
    requests.close()


def test_restore_forgets_a_journalled_device_gone_from_the_host(tmp_path: Path) -> None:
    assert not Path("/sys/bus/pci/devices", GONE).exists()
    with Journal(tmp_path) as journal:
        journal.record_device(DeviceRecord(GONE, "nvme", None, "1b36:0010", BindMethod.DRIVER_OVERRIDE))
    outcome = restore([GONE], journal_dir=tmp_path)
    [device] = outcome.devices
    assert str(device.bdf) == GONE and not device.changed and "gone from the host" in device.note
    assert read_state(tmp_path).devices == {}
    # A device neither on the host nor in the journal is still a mistake of the caller.
    with pytest.raises(HostUsageError, match="no such PCI device"):
        restore([GONE], journal_dir=tmp_path)


def test_restore_all_forgets_every_journalled_device_gone_from_the_host(tmp_path: Path) -> None:
    # (It used to stop with "dictionary changed size during iteration" when the first one was gone.)
    with Journal(tmp_path) as journal:
        for bdf in (GONE, "0000:7e:1f.7"):
            journal.record_device(DeviceRecord(bdf, "nvme", None, "1b36:0010", BindMethod.DRIVER_OVERRIDE))
    outcome = restore(None, journal_dir=tmp_path)
    assert outcome.devices == ()
    assert read_state(tmp_path).devices == {}
