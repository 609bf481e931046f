"""The reset decision of pyvmm.vfio.reset (function reset, else a bus reset only when every affected group is
this VM's) against a stand-in for the device fd's ioctls; the lab shows the real kernel's answers
(tests/lab/test_vfio_guest.py)."""

from __future__ import annotations

import ctypes
import errno

import pytest

from pyvmm.errors import ExitStatus
from pyvmm.ioctl import IoctlError
from pyvmm.pci_sysfs import Bdf
from pyvmm.vfio import passthrough as p
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
    assert result.also_reset == {Bdf(0, 1, 0, 0), Bdf(0, 1, 0, 1)}


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
    address = Bdf.from_name("0000:01:1f.7")
    assert address == Bdf(0, 1, 0x1F, 7) and str(address) == "0000:01:1f.7"
    for bad in ("01:00.0", "0000:01:00", "0000:01:00.8", "0000:01:20.0", "x", "0000:01:00.0/"):
        assert Bdf.from_name(bad) is None, bad


# ---- the policy: VfioPassthrough.reset --------------------------------------------------------------------



class Device:
    """What VfioPassthrough.reset reads of a VfioDevice."""

    def __init__(self, name: str, vendor: int = 0x1B36) -> None:
        self.name, self.fd, self.flags, self.vendor = name, 9, FLAGS, vendor

    def read_config(self, offset: int, size: int) -> int:
        assert (offset, size) == (0, 2)
        return self.vendor


def _passthrough(
    monkeypatch: pytest.MonkeyPatch, results: dict[str, r.ResetResult]
) -> tuple[p.VfioPassthrough, list[str]]:
    calls: list[str] = []

    def fake(fd: int, flags: VfioDeviceFlag, groups: dict[int, int]) -> r.ResetResult:
        name = next(iter(results))
        calls.append(name)
        return results.pop(name)

    monkeypatch.setattr(p, "reset_function", fake)
    return p.VfioPassthrough(None, None, None), calls  # type: ignore[arg-type]


NONE = r.ResetResult(None, ("no function reset", "no bus reset: No such device"))


def test_a_device_without_reset_is_refused_naming_the_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    vfio, _ = _passthrough(monkeypatch, {"0000:00:03.0": NONE})
    with pytest.raises(p.VfioResetError) as err:
        vfio.reset(Device("0000:00:03.0"))  # type: ignore[arg-type]
    assert str(err.value) == (
        "0000:00:03.0 cannot be reset (no function reset; no bus reset: No such device): what its last user "
        "left in it would reach the guest; add x_allow_no_reset=on to its --device to pass it through anyway "
        "(SECURITY.md)"
    )
    assert err.value.exit_status is ExitStatus.USAGE


def test_with_the_opt_in_it_is_used_and_said_once(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    vfio, calls = _passthrough(monkeypatch, {"0000:00:03.0": NONE})
    device = Device("0000:00:03.0")
    assert not vfio.reset(device, allow_no_reset=True).done  # type: ignore[arg-type]
    assert not vfio.reset(device, allow_no_reset=True).done  # type: ignore[arg-type]
    assert calls == ["0000:00:03.0"]
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert warnings == ["0000:00:03.0: not reset (no function reset; no bus reset: No such device); passed "
                        "through as it is (x_allow_no_reset=on)"]


def test_a_device_reading_all_ones_after_the_reset_is_refused_even_with_the_opt_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vfio, _ = _passthrough(monkeypatch, {"0000:00:04.0": r.ResetResult(r.ResetKind.FUNCTION)})
    with pytest.raises(p.VfioError, match=r"^0000:00:04.0: its config space reads all-ones after a function"):
        vfio.reset(Device("0000:00:04.0", vendor=0xFFFF), allow_no_reset=True)  # type: ignore[arg-type]


def test_a_function_a_bus_reset_covered_is_not_reset_again(monkeypatch: pytest.MonkeyPatch) -> None:
    covered = frozenset({Bdf(0, 1, 0, 0), Bdf(0, 1, 0, 1)})
    vfio, calls = _passthrough(monkeypatch, {"0000:01:00.0": r.ResetResult(r.ResetKind.BUS, (), covered)})
    assert vfio.reset(Device("0000:01:00.0")).kind is r.ResetKind.BUS  # type: ignore[arg-type]
    assert vfio.reset(Device("0000:01:00.1")).kind is r.ResetKind.BUS  # type: ignore[arg-type]
    assert calls == ["0000:01:00.0"]
