"""The reset decision of pyvmm.vfio.reset (function reset, else a bus reset only when every affected group is
this VM's) against a stand-in for the device fd's ioctls; the lab shows the real kernel's answers
(tests/lab/test_vfio_guest.py)."""

from __future__ import annotations

import ctypes
import errno

import pytest

from pyvmm.ioctl import IoctlError
from pyvmm.vfio import reset as r
from pyvmm.vfio.bindings import VfioDeviceFlag, VfioIoctl, VfioPciIoctl

FLAGS = VfioDeviceFlag.VFIO_DEVICE_FLAGS_PCI
RESET = FLAGS | VfioDeviceFlag.VFIO_DEVICE_FLAGS_RESET


class StandIn:
    """Answers the reset ioctls like vfio-pci would for a device whose bus reset touches `dependents`."""

    def __init__(self, dependents: list[tuple[int, int, int, int]] | None, fail: set[int] = frozenset()):
        self.dependents = dependents  # (group, segment, bus, devfn); None: no bus reset (ENODEV)
        self.fail = fail
        self.calls: list[tuple[str, object]] = []

    def __call__(self, fd: int, request: int, arg: object = None) -> int:
        if request in self.fail:
            raise IoctlError(errno.EIO, "failed")
        if request == VfioIoctl.VFIO_DEVICE_RESET:
            self.calls.append(("reset", None))
        elif request == VfioPciIoctl.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO:
            if self.dependents is None:
                raise IoctlError(errno.ENODEV, "no bus reset")
            assert isinstance(arg, ctypes.Structure)
            arg.count = len(self.dependents)  # type: ignore[attr-defined]
            room = (arg.argsz - ctypes.sizeof(r.vfio_pci_hot_reset_info)) // 8  # type: ignore[attr-defined]
            if room < len(self.dependents):
                raise IoctlError(errno.ENOSPC, "too small")
            for i, (group, segment, bus, devfn) in enumerate(self.dependents):
                d = arg.devices[i]  # type: ignore[attr-defined]
                d.group_id, d.segment, d.bus, d.devfn = group, segment, bus, devfn
        elif request == VfioPciIoctl.VFIO_DEVICE_PCI_HOT_RESET:
            fds = list(arg.group_fds[: arg.count])  # type: ignore[attr-defined]
            self.calls.append(("hot_reset", fds))
        return 0


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch):
    def make(dependents=None, fail=frozenset()) -> StandIn:
        stand_in = StandIn(dependents, set(fail))
        monkeypatch.setattr(r, "ioctl", stand_in)
        return stand_in

    return make


def test_a_function_reset_is_used_when_offered(device) -> None:
    dev = device()
    result = r.reset_function(3, RESET, {})
    assert result.kind is r.ResetKind.FUNCTION and dev.calls == [("reset", None)]


def test_without_function_or_bus_reset_nothing_is_done_and_the_reasons_are_given(device) -> None:
    dev = device(dependents=None)
    result = r.reset_function(3, FLAGS, {7: 70})
    assert not result.done and dev.calls == []
    assert result.tried == ("no function reset", "no bus reset: No such device")


def test_a_bus_reset_needs_every_affected_group(device) -> None:
    dev = device(dependents=[(7, 0, 1, 0), (8, 0, 1, 1)])
    result = r.reset_function(3, FLAGS, {7: 70})
    assert not result.done and dev.calls == []
    assert result.tried[-1] == "a bus reset would also reset IOMMU group 8, not given to this guest"
    result = r.reset_function(3, FLAGS, {7: 70, 8: 80, 9: 90})
    assert result.kind is r.ResetKind.BUS and dev.calls == [("hot_reset", [70, 80])]
    assert result.also_reset == {r.PciFunctionAddress(0, 1, 0), r.PciFunctionAddress(0, 1, 1)}


def test_a_failed_function_reset_falls_back_to_the_bus(device) -> None:
    dev = device(dependents=[(7, 0, 2, 0)], fail={VfioIoctl.VFIO_DEVICE_RESET})
    result = r.reset_function(3, RESET, {7: 70})
    assert result.kind is r.ResetKind.BUS and result.tried == ("function reset failed: Input/output error",)
    assert dev.calls == [("hot_reset", [70])]


def test_a_failed_bus_reset_is_reported(device) -> None:
    device(dependents=[(7, 0, 2, 0)], fail={VfioPciIoctl.VFIO_DEVICE_PCI_HOT_RESET})
    result = r.reset_function(3, FLAGS, {7: 70})
    assert not result.done and result.tried[-1] == "bus reset failed: Input/output error"


def test_an_absurd_dependent_count_is_not_believed(device) -> None:
    device(dependents=[(7, 0, 2, 0)] * (r.MAX_DEPENDENT + 1))
    result = r.reset_function(3, FLAGS, {7: 70})
    assert not result.done and result.tried[-1].startswith("no bus reset: ")


def test_function_addresses_parse_only_the_kernels_spelling() -> None:
    address = r.PciFunctionAddress.parse("0000:01:1f.7")
    assert address == r.PciFunctionAddress(0, 1, (0x1F << 3) | 7) and str(address) == "0000:01:1f.7"
    for bad in ("01:00.0", "0000:01:00", "0000:01:00.8", "0000:01:20.0", "x", "0000:01:00.0/"):
        assert r.PciFunctionAddress.parse(bad) is None, bad
