"""Turn a bench results JSON into a Markdown table and a PNG chart next to it.

    .venv/bin/python bench/report.py bench/results/<date>.json
    .venv/bin/python bench/report.py --compact bench/results/<date>.json   # the README's short table

The chart needs matplotlib (`pip install -e '.[bench]'`); without it only the Markdown is written."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import analysis as an

LABELS = {
    an.PYVMM: "pyvmm",
    an.QEMU: "QEMU q35",
    an.QEMU_Q35: "QEMU q35",
    an.QEMU_MICROVM: "QEMU microvm",
    an.NATIVE: "lab, native driver",
}
COLOURS = {
    an.PYVMM: "#d95f02",
    an.QEMU: "#1b9e77",
    an.QEMU_Q35: "#1b9e77",
    an.QEMU_MICROVM: "#66a61e",
    an.NATIVE: "#7570b3",
}


def _cell(summary: an.Summary | None) -> str:
    if summary is None:
        return "—"
    if summary.n == 1:
        return an.fmt(summary.median)
    return f"**{an.fmt(summary.median)}** ({an.fmt(summary.min)}-{an.fmt(summary.max)})"


def _ratio_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _console_costs(details: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Median cost of one console line per VMM in ms, over every I/O measurement's NL markers."""
    costs: dict[str, list[float]] = {}
    for key, per_vmm in details.items():
        if key.endswith(".console_line_s"):
            for vmm, values in per_vmm.items():
                if vmm != an.NATIVE:
                    costs.setdefault(vmm, []).extend(values)
    return {vmm: statistics.median(v) * 1000 for vmm, v in costs.items() if v}


def markdown(data: dict[str, Any], png_name: str | None) -> str:
    samples: dict[str, dict[str, list[float]]] = data["samples"]
    reps = data.get("reps", "?")
    lines = [
        f"# pyvmm vs QEMU in the lab — {data.get('date', '?')}",
        "",
        f"{reps} repetition(s), interleaved, in one lab ({data.get('settings', {}).get('lab_cpus', '?')} "
        f"lab CPUs, nested KVM under TCG on {data.get('host', {}).get('cpu', '?')}); guest: "
        f"{data.get('settings', {}).get('guest', '?')}, the same kernel, initramfs and disk image for "
        "every VMM. Cells: **median** (min-max). Times are the lab's clock: console lines stamped as they "
        "arrive, one console line's cost subtracted from I/O and trap spans.",
    ]
    if data.get("smoke"):
        lines += ["", "**Smoke run**: shortened measurements; do not compare these figures."]
    if data.get("note"):
        lines += ["", f"**Note**: {data['note']}"]
    lines += [
        "",
        "| metric | unit | pyvmm | QEMU | QEMU microvm / lab native | pyvmm / QEMU | pyvmm / 3rd | goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for metric in an.METRICS:
        s = samples.get(metric.key, {})
        third = metric.vmms[2] if len(metric.vmms) > 2 else None
        goals = []
        for goal in metric.goals:
            value = an.ratio(metric, s, goal.against)
            mark = "" if value is None else (" ✅" if goal.met(value, metric.better) else " ❌")
            goals.append(f"{goal.text(metric.better).replace(goal.against, LABELS[goal.against])}{mark}")
        lines.append(
            "| "
            + " | ".join(
                [
                    metric.title,
                    metric.unit,
                    _cell(an.summarize(s.get(an.PYVMM, []))),
                    _cell(an.summarize(s.get(metric.baseline, []))),
                    f"{LABELS[third]}: {_cell(an.summarize(s.get(third, [])))}" if third else "",
                    _ratio_text(an.ratio(metric, s, metric.baseline)),
                    _ratio_text(an.ratio(metric, s, third)) if third else "",
                    "; ".join(goals) or "—",
                ]
            )
            + " |"
        )
    guest = data.get("guest_clock_samples") or {}
    if guest:
        lines += [
            "",
            "Secondary: the same figures by the guest's own clock (medians; a nested guest's clock drifts).",
            "",
            "| metric | unit | pyvmm | QEMU | lab native |",
            "| --- | --- | --- | --- | --- |",
        ]
        for metric in an.METRICS:
            g = guest.get(metric.key)
            if not g:
                continue
            cells = [an.summarize(g.get(v, [])) for v in (an.PYVMM, an.QEMU, an.NATIVE)]
            lines.append(
                f"| {metric.title} | {metric.unit} | "
                + " | ".join(an.fmt(c.median) if c else "—" for c in cells)
                + " |"
            )
    lines += ["", "How each figure is taken: [bench/README.md](../README.md)."]
    settings = data.get("settings") or {}
    if "io_seconds" in settings:
        lines.append(
            f"Each I/O measurement ran {settings['io_seconds']:g} s over the first {settings['span']} of the "
            f"device, each trap loop {settings['trap_seconds']:g} s, the idle stretch "
            f"{settings['idle_seconds']:g} s (guest clock)."
        )
    console = _console_costs(data.get("details") or {})
    if console:
        lines.append(
            "One console line (about 20 characters on the guest's serial port) cost, median: "
            + ", ".join(f"{LABELS[v]} {ms:.1f} ms" for v, ms in console.items())
            + "; each I/O and trap span has the cost measured right before it subtracted."
        )
    notes = data.get("notes") or {}
    if notes.get("trap_config_read.offset"):
        lines.append(f"Config-space reads at offset {', '.join(notes['trap_config_read.offset'])}.")
    restarts = data.get("lab_restarts") or []
    if restarts:
        lines.append(
            f"The lab stalled {len(restarts)} time(s) ({'; '.join(restarts)}); each time a new lab ran the "
            "rest of the run from the repetition that stalled (bench/README.md)."
        )
    retried = data.get("retried") or []
    if retried:
        lines.append(
            f"{len(retried)} run(s) were taken again because the guest died under them (the emulated lab "
            f"kills a nested guest now and then; bench/README.md): {'; '.join(retried)}."
        )
    if data.get("distro_lab"):
        lines.append(
            "The distro rows' guests have 4 vCPUs (cloud-hypervisor's VFIO guide), in a second lab with "
            f"{data.get('settings', {}).get('lab_cpus', '?')} CPUs, its KVM with {data['distro_lab']}."
        )
    if data.get("wall_seconds"):
        lines.append(f"The whole run took {data['wall_seconds'] / 60:.1f} min.")
    source = data.get("pyvmm_source") or {}
    if source.get("commit"):
        changed = " plus uncommitted changes under src/" if source.get("changed") else ""
        lines.append(f"pyvmm as of commit {source['commit'][:12]}{changed}.")
    host = data.get("host") or {}
    if "loadavg_before" in host:
        lines.append(
            f"Host load average (1 min) before and after: {host['loadavg_before'][0]:.1f}, "
            f"{host['loadavg_after'][0]:.1f} on {host.get('cpus', '?')} CPUs (other work on the host "
            "widens the spread)."
        )
    if png_name:
        lines += ["", f"![pyvmm vs QEMU]({png_name})"]
    errors = data.get("errors") or []
    if errors:
        lines += ["", "Failed measurements:", "", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def compact(data: dict[str, Any]) -> str:
    """The short table of the README's Performance section: medians, the ratio, the goal."""
    samples = data["samples"]
    lines = [
        "| metric | unit | pyvmm | QEMU | pyvmm / QEMU | goal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for metric in an.METRICS:
        s = samples.get(metric.key, {})
        medians = [an.summarize(s.get(v, [])) for v in metric.vmms]
        cells = [an.fmt(m.median) if m else "—" for m in medians]
        qemu = cells[1]
        if len(metric.vmms) > 2:
            qemu += f" ({LABELS[metric.vmms[2]]}: {cells[2]})"
        goals = []
        for goal in metric.goals:
            value = an.ratio(metric, s, goal.against)
            met = "" if value is None else (" ✅" if goal.met(value, metric.better) else " ❌")
            goals.append(f"{goal.text(metric.better).replace(goal.against, LABELS[goal.against])}{met}")
        ratio = _ratio_text(an.ratio(metric, s, metric.baseline))
        row = [metric.title, metric.unit, cells[0], qemu, ratio, "; ".join(goals) or "—"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def chart(data: dict[str, Any], path: Path) -> bool:
    """A PNG with one panel per metric: median bar and min-max whisker per VMM. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples = data["samples"]
    cols = 3
    rows = -(-len(an.METRICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 2.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, an.METRICS, strict=False):
        s = samples.get(metric.key, {})
        names, medians, lows, highs, colours = [], [], [], [], []
        for vmm in metric.vmms:
            summary = an.summarize(s.get(vmm, []))
            if summary is None:
                continue
            names.append(LABELS[vmm])
            medians.append(summary.median)
            lows.append(summary.median - summary.min)
            highs.append(summary.max - summary.median)
            colours.append(COLOURS[vmm])
        y = range(len(names))
        ax.barh(y, medians, xerr=[lows, highs], color=colours, capsize=4)
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ratio = an.ratio(metric, s, metric.baseline)
        title = metric.title.replace(": ", ":\n", 1)
        if ratio is not None:
            title += f"  (pyvmm/QEMU {ratio:.2f}x)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(
            f"{metric.unit}, {'lower' if metric.better == 'lower' else 'higher'} is better", fontsize=8
        )
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(an.METRICS) :]:
        ax.axis("off")
    fig.suptitle(
        f"pyvmm vs QEMU in the lab, {data.get('date', '')}: median, min-max of "
        f"{data.get('reps', '?')} run(s)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write(json_path: Path) -> list[Path]:
    """Writes <name>.md and, with matplotlib, <name>.png next to the JSON; returns what it wrote."""
    data = json.loads(json_path.read_text())
    png = json_path.with_suffix(".png")
    written = []
    has_png = chart(data, png)
    if has_png:
        written.append(png)
    else:
        print("bench: matplotlib is not installed: no PNG chart (pip install -e '.[bench]')", file=sys.stderr)
    md = json_path.with_suffix(".md")
    md.write_text(markdown(data, png.name if has_png else None))
    written.insert(0, md)
    return written


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compact"]:  # the README's table
        print(compact(json.loads(Path(sys.argv[2]).read_text())), end="")
        sys.exit(0)
    if not sys.argv[1:] or any(arg.startswith("-") for arg in sys.argv[1:]):
        print("usage: report.py RESULTS.json... | report.py --compact RESULTS.json", file=sys.stderr)
        sys.exit(2)
    for arg in sys.argv[1:]:
        for out in write(Path(arg)):
            print(out)
