"""Shared fixtures. Lab tests run commands inside the lab through `pyvmm-lab run`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from pyvmm.lab.runner import RESTART_MARKER

REPO = Path(__file__).resolve().parent.parent

LabRun = Callable[..., subprocess.CompletedProcess]

# Lab slots: `make test` runs two pytest workers (pytest-xdist), and each lab is a TCG machine that keeps one
# host core busy per lab CPU. A lab takes as many slots as it has CPUs (all of them when it measures), so the
# host's cores are never oversubscribed and the suite's timeouts, set on an unloaded core, keep holding.
# The slots are lock files shared by every process on the machine (other suites, `pyvmm-lab` runs wrapped in
# the same locks); PYVMM_LAB_SLOTS and PYVMM_LAB_SLOT_DIR override the count (host cores) and the place.
LAB_SLOTS = int(os.environ.get("PYVMM_LAB_SLOTS", "0")) or max(1, os.cpu_count() or 1)
SLOT_DIR = Path(os.environ.get("PYVMM_LAB_SLOT_DIR", Path(tempfile.gettempdir()) / "pyvmm-lab-slots"))


@contextlib.contextmanager
def lab_slots(count: int) -> Iterator[None]:
    """Hold `count` lab slots (at most all of them) while the body runs.

    One slot: whichever is free first. Several: taken in order, blocking, so two takers of many never
    deadlock; a one-slot taker never waits while holding one.
    """
    SLOT_DIR.mkdir(parents=True, exist_ok=True)
    files = [open(SLOT_DIR / f"slot{i}", "a") for i in range(LAB_SLOTS)]  # noqa: SIM115 - closed below
    try:
        if min(count, LAB_SLOTS) <= 1:
            while not _take_any(files):
                time.sleep(0.5)
        else:
            for f in files:
                fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        for f in files:
            f.close()  # closing drops the lock


class LabRestarted(UserWarning):
    """A lab stalled, was reset or panicked under a test's command, which then ran again in a new lab."""


def _take_any(files: list) -> bool:
    for f in files:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


def _lab_run(
    command: str | Sequence[str],
    devices: str | None = None,
    timeout: float = 900,
    memory: int | None = None,
    cpus: int | None = None,
    check: bool = False,
    stall: float | None = None,
    alone: bool = False,
    pulse: float | None = None,
    npt: bool = True,
) -> subprocess.CompletedProcess:
    """Run `command` (a shell string, or an argv list) as root inside a freshly booted lab.

    Output (stdout and stderr merged) is returned as text in `.stdout`; the lab's own boot messages are
    not included. The exit status is the command's. `alone=True` keeps other labs off the host meanwhile
    (for tests that measure). When the lab stalled and the command ran again in a new lab, `.stdout` is the
    last run's output and `.before_restart` what came before it (printed, so a failure shows it).
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
    if pulse is not None:
        argv += ["--pulse-timeout", str(pulse)]
    if not npt:
        argv += ["--npt", "off"]
    argv.append("--")
    argv += ["sh", "-c", command] if isinstance(command, str) else list(command)
    with lab_slots(LAB_SLOTS if alone else (cpus or 1)):
        proc = subprocess.run(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=2 * timeout + 300,  # a stalled lab's run, its backtraces, and the new lab's run
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    proc.before_restart = ""  # type: ignore[attr-defined]
    lines = proc.stdout.splitlines(keepends=True)
    restarts = [i for i, line in enumerate(lines) if line.rstrip("\n") == RESTART_MARKER]
    if restarts:
        print(proc.stdout)
        proc.before_restart = "".join(lines[: restarts[-1]])  # type: ignore[attr-defined]
        proc.stdout = "".join(lines[restarts[-1] + 1 :])
        # In the run's warnings summary even when the test passes: a new lab runs the whole command again,
        # and that is where a slow suite's minutes go.
        why = [line.strip() for line in lines[: restarts[-1]] if line.startswith("pyvmm-lab: the lab")]
        warnings.warn(LabRestarted(f"the command ran again in a new lab ({len(restarts)}x): "
                                   + ("; ".join(why) or "no reason printed")), stacklevel=2)
    if check and proc.returncode != 0:
        raise AssertionError(f"lab command failed ({proc.returncode}):\n{proc.stdout}")
    return proc


@pytest.fixture
def lab() -> LabRun:
    """`lab(command, devices=None, timeout=900, memory=None, cpus=None, check=False, stall=None,
    alone=False, pulse=None, npt=True)` runs in the lab."""
    return _lab_run


@pytest.fixture
def slots() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """`with slots(n):` for tests that start labs themselves (the bench's own runner)."""
    return lab_slots
