"""`pyvmm` usage errors: one line naming the option, exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _pyvmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "not-a-kernel"
    path.write_bytes(b"\0" * 4096)
    return path


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--kernel", "/nonexistent/vmlinuz"], "--kernel"),
        (["--kernel", "{kernel}", "--frobnicate"], "--frobnicate"),
        (["--kernel", "{kernel}", "--memory", "size=lots"], "--memory"),
        (["--kernel", "{kernel}", "--cpus", "boot=0"], "--cpus"),
        (["--kernel", "{kernel}", "--serial", "file="], "--serial"),
        (["--kernel", "{kernel}", "--device", "path=/sys/bus/pci/devices/0000:99:00.0/"], "--device"),
        (["--cmdline", "console=ttyS0"], "--kernel"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(kernel: Path, args: list[str], names: str) -> None:
    proc = _pyvmm(*[a.replace("{kernel}", str(kernel)) for a in args])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pyvmm: ") and names in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_help_and_version_exit_0() -> None:
    help_ = _pyvmm("--help")
    assert help_.returncode == 0 and "--kernel" in help_.stdout and "--device" in help_.stdout
    version = _pyvmm("--version")
    assert version.returncode == 0 and version.stdout.strip()
