"""Issue 8's benchmark, one short repetition (`bench/run.py --smoke`): every metric gets a positive
figure for every VMM, issue 20's network rows (vhost-net vs QEMU vhost=on) and vhost-user-blk rows
(qemu-storage-daemon for both) included. No time is asserted; `make bench` runs the real comparison."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(REPO / "bench"))
import analysis  # noqa: E402


def _bench(slots, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """bench/run.py --smoke with these arguments; its output (stdout and stderr) is printed and returned.
    The smoke run's figures are only checked to be there, never compared, so its labs have one CPU and take
    one lab slot, not both: another test's lab may run beside them (`make bench` measures in 2-CPU labs
    with the host to itself)."""
    with slots(1):
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--lab-cpus", "1", *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=1500,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    print(proc.stdout)
    return proc


def test_bench_smoke(tmp_path, slots) -> None:
    proc = _bench(slots, "--reps", "1", "--out", str(tmp_path))
    out = proc.stdout
    results = list(tmp_path.glob("*.json"))
    assert proc.returncode == 0 and len(results) == 1, out
    data = json.loads(results[0].read_text())
    assert data["errors"] == [], out
    keys = {m.key for m in analysis.METRICS}
    assert {"net_guest_to_lab", "net_lab_to_guest", "net_rr", "vu_seq_read_pages", "vu_randread_qd32"} <= keys
    for metric in analysis.METRICS:
        if not metric.smoke:
            continue
        for vmm in metric.vmms:
            values = data["samples"][metric.key][vmm]
            assert len(values) == 1, (metric.key, vmm, out)
            if metric.key == "vmm_idle_cpu":  # clock ticks: a quiet VMM can use none in a short idle
                assert values[0] >= 0 and data["details"]["vmm_idle_cpu.schedstat_s"][vmm][0] > 0, out
            else:
                assert values[0] > 0, (metric.key, vmm, out)
    assert results[0].with_suffix(".md").exists()
    if importlib.util.find_spec("matplotlib") is not None:  # `make bench` installs it; the suite may not
        assert results[0].with_suffix(".png").stat().st_size > 0


def test_a_stalled_lab_is_replaced_and_the_run_completes(tmp_path, slots) -> None:
    """The first lab goes silent in repetition 2 (the harness's test hook): the stall is detected, the
    lab's backtraces shown, and a new lab runs repetition 2; repetition 1's figures are kept. One boot per
    repetition is enough to show it (pyvmm's: the suite's time)."""
    proc = _bench(
        slots, "--only", "boot", "--boot-vmms", "pyvmm", "--reps", "2", "--stall-timeout", "60",
        "--max-restarts", "4", "--out", str(tmp_path),
        env={"PYVMM_BENCH_STALL_IN_REP": "2"},
    )
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "the lab stalled in repetition 2; a new lab goes on from there" in out
    assert "sysrq: Show State" in out  # the stalled lab's backtraces
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    # The first restart is the hook's; a real stall of the emulated lab may add more (bench/README.md).
    assert data["reps_done"] == [1, 2] and data["lab_restarts"][0] == "the lab stalled in repetition 2"
    values = data["samples"]["boot_init"]["pyvmm"]
    assert len(values) == 2 and all(v > 0 for v in values), out
