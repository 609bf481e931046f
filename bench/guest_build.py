"""Build the bench initramfs: the lab's guest initramfs with the bench helpers appended.

The helpers in bench/guest/*.c are compiled with `gcc -static -O2` into $PYVMM_CACHE/bench/; they and the
guest scripts bench/guest/*.sh go into a small newc archive (/bin/bench-*, /bench/*.sh) that is
concatenated to the guest initramfs (the kernel unpacks concatenated archives in order). Both VMMs boot
the result. Rebuilt only when a source or the guest initramfs changes."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))

from pyvmm.lab.cpio import CpioArchive  # noqa: E402
from pyvmm.lab.paths import AssetPaths  # noqa: E402

GUEST_SRC = BENCH / "guest"


class BuildError(RuntimeError):
    pass


def bench_dir(paths: AssetPaths | None = None) -> Path:
    out = (paths or AssetPaths()).root / "bench"
    out.mkdir(parents=True, exist_ok=True)
    return out


def compile_helpers(out: Path) -> dict[str, Path]:
    """Static binaries of bench/guest/*.c in `out`, by name (recompiled when the source changes)."""
    binaries: dict[str, Path] = {}
    for source in sorted(GUEST_SRC.glob("*.c")):
        binary = out / source.stem
        stamp = out / f"{source.stem}.src-sha256"
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if not (binary.exists() and stamp.exists() and stamp.read_text() == digest):
            proc = subprocess.run(
                ["gcc", "-static", "-O2", "-Wall", "-o", str(binary), str(source)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise BuildError(
                    f"gcc {source.name} failed (make deps installs gcc, libc6-dev):\n{proc.stderr}"
                )
            stamp.write_text(digest)
        binaries[source.stem] = binary
    return binaries


def build(paths: AssetPaths | None = None) -> Path:
    """Path of the bench initramfs (built or up to date)."""
    paths = paths or AssetPaths()
    base = paths.guest_initramfs
    if not base.exists():
        raise BuildError(f"{base} is missing: run `pyvmm-lab build` (or `make lab-assets`)")
    out = bench_dir(paths)
    archive = CpioArchive()
    for name, binary in compile_helpers(out).items():
        archive.add_host_file(f"bin/{name}", binary, 0o755)
    for script in sorted(GUEST_SRC.glob("*.sh")):
        archive.add_host_file(f"bench/{script.name}", script, 0o755)
    extra = gzip.compress(archive.pack(), compresslevel=6, mtime=0)
    result = out / "bench-initramfs.cpio.gz"
    stamp = out / "bench-initramfs.sha256"
    key = hashlib.sha256(base.read_bytes() + extra).hexdigest()
    if not (result.exists() and stamp.exists() and stamp.read_text() == key):
        tmp = result.with_suffix(".tmp")
        tmp.write_bytes(base.read_bytes() + extra)
        tmp.replace(result)
        stamp.write_text(key)
    return result


if __name__ == "__main__":
    print(build())
