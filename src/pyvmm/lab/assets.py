"""`pyvmm-lab build`: everything the lab and its guests need, made from Debian packages into the cache.

Every asset carries a stamp of what it was made from; a second build with nothing changed downloads and
rebuilds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.lab import debian, distro
from pyvmm.lab.cpio import CpioArchive
from pyvmm.lab.kmod import ModuleTree, run_depmod
from pyvmm.lab.paths import AssetPaths
from pyvmm.lab.vmlinux import extract_vmlinux

RECIPE_VERSION = "1"
BUSYBOX = Path("/bin/busybox")

# Modules the lab needs before it can reach the outside filesystem; everything else it loads with the
# real modprobe from the full module tree once the outside root is mounted.
LAB_EARLY_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]

# Guest drivers: virtio (disk, console, entropy, net, vsock, fs), ext4, the lab devices' native drivers.
GUEST_MODULES = [
    "virtio_pci", "virtio_blk", "virtio_console", "virtio-rng", "virtio_net", "vmw_vsock_virtio_transport",
    "virtiofs", "ext4", "crc32c_generic",
    "crc32c_intel", "sdhci-pci", "mmc_block", "nvme", "e1000e", "snd-hda-intel", "vfat", "nls_cp437",
    "nls_iso8859_1",
]

# Guest programs built from src/pyvmm/lab/data/<name>.c with gcc -static into the guest's /bin.
GUEST_TOOLS = ["pyvmm-vsock"]

SD_SIZE = 16 << 20  # QEMU's sd-card wants a power-of-two size
NVME_SIZE = 64 << 20
DISK_SIZE = 128 << 20
DISK_PART_OFFSET = 1 << 20
SD_MARKER = b"PYVMM-LAB-SD-CARD\n"
NVME_MARKER = b"PYVMM-LAB-NVME-DRIVE\n"


class BuildError(PyvmmError, RuntimeError):
    pass


@dataclass
class Manifest:
    kernel_package: str
    kernel_release: str
    sd_sha256: str
    nvme_sha256: str
    guest_disk_sha256: str


def _data(name: str) -> bytes:
    return resources.files("pyvmm.lab").joinpath("data", name).read_bytes()


def _stamp_ok(path: Path, key: str) -> bool:
    stamp = path.with_name(path.name + ".stamp")
    return path.exists() and stamp.exists() and stamp.read_text() == key


def _write_stamp(path: Path, key: str) -> None:
    path.with_name(path.name + ".stamp").write_text(key)


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256(RECIPE_VERSION.encode())
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _busybox_tree(archive: CpioArchive) -> None:
    if not BUSYBOX.exists():
        raise BuildError("busybox not found at /bin/busybox: install Debian's busybox-static package")
    archive.add_host_file("bin/busybox", BUSYBOX, 0o755)
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "bin/busybox":
            archive.add_symlink(applet, "/bin/busybox")
    for d in ("proc", "sys", "dev", "tmp", "run", "root", "mnt", "etc"):
        archive.add_dir(d)


def _guest_tools(archive: CpioArchive) -> None:
    """Small static C programs the guests need and busybox lacks (pyvmm-vsock: AF_VSOCK)."""
    if shutil.which("gcc") is None:
        raise BuildError("gcc not found: run `make deps` (Debian packages gcc, libc6-dev)")
    with tempfile.TemporaryDirectory(prefix="pyvmm-tools-") as tmp:
        for name in GUEST_TOOLS:
            source, binary = Path(tmp) / f"{name}.c", Path(tmp) / name
            source.write_bytes(_data(f"{name}.c"))
            _tool(["gcc", "-static", "-Os", "-Wall", "-o", str(binary), str(source)], f"gcc ({name}.c)")
            archive.add_file(f"bin/{name}", binary.read_bytes(), 0o755)


def _tools_key() -> bytes:
    return b"".join(_data(f"{name}.c") for name in GUEST_TOOLS)


def _progress(message: str) -> None:
    print(f"pyvmm-lab: {message}", flush=True)


class LabBuilder:
    def __init__(self, paths: AssetPaths | None = None) -> None:
        self.paths = paths or AssetPaths()

    # -- kernel -----------------------------------------------------------------------------------
    def kernel(self) -> tuple[str, ModuleTree]:
        package = debian.kernel_package()
        release = package.removeprefix("linux-image-")
        tree = ModuleTree(self.paths.kernel_root / release, release)
        if not (tree.moddir / "modules.dep").exists():
            deb = debian.download(package, self.paths.debs)
            _progress(f"unpacking {deb.name}")
            debian.unpack(deb, tree.root)
            _progress(f"indexing modules of {release}")
            tree.depmod()
        vmlinuz = tree.root / "boot" / f"vmlinuz-{release}"
        key = _key(release)
        if not _stamp_ok(self.paths.kernel, key):
            shutil.copyfile(vmlinuz, self.paths.kernel)
            _write_stamp(self.paths.kernel, key)
        return package, tree

    def vmlinux(self, release: str) -> None:
        """The lab kernel uncompressed from its bzImage (an ELF vmlinux with the PVH note)."""
        key = _key(release, "vmlinux", sha256_file(self.paths.kernel))
        if _stamp_ok(self.paths.vmlinux, key):
            return
        _progress("uncompressing the kernel into an ELF vmlinux")
        tmp = self.paths.vmlinux.with_suffix(".tmp")
        try:
            tmp.write_bytes(extract_vmlinux(self.paths.kernel.read_bytes()))
        except PyvmmError as exc:
            raise BuildError(f"{self.paths.kernel}: {exc}") from exc
        tmp.replace(self.paths.vmlinux)
        _write_stamp(self.paths.vmlinux, key)

    # -- initramfs images -------------------------------------------------------------------------
    def lab_initramfs(self, tree: ModuleTree) -> None:
        init = _data("lab-init.sh")
        key = _key(tree.release, init, ",".join(LAB_EARLY_MODULES), BUSYBOX.read_bytes()[:4096])
        if _stamp_ok(self.paths.lab_initramfs, key):
            return
        _progress("building the lab initramfs")
        archive = CpioArchive()
        _busybox_tree(archive)
        order = []
        for ko in tree.closure(LAB_EARLY_MODULES):
            archive.add_file(f"modules/{ko.name}", ko.read_bytes())
            order.append(ko.name)
        archive.add_file("etc/lab-modules", ("\n".join(order) + "\n").encode())
        archive.add_file("init", init, 0o755)
        archive.write_gzip(self.paths.lab_initramfs)
        _write_stamp(self.paths.lab_initramfs, key)

    def guest_tree(self, tree: ModuleTree) -> CpioArchive:
        """The guest root: busybox, the guest init and a module subset with its own depmod indexes."""
        archive = CpioArchive()
        _busybox_tree(archive)
        init = _data("guest-init.sh")
        archive.add_file("init", init, 0o755)
        archive.add_file("sbin/init", init, 0o755)
        archive.add_file("etc/hostname", b"pyvmm-guest\n")
        _guest_tools(archive)
        with tempfile.TemporaryDirectory(prefix="pyvmm-mods-") as tmp:
            stage = ModuleTree(Path(tmp), tree.release)
            for ko in tree.closure(GUEST_MODULES):
                dest = stage.moddir / ko.relative_to(tree.moddir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ko, dest)
            for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
                shutil.copyfile(tree.moddir / name, stage.moddir / name)
            run_depmod(stage.root, stage.release)
            for path in sorted(stage.moddir.rglob("*")):
                rel = path.relative_to(stage.root).as_posix()
                if path.is_file():
                    archive.add_file(rel, path.read_bytes())
        return archive

    def guest_initramfs(self, tree: ModuleTree) -> None:
        key = _key(tree.release, _data("guest-init.sh"), ",".join(GUEST_MODULES), _tools_key())
        if _stamp_ok(self.paths.guest_initramfs, key):
            return
        _progress("building the guest initramfs")
        archive = self.guest_tree(tree)
        archive.add_file("pyvmm-initramfs", b"")
        archive.write_gzip(self.paths.guest_initramfs)
        _write_stamp(self.paths.guest_initramfs, key)

    # -- disk and device images -------------------------------------------------------------------
    def guest_disk(self, tree: ModuleTree) -> str:
        key = _key(tree.release, _data("guest-init.sh"), ",".join(GUEST_MODULES), str(DISK_SIZE),
                   _tools_key())
        disk = self.paths.guest_disk
        if _stamp_ok(disk, key):
            return sha256_file(disk)
        _progress("building the guest disk image (MBR, ext4 root on partition 1)")
        archive = self.guest_tree(tree)
        with tempfile.TemporaryDirectory(prefix="pyvmm-root-") as tmp:
            root = Path(tmp)
            for name, (mode, data) in sorted(archive.entries.items()):
                path = root / name
                if stat.S_ISDIR(mode):
                    path.mkdir(parents=True, exist_ok=True)
                elif stat.S_ISLNK(mode):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(data.decode(), path)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    path.chmod(stat.S_IMODE(mode))
            tmpdisk = disk.with_suffix(".tmp")
            with tmpdisk.open("wb") as f:
                f.truncate(DISK_SIZE)
            table = f"label: dos\nstart={DISK_PART_OFFSET // 512}, type=83\n"
            _tool(["sfdisk", "-q", str(tmpdisk)], "sfdisk", table)
            part_kib = (DISK_SIZE - DISK_PART_OFFSET) // 1024
            _tool(
                ["mkfs.ext4", "-q", "-F", "-L", "pyvmm-root", "-E", f"offset={DISK_PART_OFFSET}",
                 "-d", str(root), str(tmpdisk), f"{part_kib}k"],
                "mkfs.ext4",
            )
            tmpdisk.replace(disk)
        _write_stamp(disk, key)
        return sha256_file(disk)

    def distro_disk(self, tree: ModuleTree) -> None:
        """The Debian systemd root disk (lab/distro.py). Not in the manifest: labs built before it existed
        keep working, and a test that needs it says so when it is missing."""
        key = _key(tree.release, "distro", distro.release_codename(), distro.recipe())
        if _stamp_ok(self.paths.distro_disk, key):
            return
        _progress("building the Debian systemd root disk")
        try:
            distro.build(self.paths.distro_disk, tree, self.paths.distro_debs, _progress)
        except distro.DistroBuildError as exc:
            raise BuildError(str(exc)) from exc
        _write_stamp(self.paths.distro_disk, key)

    def device_image(self, path: Path, size: int, marker: bytes) -> str:
        key = _key(str(size), marker)
        if _stamp_ok(path, key):
            return sha256_file(path)
        _progress(f"writing {path.name} ({size >> 20} MiB: marker + random data)")
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(marker)
            remaining = size - len(marker)
            while remaining:
                chunk = min(remaining, 1 << 20)
                f.write(os.urandom(chunk))
                remaining -= chunk
        tmp.replace(path)
        _write_stamp(path, key)
        return sha256_file(path)

    # -- all of it --------------------------------------------------------------------------------
    def build(self) -> Manifest:
        self.paths.assets.mkdir(parents=True, exist_ok=True)
        package, tree = self.kernel()
        self.vmlinux(tree.release)
        self.lab_initramfs(tree)
        self.guest_initramfs(tree)
        disk_sha = self.guest_disk(tree)
        self.distro_disk(tree)
        manifest = Manifest(
            kernel_package=package,
            kernel_release=tree.release,
            sd_sha256=self.device_image(self.paths.sd_image, SD_SIZE, SD_MARKER),
            nvme_sha256=self.device_image(self.paths.nvme_image, NVME_SIZE, NVME_MARKER),
            guest_disk_sha256=disk_sha,
        )
        self.paths.manifest.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
        return manifest


def _tool(argv: list[str], name: str, stdin: str | None = None) -> None:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        raise BuildError(f"{name} not found: run `make deps` (Debian packages e2fsprogs, fdisk)")
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{name} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def load_manifest(paths: AssetPaths | None = None) -> Manifest:
    paths = paths or AssetPaths()
    try:
        data = json.loads(paths.manifest.read_text())
        return Manifest(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise BuildError("the lab is not built yet: run `pyvmm-lab build` (or `make lab-assets`)") from exc
