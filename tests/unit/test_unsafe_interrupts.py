"""`pyvmm --device` on a host without interrupt remapping: refused unless --platform
allow_unsafe_interrupts=on, whoever set vfio_iommu_type1's parameter (issue 19). Fake /proc and /sys files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm import irq_remapping
from pyvmm.config import parse_platform
from pyvmm.errors import ExitStatus, UsageError
from pyvmm.vmm import check_interrupt_isolation

REMAPPED = "  24:  0  0  IR-PCI-MSI 1048576-edge  nvme0q0\n"
PLAIN = "  24:  0  0  PCI-MSI 1048576-edge  nvme0q0\n"


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """host(interrupts_text, parameter or None): fake /proc/interrupts, /sys/kernel/irq and the parameter."""
    irq = tmp_path / "irq"
    irq.mkdir()
    monkeypatch.setattr(irq_remapping, "PROC_INTERRUPTS", tmp_path / "interrupts")
    monkeypatch.setattr(irq_remapping, "SYS_IRQ", irq)
    monkeypatch.setattr(irq_remapping, "UNSAFE_INTERRUPTS_PARAM", tmp_path / "allow_unsafe_interrupts")

    def make(interrupts: str, parameter: str | None) -> None:
        (tmp_path / "interrupts").write_text(interrupts)
        if parameter is not None:
            (tmp_path / "allow_unsafe_interrupts").write_text(parameter + "\n")

    return make


def test_remapping_is_seen_in_proc_interrupts_or_sys_kernel_irq(host, tmp_path: Path) -> None:
    host(REMAPPED, None)
    assert irq_remapping.interrupt_remapping()
    host(PLAIN, None)
    assert not irq_remapping.interrupt_remapping()
    (tmp_path / "irq" / "24").mkdir()
    (tmp_path / "irq" / "24" / "chip_name").write_text("IR-PCI-MSI-0000:00:03.0\n")
    assert irq_remapping.interrupt_remapping()


@pytest.mark.parametrize(("value", "on"), [("Y", True), ("1", True), ("N", False), (None, False)])
def test_the_parameter_is_read_as_the_kernel_writes_it(host, value: str | None, on: bool) -> None:
    host(PLAIN, value)
    assert irq_remapping.unsafe_interrupts_allowed() is on


@pytest.mark.parametrize("parameter", ["Y", "N", None])
def test_a_host_with_remapping_needs_nothing(host, parameter: str | None) -> None:
    host(REMAPPED, parameter)
    check_interrupt_isolation(False)


def test_a_parameter_someone_else_set_is_refused_naming_the_opt_in(host) -> None:
    host(PLAIN, "Y")
    with pytest.raises(UsageError) as err:
        check_interrupt_isolation(False)
    message = str(err.value)
    assert message.startswith("--device: no interrupt remapping on this host: vfio_iommu_type1 "
                              "allow_unsafe_interrupts is on (set outside pyvmm), but pyvmm still refuses")
    assert message.endswith("accept the risk with --platform allow_unsafe_interrupts=on")
    assert "\n" not in message and err.value.exit_status is ExitStatus.USAGE


def test_without_the_parameter_it_is_refused_too(host) -> None:
    host(PLAIN, "N")
    with pytest.raises(UsageError, match=r"VFIO refuses the devices.*--platform allow_unsafe_interrupts=on"):
        check_interrupt_isolation(False)


@pytest.mark.parametrize("parameter", ["Y", "N", None])
def test_the_opt_in_lets_it_start(host, parameter: str | None) -> None:
    host(PLAIN, parameter)
    check_interrupt_isolation(True)


def test_the_opt_in_is_a_platform_toggle_off_by_default() -> None:
    assert not parse_platform("num_pci_segments=1").allow_unsafe_interrupts
    assert parse_platform("allow_unsafe_interrupts=on").allow_unsafe_interrupts
    assert not parse_platform("allow_unsafe_interrupts=off").allow_unsafe_interrupts
