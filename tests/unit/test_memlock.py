"""pyvmm's checks before it opens anything when it may run unprivileged: RLIMIT_MEMLOCK against the guest
RAM VFIO will pin, and managed=on without root."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm import memlock, vmm
from pyvmm.config import DeviceConfig, MemoryConfig, VmConfig
from pyvmm.errors import UsageError

MiB = 1 << 20


def _limits(monkeypatch: pytest.MonkeyPatch, limit: int | None, capable: bool) -> None:
    monkeypatch.setattr(memlock, "memlock_limit", lambda: limit)
    monkeypatch.setattr(memlock, "can_lock_memory", lambda: capable)


def test_a_limit_below_guest_ram_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _limits(monkeypatch, 8 * MiB, capable=False)
    with pytest.raises(UsageError) as e:
        memlock.check_vfio_pinning(512 * MiB)
    message = str(e.value)
    assert "\n" not in message and e.value.exit_status == 2
    assert message.startswith("--device: VFIO pins all guest RAM (512 MiB) but RLIMIT_MEMLOCK allows 8 MiB")
    assert "`ulimit -l 524288`" in message and "LimitMEMLOCK=536870912" in message


@pytest.mark.parametrize(("limit", "capable"), [(512 * MiB, False), (None, False), (8 * MiB, True)])
def test_enough_unlimited_or_capable_passes(monkeypatch: pytest.MonkeyPatch, limit: int | None,
                                            capable: bool) -> None:
    _limits(monkeypatch, limit, capable)
    memlock.check_vfio_pinning(512 * MiB)


def test_managed_without_root_is_refused_before_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    _limits(monkeypatch, 8 * MiB, capable=False)
    monkeypatch.setattr(vmm.os, "geteuid", lambda: 1000)
    sd = Path("/sys/bus/pci/devices/0000:00:03.0/")
    managed = VmConfig(devices=(DeviceConfig(sd, managed=True),))
    with pytest.raises(UsageError, match=r"managed=on: binding a device to vfio-pci .* needs root"):
        vmm.check_unprivileged(managed)
    with pytest.raises(UsageError, match="RLIMIT_MEMLOCK"):
        vmm.check_unprivileged(VmConfig(devices=(DeviceConfig(sd),), memory=MemoryConfig(size=256 * MiB)))
