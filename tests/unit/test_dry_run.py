"""`pyvmm --dry-run`: validates everything, reads BAR sizes from sysfs, prints segments and BAR addresses,
refuses exhaustion with exit 2, and never opens KVM or VFIO."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_boot_bzimage import make_bzimage

from pyvmm import builder, cli, vfio, vmm, vmplan

VGA16_RESOURCE = (
    "0x00000000fd000000 0x00000000fdffffff 0x0000000000042208\n"
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x00000000febc9000 0x00000000febc9fff 0x0000000000040200\n"
    + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 4
)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage())
    return path


@pytest.fixture(autouse=True)
def no_kvm_no_vfio(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("--dry-run must not open KVM or VFIO")

    monkeypatch.setattr(builder, "Kvm", forbidden)
    monkeypatch.setattr(vfio, "attach_vfio_devices", forbidden)
    monkeypatch.setattr(vmm, "build_vm", forbidden)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\naddress sizes\t: 40 bits physical, 48 bits virtual\n")
    monkeypatch.setattr(vmplan, "CPUINFO", cpuinfo)


def display(tmp_path: Path, n: int) -> Path:
    d = tmp_path / f"0000:00:0{n}.0"
    d.mkdir()
    (d / "resource").write_text(VGA16_RESOURCE)
    config = bytearray(64)
    config[0:4] = bytes([0x34, 0x12, 0x11, 0x11])
    (d / "config").write_bytes(bytes(config))
    (d / "vendor").write_text("0x1234\n")
    return d


def args(kernel: Path, devices: list[Path], *extra: str) -> list[str]:
    dev = [f"path={d},pci_segment=1" for d in devices]
    platform = ["--platform", "num_pci_segments=16"]
    return ["--kernel", str(kernel), *platform, "--device", *dev, *extra, "--dry-run"]


def test_exhaustion_is_refused_with_exit_2(kernel: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    devices = [display(tmp_path, n) for n in (3, 4, 5)]
    assert cli.main(args(kernel, devices)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit in the 32-bit window of PCI segment 1" in err[0], err
    assert f"--device path={devices[1]}" in err[0] and "mmio32_aperture_weight=2" in err[0], err


def test_report_shows_segments_windows_and_bars(kernel: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    devices = [display(tmp_path, n) for n in (3, 4, 5)]
    argv = args(kernel, devices, "--pci-segment", "pci_segment=1,mmio32_aperture_weight=4",
                "--disk", f"path={kernel}")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "guest physical address bits: 40" in out
    assert out.count("PCI segment ") == 16
    assert "PCI segment 1: ECAM [0xe8100000-0xe81fffff]" in out
    assert "  32-bit window [0xc21af000-0xca86afff] 137968 KiB (134.73 MiB) (mmio32_aperture_weight=4)" in out
    assert f"  0001:00:00.0 --device path={devices[0]} (host 0000:00:03.0 1234:1111)" in out
    assert "    BAR0 (32-bit memory, 16 MiB) at [0xc9000000-0xc9ffffff] in the 32-bit window" in out
    # cloud-hypervisor's order on segment 0: the default virtio-console, the disk, the virtio-rng; the two
    # that are not boot-time disks get 64-bit BARs.
    segment0 = out.split("PCI segment 1:")[0]
    assert "  0000:00:01.0 --console (virtio-console)\n    BAR0 (64-bit memory, 512 KiB)" in segment0
    assert "  0000:00:03.0 --rng (virtio-rng)\n    BAR0 (64-bit memory, 512 KiB)" in segment0
    # The disk on segment 0 present at boot: a 32-bit BAR at the top of segment 0's window.
    assert f"  0000:00:02.0 --disk path={kernel} (virtio-blk)" in out
    assert "    BAR0 (32-bit memory, 512 KiB) at [0xc2180000-0xc21fffff]" not in out  # not beyond its window
    assert "    BAR0 (32-bit memory, 512 KiB) at [0xc2100000-0xc217ffff] in the 32-bit window" in out
    assert "note:" in out and "not root" not in out.split("note:")[0]


def test_other_usage_errors_still_exit_2(kernel: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    device = f"path={display(tmp_path, 3)},pci_segment=1"
    assert cli.main(["--kernel", str(kernel), "--device", device, "--dry-run"]) == 2
    assert "Invalid PCI segment id: 1" in capsys.readouterr().err


def test_console_placement_keys_and_the_rng_slot() -> None:
    """--console id/pci_segment/pci_device_id place the virtio-console; the rng takes segment 0's lowest
    free slot after the disks; --console off takes no slot."""
    from pyvmm.config import parse_vm_config
    from pyvmm.vmplan import vm_plan

    config = parse_vm_config(["--kernel", "k", "--platform", "num_pci_segments=2",
                              "--console", "tty,id=con0,pci_segment=1,pci_device_id=7",
                              "--disk", "path=/d.img"])
    plan = vm_plan(config, 40)
    where = {d.item.label: d.bdf for d in plan.devices}
    assert where["--console"] == "0001:00:07.0"
    assert where["--disk path=/d.img"] == "0000:00:01.0" and where["--rng"] == "0000:00:02.0"
    off = vm_plan(parse_vm_config(["--kernel", "k", "--console", "off"]), 40)
    assert [(d.item.label, d.bdf) for d in off.devices] == [("--rng", "0000:00:01.0")]
