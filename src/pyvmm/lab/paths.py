"""Where the lab keeps what it builds: the cache directory and the asset file names."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The lab cache: `$PYVMM_CACHE`, default `~/.cache/pyvmm`."""
    configured = os.environ.get("PYVMM_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "pyvmm"


class AssetPaths:
    """File names of the built assets inside the cache."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_dir()
        self.debs = self.root / "debs"
        self.distro_debs = self.root / "distro-debs"  # debootstrap's package cache for the distro disk
        self.kernel_root = self.root / "kernel"  # the unpacked linux-image package (boot/, lib/modules/)
        self.assets = self.root / "assets"
        self.runs = self.root / "runs"

    @property
    def manifest(self) -> Path:
        return self.assets / "manifest.json"

    @property
    def kernel(self) -> Path:
        return self.assets / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        """The same kernel uncompressed: the ELF vmlinux for the PVH entry."""
        return self.assets / "vmlinux"

    @property
    def lab_initramfs(self) -> Path:
        return self.assets / "lab-initramfs.cpio.gz"

    @property
    def guest_initramfs(self) -> Path:
        return self.assets / "guest-initramfs.cpio.gz"

    @property
    def guest_disk(self) -> Path:
        return self.assets / "guest-disk.raw"

    @property
    def distro_disk(self) -> Path:
        """The Debian root disk with systemd (lab/distro.py)."""
        return self.assets / "distro-disk.raw"

    @property
    def sd_image(self) -> Path:
        return self.assets / "sd-card.img"

    @property
    def nvme_image(self) -> Path:
        return self.assets / "nvme.img"


def default_paths() -> AssetPaths:
    return AssetPaths()


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


__all__ = ["AssetPaths", "cache_dir", "default_paths", "ensure_dir"]
