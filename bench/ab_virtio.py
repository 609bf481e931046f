"""Compare two pyvmm commits on the bench's virtio-blk workload, in one lab, interleaved.

    .venv/bin/python bench/ab_virtio.py [--rounds 8] [--out bench/results/<date>-virtio-ab] REV_A REV_B

Figures taken hours apart on a shared host differ by more than a change costs; inside one lab, with the
two commits' runs interleaved, the host's load falls on both alike. Each commit's `src/` is exported
(`git archive`) into $PYVMM_CACHE/ab/<sha>/ and byte-compiled; the lab (1 CPU, no devices: take a slot,
`/work/bin/lab-lock` or the like) runs this file again with --inside, which starts pyvmm as
`python -m pyvmm` with that commit's `src` first on PYTHONPATH. Everything else is the bench's own: the
bench initramfs (bench/guest_build.py), guest/virtio.sh with `make bench`'s sizes (64 MiB, 3 s per
measurement; the idle stretch is cut to 1 s, as no VMM-cost figure is taken), harness.pyvmm_argv (1 vCPU,
512 MiB, the disk image copied into the lab's /tmp), the lab-clock spans of analysis.py.

Round r runs A then B when r is odd, B then A when it is even; a warm-up round 0 (A, B) goes first and
is not counted (--no-warmup counts every run). The results (<out>.json, every sample;
<out>.md, the table) give per metric each commit's median and range, B/A of the medians with a 95 %
bootstrap interval (resampling each commit's samples), and a two-sided Mann-Whitney U test's p (exact
over all splits of the samples); then, paired by round (a round's two runs are adjacent in time), the
median of the rounds' B/A, its bootstrap interval over rounds and the exact Wilcoxon signed-rank p.
The lab machinery and this script are the checkout's; only the measured pyvmm differs."""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import analysis as an  # noqa: E402
from harness import VIRTIO_TAGS  # noqa: E402

# guest/virtio.sh's tags, in its order, and the bench's metric keys (for their labels and units)
TAGS = VIRTIO_TAGS
SPAN, IO_SECONDS, IDLE_SECONDS = "64M", 3.0, 1.0
PER_RUN = 150  # lab seconds one run may take, for the lab's timeout (a 1-CPU lab takes about 50)
BOOTSTRAP = 10000


# -- statistics (pure) -----------------------------------------------------------------------------------
def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the Mann-Whitney U test: exact over every split of the pooled samples when there
    are at most 200,000 splits, the normal approximation otherwise. Ties count a half."""
    n, m = len(a), len(b)
    if not n or not m:
        return math.nan

    def u_of(xs: Sequence[float], ys: Sequence[float]) -> float:
        return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in xs for y in ys)

    centre = n * m / 2
    observed = abs(u_of(a, b) - centre)
    pooled = [*a, *b]
    if math.comb(n + m, n) <= 200_000:
        extreme = total = 0
        for picked in itertools.combinations(range(n + m), n):
            chosen = set(picked)
            xs = [pooled[i] for i in picked]
            ys = [pooled[i] for i in range(n + m) if i not in chosen]
            total += 1
            if abs(u_of(xs, ys) - centre) >= observed - 1e-9:
                extreme += 1
        return extreme / total
    sigma = math.sqrt(n * m * (n + m + 1) / 12)
    z = (observed - 0.5) / sigma if sigma else 0.0
    return math.erfc(max(z, 0.0) / math.sqrt(2))


def bootstrap_ratio(
    a: Sequence[float], b: Sequence[float], rounds: int = BOOTSTRAP, seed: int = 1
) -> tuple[float, float]:
    """95 % percentile interval of median(b)/median(a), each sample set resampled with replacement."""
    rng = random.Random(seed)
    ratios = sorted(
        statistics.median(rng.choices(b, k=len(b))) / statistics.median(rng.choices(a, k=len(a)))
        for _ in range(rounds)
    )
    return ratios[int(0.025 * (rounds - 1))], ratios[int(0.975 * (rounds - 1))]


def signed_rank_p(ratios: Sequence[float]) -> float:
    """Two-sided p of the Wilcoxon signed-rank test that log(B/A) of paired rounds centres on 0, exact
    over every sign assignment. A ratio of exactly 1 is dropped; tied magnitudes share their mean rank."""
    logs = [math.log(r) for r in ratios if r != 1]
    if not logs:
        return 1.0
    magnitudes = sorted(abs(x) for x in logs)
    ranks = []
    for x in logs:  # 1-based mean rank of |x| among the magnitudes
        first = magnitudes.index(abs(x))
        last = len(magnitudes) - 1 - magnitudes[::-1].index(abs(x))
        ranks.append((first + last) / 2 + 1)
    total = sum(ranks)
    observed = abs(sum(r for r, x in zip(ranks, logs, strict=True) if x > 0) - total / 2)
    extreme = sum(
        1
        for signs in itertools.product((False, True), repeat=len(ranks))
        if abs(sum(r for r, up in zip(ranks, signs, strict=True) if up) - total / 2) >= observed - 1e-9
    )
    return extreme / 2 ** len(ranks)


def paired_ratio(ratios: Sequence[float], rounds: int = BOOTSTRAP, seed: int = 1) -> tuple[float, float]:
    """95 % percentile interval of the median per-round B/A, the rounds resampled with replacement."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(rounds))
    return meds[int(0.025 * (rounds - 1))], meds[int(0.975 * (rounds - 1))]


def pairs(payload: dict[str, Any], key: str) -> list[float]:
    """B/A of each counted round in which both commits gave the figure (the two runs of a round ran one
    after the other, so the host's load of the moment falls on both)."""
    a_sha, b_sha = payload["order"]
    per_round: dict[int, dict[str, float]] = {}
    for run in payload.get("runs", []):
        if run["round"] and key in run:
            per_round.setdefault(run["round"], {})[run["commit"]] = run[key]
    if not payload.get("runs") and not payload["errors"]:  # older results: samples in round order
        xs, ys = payload["samples"][key][a_sha], payload["samples"][key][b_sha]
        per_round = {i: {a_sha: x, b_sha: y} for i, (x, y) in enumerate(zip(xs, ys, strict=True), 1)}
    return [r[b_sha] / r[a_sha] for _, r in sorted(per_round.items()) if len(r) == 2 and r[a_sha]]


def pool(payloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several sessions of the same two commits as one: samples joined, rounds renumbered one after the
    other (each round still pairs two runs of one lab, adjacent in time)."""
    order = payloads[0]["order"]
    if any(p["order"] != order for p in payloads):
        raise ValueError("the sessions compare different commits")
    out: dict[str, Any] = {"order": order, "errors": [], "rounds_done": 0, "runs": [],
                           "samples": {key: {sha: [] for sha in order} for key in TAGS.values()}}
    for p in payloads:
        for key, per in p["samples"].items():
            for sha, values in per.items():
                out["samples"][key][sha] += values
        offset = out["rounds_done"]
        out["runs"] += [{**r, "round": r["round"] + offset if r["round"] else 0} for r in p.get("runs", [])]
        out["errors"] += p["errors"]
        out["rounds_done"] += p["rounds_done"]
    out["date"] = ", ".join(p.get("date", "?") for p in payloads)
    return out


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    low, high = bootstrap_ratio(a, b)
    return {
        "ratio": statistics.median(b) / statistics.median(a),
        "ci_low": low,
        "ci_high": high,
        "p": mann_whitney_p(a, b),
    }


# -- host side -------------------------------------------------------------------------------------------
def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout


def export(rev: str, cache: Path) -> tuple[str, Path]:
    """The commit's src/ under cache/ab/<sha>/ (exported once), byte-compiled as an installed package is."""
    sha = git("rev-parse", "--short=7", f"{rev}^{{commit}}").strip()
    root = cache / "ab" / sha
    if not (root / "src" / "pyvmm" / "__main__.py").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", sha, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "src")], check=True)
    return sha, root / "src"


def host(a: argparse.Namespace) -> int:
    import guest_build

    cache = guest_build.bench_dir().parent
    variants = dict(export(rev, cache) for rev in (a.rev_a, a.rev_b))
    if len(variants) != 2:
        print("ab_virtio: REV_A and REV_B are the same commit", file=sys.stderr)
        return 2
    initramfs = guest_build.build()
    started = dt.datetime.now(dt.UTC)
    inside = [sys.executable, str(Path(__file__).resolve()), "--inside", "--rounds", str(a.rounds),
              "--initramfs", str(initramfs), *([] if a.warmup else ["--no-warmup"])]
    inside += [f"{sha}={src}" for sha, src in variants.items()]
    lab = [sys.executable, "-m", "pyvmm.lab", "run", "--cpus", "1",
           "--timeout", str(600 + PER_RUN * 2 * (a.rounds + 1)), "--stall-timeout", "480", "--", *inside]
    print(f"ab_virtio: {a.rounds} rounds of {' / '.join(variants)} in one 1-CPU lab", flush=True)
    proc = subprocess.Popen(lab, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    assert proc.stdout is not None
    payload: dict[str, Any] | None = None
    for line in proc.stdout:
        if line.startswith("AB-JSON "):
            payload = json.loads(line.removeprefix("AB-JSON "))
        else:
            sys.stdout.write(line)
            sys.stdout.flush()
    status = proc.wait()
    if payload is None:
        print(f"ab_virtio: the lab ended (status {status}) without results", file=sys.stderr)
        return 1
    payload.update({
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "revs": dict(zip((a.rev_a, a.rev_b), variants, strict=True)),
        "settings": {"span": SPAN, "io_seconds": IO_SECONDS, "lab_cpus": 1, "guest": "1 vCPU, 512 MiB"},
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
        "checkout": git("rev-parse", "--short=7", "HEAD").strip(),
    })
    out = a.out or BENCH / "results" / f"{started:%Y-%m-%d}-virtio-ab"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))
    print(f"ab_virtio: wrote {out}.json and {out}.md")
    return 0 if status == 0 and not payload["errors"] else 1


def markdown(payload: dict[str, Any]) -> str:
    a_sha, b_sha = payload["order"]
    samples: dict[str, dict[str, list[float]]] = payload["samples"]
    lines = [
        f"# virtio-blk: pyvmm {a_sha} (A) against {b_sha} (B) in one lab — {payload.get('date', '?')}",
        "",
        f"{payload['rounds_done']} interleaved rounds (A B, B A, ...) in one 1-CPU lab; the bench's guest, "
        "kernel, initramfs and disk image, guest/virtio.sh (1 vCPU, 512 MiB, 64 MiB range, 3 s per "
        "measurement). Cells: **median** (min-max) on the lab's clock. B/A: ratio of the medians, with a "
        f"95 % bootstrap interval ({BOOTSTRAP} resamples); p: two-sided Mann-Whitney U, exact. Paired: "
        "the median of the rounds' own B/A (a round's two runs are adjacent in time), its bootstrap "
        "interval over rounds, and the exact two-sided Wilcoxon signed-rank p of log(B/A).",
        "",
        f"| metric | unit | A {a_sha} | B {b_sha} | B/A | 95 % interval | p | paired B/A | 95 % interval "
        "| p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in TAGS.values():
        metric = an.METRICS_BY_KEY[key]
        xs, ys = samples[key].get(a_sha, []), samples[key].get(b_sha, [])
        if not xs or not ys:
            lines.append(f"| {metric.title} | {metric.unit} | — | — | | | | | | |")
            continue
        c = compare(xs, ys)
        rs = pairs(payload, key)
        paired = " | | "
        if rs:
            low, high = paired_ratio(rs)
            paired = f"{statistics.median(rs):.3f} | {low:.3f}-{high:.3f} | {signed_rank_p(rs):.3f}"
        cells = []
        for values in (xs, ys):
            s = an.summarize(values)
            assert s is not None
            cells.append(f"**{an.fmt(s.median)}** ({an.fmt(s.min)}-{an.fmt(s.max)})")
        lines.append(
            f"| {metric.title} | {metric.unit} | {cells[0]} | {cells[1]} | {c['ratio']:.3f} | "
            f"{c['ci_low']:.3f}-{c['ci_high']:.3f} | {c['p']:.3f} | {paired} |"
        )
    if payload.get("notes"):
        lines += ["", f"Note: {payload['notes']}."]
    if payload["errors"]:
        lines += ["", "Failed runs:", *(f"- {e}" for e in payload["errors"])]
    if payload.get("runs"):
        heads = [an.METRICS_BY_KEY[key].unit + " " + tag for tag, key in TAGS.items()]
        lines += ["", "Every run in the order run (round 0: warm-up, not counted):", "",
                  "| round | commit | lab s | " + " | ".join(heads) + " |",
                  "| --- | --- | ---: |" + " ---: |" * len(TAGS)]
        for r in payload["runs"]:
            cols = " | ".join(an.fmt(r.get(key)) for key in TAGS.values())
            lines.append(f"| {r['round']} | {r['commit']} | {r['seconds']:g} | {cols} |")
    return "\n".join(lines) + "\n"


# -- inside the lab --------------------------------------------------------------------------------------
def inside(a: argparse.Namespace) -> int:
    import harness

    variants = dict(v.split("=", 1) for v in a.variants)
    order = list(variants)
    for sha, src in variants.items():  # the variant's pyvmm, not the lab's, must be the one imported
        where = subprocess.run(
            ["env", f"PYTHONPATH={src}", sys.executable, "-c", "import pyvmm; print(pyvmm.__file__)"],
            capture_output=True, text=True,
        ).stdout.strip()
        if not where.startswith(src):
            print(f"ab_virtio: {sha}: python imports pyvmm from {where!r}, not {src}", flush=True)
            return 1
    env = os.environ
    s = harness.Settings(1, SPAN, IO_SECONDS, 0, IDLE_SECONDS, env["PYVMM_GUEST_KERNEL"],
                         env["PYVMM_GUEST_VMLINUX"], a.initramfs, env["PYVMM_GUEST_DISK"], "",
                         vm_timeout=a.vm_timeout)
    disk = os.path.join(env.get("TMPDIR", "/tmp"), "bench-disk.raw")
    shutil.copyfile(s.disk, disk)
    cmd = f"sh /bench/virtio.sh {SPAN} {IO_SECONDS:g} {IDLE_SECONDS:g}"
    samples: dict[str, dict[str, list[float]]] = {key: {sha: [] for sha in order} for key in TAGS.values()}
    errors: list[str] = []
    runs: list[dict[str, Any]] = []  # every run in order, the warm-up included
    done = 0
    # Round 0 warms the lab up (the image into its page cache, the Python files into memory): the first
    # run in a fresh lab was the slowest of all in the first A/B (2026-12-06); its figures are not counted.
    for rnd in range(0 if a.warmup else 1, a.rounds + 1):
        for sha in order if rnd % 2 == 1 or rnd == 0 else order[::-1]:
            argv = ["env", f"PYTHONPATH={variants[sha]}", sys.executable, "-m", "pyvmm",
                    *harness.pyvmm_argv(s, cmd, disk=disk)[1:]]
            label = f"round {rnd} {sha}" if rnd else f"warm-up {sha}"
            result = harness.run_vmm(label, argv, s.vm_timeout)
            try:
                if not (result.ok and any("PYVMM-GUEST-EXIT=0" in x for _, x in result.lines)):
                    raise an.MarkerError(f"exit status {result.status}")
                spans = an.spans(result.lines)
            except an.MarkerError as exc:
                errors.append(f"{label}: {exc}")
                print(f"ab_virtio: FAILED {label}: {exc}\n" + "\n".join(result.log().splitlines()[-30:]))
                continue
            parts = []
            took = result.exited - result.started
            record: dict[str, Any] = {"round": rnd, "commit": sha, "seconds": round(took, 1)}
            for tag, key in TAGS.items():
                span = spans.get(tag)
                if span is None:
                    errors.append(f"{label}: no {tag}")
                    continue
                unit = an.METRICS_BY_KEY[key].unit
                value = an.mb_per_s(span) if unit == "MB/s" else an.iops(span)
                record[key] = round(value, 3)
                if rnd:
                    samples[key][sha].append(round(value, 3))
                parts.append(f"{tag} {value:,.0f}")
            runs.append(record)
            print(f"ab_virtio: {label} ({took:.0f} s): {', '.join(parts)}", flush=True)
        done = rnd
        payload = {"order": order, "samples": samples, "errors": errors, "rounds_done": done, "runs": runs,
                   "lab": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
        print("AB-JSON " + json.dumps(payload), flush=True)  # after every round: a stalled lab keeps these
    return 0 if not errors else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", type=Path, help="results path without suffix (default results/<date>-virtio-ab)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="count every run (by default one run per commit first is not counted)")
    p.add_argument("--vm-timeout", type=float, default=300, help=argparse.SUPPRESS)
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--initramfs", help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                   help="print the table of results JSONs, several sessions pooled (nothing is run)")
    p.add_argument("revs", nargs="*", help="REV_A REV_B (inside the lab: SHA=SRC pairs)")
    a = p.parse_args()
    if a.inside:
        a.variants = a.revs
        return inside(a)
    if a.report:
        sessions = [json.loads(path.read_text()) for path in a.report]
        sys.stdout.write(markdown(sessions[0] if len(sessions) == 1 else pool(sessions)))
        return 0
    if len(a.revs) != 2 or a.rounds < 2:
        p.error("give two revisions (REV_A REV_B) and at least 2 rounds")
    a.rev_a, a.rev_b = a.revs
    return host(a)


if __name__ == "__main__":
    sys.exit(main())
