"""The Debian root disk with systemd (`PYVMM_GUEST_DISTRO_DISK`): what a cloud-hypervisor user boots.

debootstrap (minbase, plus systemd as init, udev, D-Bus and kmod) from the release this machine's apt uses,
the guest kernel's modules (a subset: what a virtual machine and the lab's devices need), a root shell on
every serial console, no documentation, then an MBR disk with the tree as ext4 on partition 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.lab.kmod import ModuleTree, run_depmod

MIRROR = "http://deb.debian.org/debian"
PACKAGES = ["systemd-sysv", "udev", "dbus", "kmod"]
HOSTNAME = "pyvmm-distro"

# Module directories (under kernel/) copied whole, then named modules; their dependencies come along.
# Enough for a virtual machine with virtio, the lab's devices (also when passed through) and the file
# systems and devices systemd asks for (autofs4 for binfmt_misc, fuse, loop, dm_mod, configfs); not the
# GPU, sound, wireless, SCSI and media drivers and the other file systems that make up most of the 390 MB.
MODULE_DIRS = [
    "arch", "crypto", "block", "mm", "virt", "fs/nls", "drivers/virtio", "drivers/block", "drivers/char",
    "drivers/mmc", "drivers/nvme", "drivers/tty", "drivers/acpi", "drivers/pci", "drivers/vfio",
]
MODULES = [
    "ext4", "vfat", "msdos", "isofs", "squashfs", "overlay", "fuse", "autofs4", "binfmt_misc", "efivarfs",
    "9p", "9pnet_virtio", "dm_mod", "evdev", "pcspkr", "serio_raw", "virtio_net", "e1000e", "af_packet",
    "vmw_vsock_virtio_transport", "snd-hda-intel", "crc32c_generic", "crc32c_intel",
]

# Written into the tree (path: content). Why each: the boot must reach multi-user without a prompt, a
# wait or a failed unit, and a test must get a shell on the serial console without a password.
FILES = {
    "etc/hostname": f"{HOSTNAME}\n",
    "etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\t\tlocalhost ip6-localhost\n",
    "etc/fstab": "# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/vda1 / ext4 rw 0 1\n",
    # Empty: systemd makes one at first boot (ConditionFirstBoot) and commits it to the disk.
    "etc/machine-id": "",
    # A root shell on every serial console (ttyS0, hvc0) without a password: a test image.
    "etc/systemd/system/serial-getty@.service.d/autologin.conf": (
        "[Service]\nExecStart=\n"
        "ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 - $TERM\n"
    ),
    "etc/dpkg/dpkg.cfg.d/01-pyvmm-nodoc": (
        "path-exclude=/usr/share/doc/*\npath-exclude=/usr/share/man/*\npath-exclude=/usr/share/info/*\n"
        "path-exclude=/usr/share/locale/*\npath-include=/usr/share/locale/locale.alias\n"
    ),
}
# Added at the end of existing files. A test typing commands reads them back without bracketed-paste
# escapes around the prompt.
APPENDED = {
    "etc/inputrc": "\n# pyvmm: no bracketed-paste escapes (a serial console driven by a test)\n"
                   "set enable-bracketed-paste off\n",
}
# systemd-firstboot would ask for a locale, a time zone and a root password on the console at first boot.
MASKED = ["systemd-firstboot.service"]
# Dropped after debootstrap: documentation, translations, apt's package lists and caches.
DROPPED = [
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
    "var/lib/apt/lists", "var/cache/apt", "var/cache/debconf/templates.dat-old", "var/log/bootstrap.log",
]

PART_OFFSET = 1 << 20
FREE_SPACE = 48 << 20  # room for the guest to write (logs, the journal, a test's files)


class DistroBuildError(PyvmmError, RuntimeError):
    pass


def release_codename(os_release: Path = Path("/etc/os-release")) -> str:
    """The Debian release this machine runs (and its apt uses), from /etc/os-release."""
    try:
        for line in os_release.read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                name = line.split("=", 1)[1].strip().strip('"')
                if name:
                    return name
    except OSError:
        pass
    raise DistroBuildError(f"cannot tell the Debian release from {os_release} (no VERSION_CODENAME)")


def recipe() -> str:
    """Everything the disk is made from besides the kernel release: its cache key."""
    parts = [MIRROR, *PACKAGES, *MODULE_DIRS, *MODULES, *MASKED, *DROPPED, str(FREE_SPACE)]
    parts += [f"{k}={v}" for k, v in sorted({**FILES, **APPENDED}.items())]
    return "\0".join(parts)


def _run(argv: list[str], what: str, **kwargs: object) -> None:
    if shutil.which(argv[0]) is None:
        raise DistroBuildError(f"{what}: {argv[0]} not found: run `make deps` (scripts/install-deps.sh)")
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:])
        raise DistroBuildError(f"{what} failed: {tail}")


def module_selection(tree: ModuleTree) -> list[Path]:
    """The modules the disk carries: MODULE_DIRS and MODULES with everything they depend on."""
    kernel = tree.moddir / "kernel"
    names = [p.name.removesuffix(".ko") for d in MODULE_DIRS for p in (kernel / d).rglob("*.ko")]
    return tree.closure(names + MODULES)


def install_modules(tree: ModuleTree, root: Path) -> None:
    staged = ModuleTree(root, tree.release)
    for ko in module_selection(tree):
        dest = staged.moddir / ko.relative_to(tree.moddir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ko, dest)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        shutil.copyfile(tree.moddir / name, staged.moddir / name)
    run_depmod(root, tree.release)


def configure(root: Path) -> None:
    for rel, content in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    for rel, content in APPENDED.items():
        with (root / rel).open("a") as f:
            f.write(content)
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    for unit in MASKED:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # The first boot has nothing to update (systemd-hwdb-update, ldconfig, the journal catalog: minutes
    # under nested emulation): the tree was made just now. ConditionNeedsUpdate= compares /usr's mtime with
    # these stamps.
    stamp = f"TIMESTAMP_NSEC={time.time_ns()}\n"
    for rel in ("etc/.updated", "var/.updated"):
        (root / rel).write_text(stamp)
    for rel in DROPPED:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.mkdir()  # packages expect the directories (apt recreates partial/ itself)
        elif path.exists():
            path.unlink()


def _tree_bytes(root: Path) -> tuple[int, int]:
    """Bytes in the tree's files (rounded up to 4 KiB blocks) and the number of entries."""
    total = count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += (st.st_size + 4095) // 4096 * 4096
            count += 1
    return total, count


def make_disk(root: Path, dest: Path, label: str) -> None:
    """An MBR disk, one Linux partition at 1 MiB holding `root` as ext4, just big enough plus FREE_SPACE;
    sparse where nothing is written."""
    used, entries = _tree_bytes(root)
    # ext4's own structures: the journal (8 MiB here), inode tables and bitmaps (a few percent).
    part = used * 21 // 20 + FREE_SPACE + (12 << 20)
    size = PART_OFFSET + (part + (1 << 20) - 1) // (1 << 20) * (1 << 20)
    with dest.open("wb") as f:
        f.truncate(size)
    _run(["sfdisk", "-q", str(dest)], "sfdisk", input=f"label: dos\nstart={PART_OFFSET // 512}, type=83\n")
    _run(["mkfs.ext4", "-q", "-F", "-L", label, "-N", str(entries * 2 + 4096), "-E",
          f"offset={PART_OFFSET},lazy_itable_init=1,lazy_journal_init=1", "-d", str(root), str(dest),
          f"{(size - PART_OFFSET) // 1024}k"], "mkfs.ext4")


@contextlib.contextmanager
def _no_mounts_left(top: Path) -> Iterator[None]:
    """debootstrap mounts /proc and /sys in the tree; should it fail without taking them down, the tree's
    removal must not walk into the host's."""
    try:
        yield
    finally:
        prefix = str(top) + "/"
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


def build(dest: Path, tree: ModuleTree, debs: Path, say: Callable[[str], None]) -> None:
    """Make the disk at `dest` (through a temporary file beside it)."""
    if os.geteuid() != 0:
        raise DistroBuildError("building the Debian root disk needs root (debootstrap): run "
                               "`pyvmm-lab build` as root")
    suite = release_codename()
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="distro-", dir=dest.parent) as tmp, _no_mounts_left(Path(tmp)):
        root = Path(tmp) / "root"
        say(f"debootstrap {suite} (minbase, {', '.join(PACKAGES)}): a few minutes")
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
              f"--cache-dir={debs}", suite, str(root), MIRROR], f"debootstrap {suite}")
        say(f"adding the kernel modules of {tree.release} and the pyvmm settings")
        install_modules(tree, root)
        configure(root)
        say(f"writing {dest.name} (MBR, ext4 on partition 1)")
        tmpdisk = dest.with_suffix(".tmp")
        make_disk(root, tmpdisk, "pyvmm-distro")
        tmpdisk.replace(dest)
