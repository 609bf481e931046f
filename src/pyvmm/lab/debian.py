"""Fetching Debian packages into the lab cache (apt-get download + dpkg-deb -x)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pyvmm.errors import PyvmmError


class PackageError(PyvmmError, RuntimeError):
    """A Debian package could not be found, downloaded or unpacked."""


def _run(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise PackageError(f"{what}: {argv[0]} is not installed (this needs a Debian-based machine)") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PackageError(f"{what}: {detail}")
    return proc.stdout


def kernel_package() -> str:
    """The current kernel ABI package the `linux-image-amd64` metapackage points to."""
    out = ""
    for attempt in range(2):
        out = _run(["apt-cache", "depends", "linux-image-amd64"], "looking up linux-image-amd64")
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Depends:") and "linux-image-" in line:
                return line.split(":", 1)[1].strip()
        if attempt == 0:  # an empty package list: refresh it once
            _run(["apt-get", "update", "-q"], "apt-get update")
    raise PackageError("cannot find the kernel package linux-image-amd64 depends on (is apt configured?)")


def download(package: str, dest: Path) -> Path:
    """Download `package`'s .deb into `dest` unless it is already there; returns the file."""
    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(dest.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    print(f"pyvmm-lab: downloading {package}", flush=True)
    argv = ["apt-get", "download", "-o", "APT::Sandbox::User=root", package]
    proc = subprocess.run(argv, cwd=dest)  # apt shows its own progress
    if proc.returncode != 0:
        raise PackageError(f"cannot download the Debian package {package} (apt-get download failed)")
    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise PackageError(f"apt-get download {package} left no .deb in {dest}")
    return found[-1]


def unpack(deb: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
