"""Pure logic of the lab: cpio packing, module metadata, device specs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from pyvmm.lab.assets import Manifest
from pyvmm.lab.cpio import CpioArchive, read_newc
from pyvmm.lab.devices import (
    CATALOGUE,
    DEFAULT_DEVICES,
    FIRST_DEVICE_SLOT,
    DeviceSpecError,
    parse_device_spec,
    qemu_device_args,
)
from pyvmm.lab.kmod import canonical, modinfo_fields
from pyvmm.lab.paths import AssetPaths
from pyvmm.lab.runner import Lab, LabOptions, default_lab_cpus


def test_cpio_roundtrip_keeps_modes_links_and_parents() -> None:
    a = CpioArchive()
    a.add_file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    a.add_symlink("sbin/x", "/bin/tool")
    a.add_file("etc/deep/nested/file", b"data")
    packed = a.pack()
    assert len(packed) % 512 == 0
    entries = read_newc(packed)
    assert entries["bin/tool"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n")
    assert entries["sbin/x"] == (stat.S_IFLNK | 0o777, b"/bin/tool")
    for d in ("bin", "sbin", "etc", "etc/deep", "etc/deep/nested"):
        assert stat.S_ISDIR(entries[d][0])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_cpio_archive_is_read_by_gnu_cpio(tmp_path) -> None:
    a = CpioArchive()
    a.add_file("a/b.txt", b"hello\n")
    a.add_symlink("a/link", "b.txt")
    proc = subprocess.run(["cpio", "-t", "-v"], input=a.pack(), capture_output=True, check=True)
    listing = proc.stdout.decode()
    assert "a/b.txt" in listing and "a/link -> b.txt" in listing


def test_modinfo_fields_are_found_in_a_module_image() -> None:
    blob = b"\x7fELF....\0license=GPL\0depends=vfio,irqbypass\0name=vfio_pci_core\0vermagic=6.1\0"
    assert modinfo_fields(blob) == {"depends": "vfio,irqbypass", "name": "vfio_pci_core"}
    assert canonical("snd-hda-intel") == "snd_hda_intel"


def test_device_spec_default_none_and_repeats() -> None:
    assert parse_device_spec(None) == list(DEFAULT_DEVICES)
    assert parse_device_spec("none") == []
    assert parse_device_spec("vga16,vga16,vga16") == ["vga16"] * 3
    with pytest.raises(DeviceSpecError, match="unknown lab device 'gpu'"):
        parse_device_spec("sd,gpu")


def test_every_catalogue_device_gets_its_own_slot() -> None:
    names = list(CATALOGUE)
    args = qemu_device_args(names, "/sd.img", "/nvme.img")
    assert list(args.slots.values()) == names
    assert min(args.slots) == FIRST_DEVICE_SLOT
    joined = " ".join(args.args)
    # The display and audio functions share one slot: that is what puts them in one IOMMU group.
    slot = next(s for s, n in args.slots.items() if n == "gpu-audio")
    assert f"addr={slot:#04x}.0,multifunction=on" in joined and f"addr={slot:#04x}.1" in joined
    assert "snapshot=on" in joined  # guests' writes never reach the cached images


def test_sd_port_puts_the_reader_alone_below_its_own_root_port() -> None:
    args = qemu_device_args(["sd-port", "sd", "sd-port"], "/sd.img", "/nvme.img")
    joined = " ".join(args.args)
    # Alone on the port's secondary bus the reader can be bus-reset; each has its own drive and chassis.
    assert "pcie-root-port,id=sdport0p,chassis=10,addr=0x03.0" in joined
    assert "sdhci-pci,id=sdport0,bus=sdport0p,addr=0x0" in joined
    assert "pcie-root-port,id=sdport1p,chassis=11,addr=0x05.0" in joined
    assert "sdhci-pci,id=sd0,addr=0x04.0" in joined
    drives = [a.split("id=")[1].split(",")[0] for a in args.args if a.startswith("file=")]
    assert drives == ["sdportimg0", "sdimg0", "sdportimg1"]


def test_too_many_devices_is_refused() -> None:
    with pytest.raises(DeviceSpecError, match="too many"):
        qemu_device_args(["edu"] * 40, "/sd", "/nv")


def test_lab_usage_errors_are_one_line_with_status_2(capsys) -> None:
    from pyvmm.lab.cli import main

    for argv, option in (
        (["run", "--stall-timeout", "0", "--", "true"], "--stall-timeout"),
        (["run", "--cpus", "9", "--", "true"], "--cpus"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pyvmm-lab: {option}") and err.count("\n") == 1, err


def test_lab_defaults_to_two_cpus_where_there_are_two_cores(monkeypatch) -> None:
    """A 4-vCPU guest needs more than one lab CPU (issue 17); never more lab CPUs than host cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert default_lab_cpus() == 2 and LabOptions().cpus == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_lab_cpus() == 1 and LabOptions().cpus == 1


def test_several_lab_cpus_run_on_several_host_threads(tmp_path) -> None:
    lab = object.__new__(Lab)
    lab.paths = AssetPaths(tmp_path)
    lab.manifest = Manifest("k", "6.1", "", "", "")
    argv = lab.qemu_argv(tmp_path, LabOptions(devices=[], cpus=2), interactive=False)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert argv[argv.index("-smp") + 1] == "2"


def test_the_labs_kvm_can_run_without_nested_paging(tmp_path) -> None:
    lab = object.__new__(Lab)
    lab.paths = AssetPaths(tmp_path)
    lab.manifest = Manifest("k", "6.1", "", "", "")
    default = lab.qemu_argv(tmp_path, LabOptions(devices=[]), interactive=False)
    assert "kvm_amd.npt" not in default[default.index("-append") + 1]
    argv = lab.qemu_argv(tmp_path, LabOptions(devices=[], npt=False), interactive=False)
    assert "kvm_amd.npt=0" in argv[argv.index("-append") + 1].split()
