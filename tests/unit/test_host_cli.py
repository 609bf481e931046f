"""Command-line surface that needs no host: usage errors, sizes, and how steps print."""

from __future__ import annotations

import pytest

from pyvmm.host.actions import Changer, Step
from pyvmm.host.cli import main
from pyvmm.host.errors import HostUsageError
from pyvmm.host.hostfacts import format_size, parse_size


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["bind"],
        ["unbind"],
        ["bind", "00:03.0", "--method", "magic"],
        ["list", "--colour"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyvmm-host")


def test_a_misspelt_device_is_exit_2_before_touching_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bind", "00:0x.0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "01:00.0, 0000:01:00.0 or /sys/bus/pci/devices/0000:01:00.0/" in err


def test_bad_memory_size_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--memory", "lots"]) == 2
    assert "--memory 'lots'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 << 20), ("2G", 2 << 30), ("size=1G", 1 << 30), ("4096", 4096), ("64K", 64 << 10)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "12m", "1.5G", "-1M", "M"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(HostUsageError):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (64 << 10, 512 << 20, 2 << 30)] == ["64K", "512M", "2G"]


def test_steps_print_as_the_shell_commands_they_equal() -> None:
    assert Step("x", path="/sys/bus/pci/drivers_probe", value="0000:00:03.0").shell() == (
        "echo 0000:00:03.0 > /sys/bus/pci/drivers_probe"
    )
    assert Step("x", path="/sys/bus/pci/drivers/vfio-pci/new_id", value="1b36 0010").shell() == (
        "echo '1b36 0010' > /sys/bus/pci/drivers/vfio-pci/new_id"
    )
    assert Step("x", path="/sys/bus/pci/devices/0000:00:03.0/driver_override", value="\n").shell() == (
        "echo > /sys/bus/pci/devices/0000:00:03.0/driver_override"
    )
    assert Step("x", argv=("modprobe", "vfio_iommu_type1", "allow_unsafe_interrupts=1")).shell() == (
        "modprobe vfio_iommu_type1 allow_unsafe_interrupts=1"
    )


def test_a_dry_run_changer_records_and_reports_but_does_not_write(tmp_path) -> None:
    target = tmp_path / "attr"
    seen: list[Step] = []
    changer = Changer(dry_run=True, on_step=seen.append)
    assert changer.write("dev", str(target), "vfio-pci") is None
    changer.run("mod", ["false"])
    assert not target.exists()
    assert [s.shell() for s in seen] == [f"echo vfio-pci > {target}", "false"]
    assert changer.steps == seen
