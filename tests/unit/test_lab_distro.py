"""The Debian systemd disk's recipe (lab/distro.py) on made-up trees: settings, module choice, the disk."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.lab import distro
from pyvmm.lab.kmod import ModuleTree


def test_release_codename_comes_from_os_release(tmp_path) -> None:
    path = tmp_path / "os-release"
    path.write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n')
    assert distro.release_codename(path) == "bookworm"
    path.write_text("ID=debian\n")
    with pytest.raises(distro.DistroBuildError, match="VERSION_CODENAME"):
        distro.release_codename(path)


def _debootstrapped(root: Path) -> None:
    """The parts of a debootstrap tree configure() touches."""
    for d in ("usr/share/doc/bash", "usr/share/man/man1", "usr/share/locale/de", "var/lib/apt/lists",
              "var/lib/dbus", "etc/systemd/system"):
        (root / d).mkdir(parents=True)
    (root / "usr/share/doc/bash/copyright").write_text("x")
    (root / "var/lib/apt/lists/deb.debian.org_Packages").write_text("x")
    (root / "etc/inputrc").write_text("set bell-style none\n")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")


def test_configure_gives_a_first_boot_tree_with_a_root_shell_on_serial_consoles(tmp_path) -> None:
    _debootstrapped(tmp_path)
    distro.configure(tmp_path)
    assert (tmp_path / "etc/machine-id").read_text() == ""  # systemd's first boot makes it
    assert not (tmp_path / "var/lib/dbus/machine-id").is_symlink()
    assert "/dev/vda1 / ext4 rw" in (tmp_path / "etc/fstab").read_text()
    assert (tmp_path / "etc/hostname").read_text() == "pyvmm-distro\n"
    getty = (tmp_path / "etc/systemd/system/serial-getty@.service.d/autologin.conf").read_text()
    assert "ExecStart=\n" in getty and "--autologin root" in getty
    firstboot = tmp_path / "etc/systemd/system/systemd-firstboot.service"
    assert firstboot.is_symlink() and str(firstboot.readlink()) == "/dev/null"
    inputrc = (tmp_path / "etc/inputrc").read_text()
    assert inputrc.startswith("set bell-style none\n") and "enable-bracketed-paste off" in inputrc
    for rel in ("etc/.updated", "var/.updated"):  # nothing for ConditionNeedsUpdate= units to do
        assert (tmp_path / rel).read_text().startswith("TIMESTAMP_NSEC="), rel
    for d in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/lib/apt/lists"):
        assert (tmp_path / d).is_dir() and not any((tmp_path / d).iterdir()), d


def _module(tree: ModuleTree, rel: str, depends: str = "") -> None:
    path = tree.moddir / "kernel" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.removesuffix(".ko")
    path.write_bytes(b"\x7fELF junk\0name=" + name.encode() + b"\0depends=" + depends.encode() + b"\0")


def test_module_selection_takes_the_directories_named_modules_and_their_dependencies(tmp_path,
                                                                                    monkeypatch) -> None:
    tree = ModuleTree(tmp_path, "6.1.0-test")
    _module(tree, "drivers/virtio/virtio_pci.ko", "virtio_ring")
    _module(tree, "drivers/virtio/virtio_ring.ko")
    _module(tree, "fs/autofs/autofs4.ko")
    _module(tree, "fs/btrfs/btrfs.ko", "libcrc32c")
    _module(tree, "lib/libcrc32c.ko")
    _module(tree, "drivers/gpu/drm/drm.ko")
    (tree.moddir / "modules.builtin").write_text("kernel/drivers/rtc/rtc-cmos.ko\n")
    monkeypatch.setattr(distro, "MODULE_DIRS", ["drivers/virtio"])
    monkeypatch.setattr(distro, "MODULES", ["btrfs", "rtc-cmos"])  # rtc-cmos: built in, nothing to copy
    chosen = sorted(p.name for p in distro.module_selection(tree))
    assert chosen == ["btrfs.ko", "libcrc32c.ko", "virtio_pci.ko", "virtio_ring.ko"]


@pytest.mark.skipif(not all(shutil.which(t) for t in ("sfdisk", "mkfs.ext4", "debugfs")),
                    reason="needs e2fsprogs and fdisk")
def test_make_disk_is_an_mbr_disk_with_the_tree_as_ext4_on_partition_1(tmp_path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("pyvmm-distro\n")
    (root / "big").write_bytes(b"x" * (3 << 20))
    disk = tmp_path / "disk.raw"
    distro.make_disk(root, disk, "pyvmm-distro")
    size = disk.stat().st_size
    # the tree, ext4's own room, the free space: nothing like the few hundred MiB a fixed size would be
    assert distro.FREE_SPACE < size < distro.FREE_SPACE + (24 << 20)
    table = subprocess.run(["sfdisk", "-d", str(disk)], capture_output=True, text=True, check=True).stdout
    assert "label: dos" in table and "start=        2048" in table and "type=83" in table
    image = f"{disk}?offset={distro.PART_OFFSET}"
    read = subprocess.run(["debugfs", "-R", "cat /etc/hostname", image], capture_output=True, text=True)
    assert read.stdout == "pyvmm-distro\n"
    # sparse: the free space takes no room on the host
    assert disk.stat().st_blocks * 512 < size // 2
