"""Shared fixtures. Lab tests run commands inside the lab through `pyvmm-lab run`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LabRun = Callable[..., subprocess.CompletedProcess]


def _lab_run(
    command: str | Sequence[str],
    devices: str | None = None,
    timeout: float = 900,
    memory: int | None = None,
    cpus: int | None = None,
    check: bool = False,
    stall: float | None = None,
) -> subprocess.CompletedProcess:
    """Run `command` (a shell string, or an argv list) as root inside a freshly booted lab.

    Output (stdout and stderr merged) is returned as text in `.stdout`; the lab's own boot messages are
    not included. The exit status is the command's.
    """
    argv = [sys.executable, "-m", "pyvmm.lab", "run", "--timeout", str(int(timeout))]
    if devices is not None:
        argv += ["--devices", devices]
    if memory is not None:
        argv += ["--memory", str(memory)]
    # The suite runs 1-CPU labs unless a test asks for more: its timeouts were set on them, and two of its
    # guests hung in a full run on 2-CPU (multi-threaded TCG) labs, the new interactive default.
    argv += ["--cpus", str(cpus if cpus is not None else 1)]
    if stall is not None:
        argv += ["--stall-timeout", str(stall)]
    argv.append("--")
    argv += ["sh", "-c", command] if isinstance(command, str) else list(command)
    proc = subprocess.run(
        argv,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout + 120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lab command failed ({proc.returncode}):\n{proc.stdout}")
    return proc


@pytest.fixture
def lab() -> LabRun:
    """`lab(command, devices=None, timeout=900, memory=None, cpus=None, check=False, stall=None)` runs in
    the lab."""
    return _lab_run
