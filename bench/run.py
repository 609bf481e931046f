"""`make bench`: build the bench initramfs, run bench/harness.py in one lab, write the results.

Writes bench/results/<date>.json (every sample), <date>.md (the table) and <date>.png (the chart, when
matplotlib is installed: `pip install -e '.[bench]'`, which `make bench` does).

    PYVMM_BENCH_REPS=5 .venv/bin/python bench/run.py [--smoke] [--out DIR]

If the lab stalls (the emulated host, not a VMM: bench/README.md), the repetitions it finished are kept
and a new lab goes on from the one that stalled, at most twice per run (--max-restarts).

--smoke: a shorter run of every measurement (smaller reads, shorter random-read, trap and idle stretches)
for the test suite; its figures are not meant to be compared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import analysis  # noqa: E402
import guest_build  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402

FULL = {"span": "64M", "io_seconds": 3.0, "trap_seconds": 2.0, "idle_seconds": 10.0}
SMOKE = {"span": "8M", "io_seconds": 0.5, "trap_seconds": 0.3, "idle_seconds": 3.0}
LAB_CPUS = 2
STALL_SECONDS = 480
MAX_RESTARTS = 2  # new labs after a stalled one, per run
EXIT_LAB_TIMEOUT = 124  # pyvmm-lab run: timed out, or stalled (--stall-timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="short measurements (for the test suite)")
    p.add_argument("--reps", type=int, default=int(os.environ.get("PYVMM_BENCH_REPS", "5")))
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results directory")
    p.add_argument("--lab-cpus", type=int, default=int(os.environ.get("PYVMM_BENCH_LAB_CPUS", LAB_CPUS)))
    p.add_argument("--only", help="run some parts only: a comma-separated subset of "
                   f"{','.join(sorted(harness.PARTS))} (results then go to <date>-<parts>.json, "
                   "which git ignores)")
    p.add_argument("--boot-vmms", default=",".join(analysis.BOOT_VMMS),
                   help="who boots for the boot rows: a comma-separated subset of "
                   f"{','.join(analysis.BOOT_VMMS)} (while working on one; the others' cells stay empty)")
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                   help=f"new labs after stalled ones, per run ({MAX_RESTARTS})")
    p.add_argument("--stall-timeout", type=float, default=STALL_SECONDS,
                   help=f"a lab silent this long has stalled ({STALL_SECONDS} s)")
    p.add_argument("--note", help="a sentence for the report (e.g. what else ran on the host)")
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error("--reps: at least 1")
    # The distro rows are not in the smoke run (the suite's time: two systemd boots per repetition).
    parts = a.only.split(",") if a.only else sorted(harness.PARTS - ({"distro"} if a.smoke else set()))
    if not parts or not set(parts) <= harness.PARTS:
        p.error(f"--only: choose from {', '.join(sorted(harness.PARTS))}")
    boot_vmms = a.boot_vmms.split(",")
    if not boot_vmms or not set(boot_vmms) <= set(analysis.BOOT_VMMS):
        p.error(f"--boot-vmms: choose from {', '.join(analysis.BOOT_VMMS)}")
    sizes = SMOKE if a.smoke else FULL
    initramfs = guest_build.build()
    helpers = guest_build.bench_dir()
    lab_parts = [part for part in parts if part != "distro"]  # the distro rows have a lab of their own
    per_rep = (200 if a.smoke else 360) + (60 if a.smoke else 160) * bool({"net", "vhost"} & set(parts))
    per_rep += (0 if a.smoke else 200) * ("boot" in parts)  # issue 17's boot variants (6 boots)
    timeout = 600 + per_rep * a.reps

    def harness_command(only: list[str]) -> list[str]:
        return [
            sys.executable, str(BENCH / "harness.py"), "--span", str(sizes["span"]),
            "--io-seconds", str(sizes["io_seconds"]), "--trap-seconds", str(sizes["trap_seconds"]),
            "--idle-seconds", str(sizes["idle_seconds"]), "--initramfs", str(initramfs),
            "--helpers", str(helpers), "--only", ",".join(only), "--boot-vmms", ",".join(boot_vmms),
            *(["--one-boot"] if a.smoke else []),  # the data-plane devices in the virtio-blk boot
        ]  # fmt: skip

    command = harness_command(lab_parts)
    lab = [
        sys.executable,
        "-m",
        "pyvmm.lab",
        "run",
        "--devices",
        "nvme",
        "--cpus",
        str(a.lab_cpus),
        "--timeout",
        str(timeout),
        # The harness prints at least once per VMM run and kills a VMM after 300 s; longer silence is a
        # stalled lab, which then shows its backtraces and ends, instead of hanging until the timeout.
        "--stall-timeout",
        str(a.stall_timeout),
        # A lab that stops answering its pulse ends with 124 like a silent one; this script, not pyvmm-lab,
        # starts the next lab, from the repetition that stalled.
        "--restarts",
        "0",
        "--",
    ]
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    print(
        f"bench: {a.reps} repetition(s){' (smoke)' if a.smoke else ''} in one lab "
        f"({a.lab_cpus} CPUs), at most {timeout} s",
        flush=True,
    )
    payload: dict[str, Any] | None = None
    restarts: list[str] = []
    first = 1
    status = 0
    while lab_parts:
        reps = ["--first-rep", str(first), "--reps", str(a.reps - first + 1)]
        status, part = _run_lab([*lab, *command, *reps])
        if part is not None:
            payload = part if payload is None else merge(payload, part)
        done = sorted(payload.get("reps_done", [])) if payload else []
        first = (done[-1] + 1) if done else 1
        if status == 0 or first > a.reps or status != EXIT_LAB_TIMEOUT or len(restarts) >= a.max_restarts:
            break
        # The emulated lab itself stalled (bench/README.md, "When the lab stalls"): the repetitions it
        # finished are kept, and a new lab runs the rest from the one that stalled.
        restarts.append(f"the lab stalled in repetition {first}")
        print(f"bench: the lab stalled in repetition {first}; a new lab goes on from there", flush=True)
    if "distro" in parts:
        # Without nested paging (kvm_amd npt=0): with it, QEMU 7.2's emulation triple-faults systemd guests
        # (README.md, the distro disk). Both VMMs run in this lab, so their figures compare.
        distro_lab = [*lab[: lab.index("--devices")], "--devices", "none", "--cpus", str(a.lab_cpus),
                      "--npt", "off", "--timeout", str(600 + 400 * a.reps),
                      "--stall-timeout", str(a.stall_timeout), "--restarts", "0", "--"]
        print(f"bench: the distro rows in a lab without nested paging ({a.lab_cpus} CPUs)", flush=True)
        status, part = _run_lab([*distro_lab, *harness_command(["distro"]), "--first-rep", "1",
                                 "--reps", str(a.reps)])
        if part is not None:
            if payload is not None:
                part.pop("reps_done", None)  # the repetitions are the main lab's
            payload = part if payload is None else merge(payload, part)
            payload["distro_lab"] = "nested paging off (kvm_amd npt=0)"
    if payload is None:
        print(f"bench: the lab ended (status {status}) without results", file=sys.stderr)
        return 1
    payload["lab_restarts"] = restarts
    wall = (dt.datetime.now(dt.UTC) - started).total_seconds()
    payload.update(
        {
            "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "reps": a.reps,
            "smoke": a.smoke,
            "settings": {**sizes, "lab_cpus": a.lab_cpus, "guest": "1 vCPU, 512 MiB"},
            "host": {
                "machine": platform.machine(),
                "cpu": _cpu_model(),
                "cpus": os.cpu_count(),
                # other work on the host shows up as spread between repetitions
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            },
            "wall_seconds": round(wall, 1),
            "note": a.note or "",
            "pyvmm_source": _source_state(),
        }
    )
    a.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if a.only is None else "-" + "-".join(parts)
    path = a.out / f"{started.strftime('%Y-%m-%d')}{suffix}.json"
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    written = report.write(path)
    for out in (path, *written):
        print(f"bench: wrote {out}")
    print(f"bench: {wall / 60:.1f} min in all")
    errors = payload.get("errors") or []
    if errors:
        print(f"bench: {len(errors)} measurement(s) failed:", *errors, sep="\n  ", file=sys.stderr)
    return 0 if status == 0 and not errors else 1


def _run_lab(argv: list[str]) -> tuple[int, dict[str, Any] | None]:
    """One lab: its output streams through; returns its status and the last results the harness printed."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    payload: dict[str, Any] | None = None
    for line in proc.stdout:
        if line.startswith("BENCH-JSON "):
            payload = json.loads(line.removeprefix("BENCH-JSON "))
            continue
        sys.stdout.write(line)
        sys.stdout.flush()
    return proc.wait(), payload


def merge(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The results of two labs of one run: samples and lists joined, the first lab's facts kept."""
    out = dict(before)
    for key in ("samples", "guest_clock_samples", "details"):
        table: dict[str, dict[str, list[float]]] = {k: dict(v) for k, v in before.get(key, {}).items()}
        for metric, per_vmm in after.get(key, {}).items():
            for vmm, values in per_vmm.items():
                table.setdefault(metric, {})[vmm] = table.get(metric, {}).get(vmm, []) + values
        out[key] = table
    notes = {k: set(v) for k, v in before.get("notes", {}).items()}
    for k, v in after.get("notes", {}).items():
        notes.setdefault(k, set()).update(v)
    out["notes"] = {k: sorted(v) for k, v in notes.items()}
    for key in ("errors", "retried", "runs", "reps_done"):
        out[key] = before.get(key, []) + after.get(key, [])
    out["lab_seconds"] = before.get("lab_seconds", 0) + after.get("lab_seconds", 0)
    return out


def _source_state() -> dict[str, object]:
    """The commit measured, and whether the working tree differed from it."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "changed": bool(git("status", "--porcelain", "src"))}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


if __name__ == "__main__":
    sys.exit(main())
