"""Pure logic of the benchmark: the metrics, turning lab-clock-stamped console lines into figures, and
the statistics the report shows. No I/O here (the harness and the report writer do that)."""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PYVMM = "pyvmm"
QEMU = "qemu"
QEMU_Q35 = "qemu-q35"
QEMU_MICROVM = "qemu-microvm"
NATIVE = "lab-native"


@dataclass(frozen=True)
class Goal:
    """The issue's target for pyvmm: median(pyvmm) / median(against) compared with `ratio`."""

    against: str
    ratio: float

    def met(self, value: float, better: str) -> bool:
        return value <= self.ratio if better == "lower" else value >= self.ratio

    def text(self, better: str) -> str:
        return f"{'≤' if better == 'lower' else '≥'} {self.ratio:g}x {self.against}"


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    better: str  # "lower" or "higher"
    vmms: tuple[str, ...]
    goals: tuple[Goal, ...] = ()
    smoke: bool = True  # measured by `bench/run.py --smoke` too (the suite's run)

    @property
    def baseline(self) -> str:
        """The QEMU configuration pyvmm's ratio is taken against."""
        return self.vmms[1]


BOOT_VMMS = (PYVMM, QEMU_Q35, QEMU_MICROVM)
VARIANT_VMMS = (PYVMM, QEMU_Q35)  # the boot variants: a verbose console, the PVH entry (no microvm: issue 17)
PT_VMMS = (PYVMM, QEMU, NATIVE)
VM_PAIR = (PYVMM, QEMU)
PT_GOALS = (Goal(QEMU, 0.95), Goal(NATIVE, 0.9))

BLK_ROWS = (  # the virtio-blk workload (guest/virtio.sh): key suffix, what, unit
    ("seq_read", "sequential read, 1 MiB O_DIRECT, one segment", "MB/s"),
    ("seq_write", "sequential write, 1 MiB O_DIRECT, one segment", "MB/s"),
    ("seq_read_pages", "sequential read, 1 MiB O_DIRECT, 256 segments of 4 KiB", "MB/s"),
    ("seq_write_pages", "sequential write, 1 MiB O_DIRECT, 256 segments of 4 KiB", "MB/s"),
    ("randread_qd1", "4 KiB random read, QD1", "IOPS"),
    ("randread_qd32", "4 KiB random read, QD32", "IOPS"),
)

METRICS: tuple[Metric, ...] = (
    Metric(
        "boot_init",
        "boot: VMM start to the guest's first init line",
        "s",
        "lower",
        BOOT_VMMS,
        (Goal(QEMU_Q35, 0.5),),
    ),
    Metric(
        "boot_exit",
        "boot: VMM start to VMM exit after the guest's poweroff",
        "s",
        "lower",
        BOOT_VMMS,
        (Goal(QEMU_Q35, 0.5),),
    ),
    # issue 17: what cloud-hypervisor's users boot: a PVH vmlinux, a console without `quiet`
    Metric(
        "boot_exit_verbose",
        "boot: VMM start to exit, bzImage, verbose console (no `quiet`)",
        "s",
        "lower",
        VARIANT_VMMS,
        smoke=False,
    ),
    Metric("boot_exit_pvh", "boot: VMM start to exit, PVH vmlinux, quiet", "s", "lower", VARIANT_VMMS,
           smoke=False),
    Metric(
        "boot_exit_pvh_verbose",
        "boot: VMM start to exit, PVH vmlinux, verbose console",
        "s",
        "lower",
        VARIANT_VMMS,
        (Goal(QEMU_Q35, 1.0),),
        smoke=False,
    ),
    Metric(
        "console_line_ms",
        "boot: one console line (PVH verbose less quiet, per kernel log line)",
        "ms",
        "lower",
        VARIANT_VMMS,
        smoke=False,
    ),
    Metric(
        "distro_multi_user",
        "boot: the VFIO guide's Debian systemd disk, VMM start to multi-user (PVH, 4 vCPUs, verbose console)",
        "s",
        "lower",
        VARIANT_VMMS,
        smoke=False,
    ),
    Metric(
        "nvme_seq_read",
        "passthrough NVMe: sequential read, 1 MiB O_DIRECT, one segment",
        "MB/s",
        "higher",
        PT_VMMS,
        PT_GOALS,
    ),
    Metric(
        "nvme_randread_qd1", "passthrough NVMe: 4 KiB random read, QD1", "IOPS", "higher", PT_VMMS, PT_GOALS
    ),
    Metric(
        "nvme_randread_qd32", "passthrough NVMe: 4 KiB random read, QD32", "IOPS", "higher", PT_VMMS, PT_GOALS
    ),
    # pyvmm `--disk path=...` (as served by default: docs/virtio-blk.md#who-serves-a-disk) against QEMU's
    # virtio-blk-pci
    *(
        Metric(f"blk_{k}", f"virtio-blk: {what}", unit, "higher", VM_PAIR, (Goal(QEMU, 0.95),))
        for k, what, unit in BLK_ROWS
    ),
    # pyvmm `--disk vhost_user=on` against QEMU's vhost-user-blk-pci, on the same qemu-storage-daemon setup
    *(
        Metric(f"vu_{k}", f"vhost-user-blk: {what}", unit, "higher", VM_PAIR, (Goal(QEMU, 0.95),))
        for k, what, unit in BLK_ROWS
    ),
    # pyvmm `--net` (vhost-net) against QEMU `-netdev tap,vhost=on` with virtio-net-pci, on the same tap
    Metric(
        "net_guest_to_lab",
        "network: TCP throughput, guest to lab",
        "MB/s",
        "higher",
        VM_PAIR,
        (Goal(QEMU, 0.95),),
    ),
    Metric(
        "net_lab_to_guest",
        "network: TCP throughput, lab to guest",
        "MB/s",
        "higher",
        VM_PAIR,
        (Goal(QEMU, 0.95),),
    ),
    Metric(
        "net_rr",
        "network: TCP request/response, 1 byte each way, one connection",
        "trans/s",
        "higher",
        VM_PAIR,
        (Goal(QEMU, 0.95),),
    ),
    Metric(
        "vmm_rss",
        "VMM cost: peak RSS (VmHWM) less guest RAM resident",
        "MiB",
        "lower",
        VM_PAIR,
        (Goal(QEMU, 1.0),),
    ),
    Metric(
        "vmm_idle_cpu",
        "VMM cost: CPU time (utime+stime) while the guest idles",
        "s",
        "lower",
        VM_PAIR,
        (Goal(QEMU, 1.0),),
    ),
    Metric("trap_config_read", "trapped: config-space dword read round trip", "µs", "lower", VM_PAIR),
    Metric("trap_msix_write", "trapped: MSI-X table write round trip", "µs", "lower", VM_PAIR),
)

METRICS_BY_KEY = {m.key: m for m in METRICS}

# Console markers of the guest helpers (bench/guest/*.c) and guest scripts: `BENCH <tag> <word>`.
_MARKER = re.compile(r"BENCH (\S+) (NL\d|START|END|STATS|ERROR)\b(.*)")


@dataclass
class Span:
    """One measured stretch: START..END on the lab's clock less one console line's cost."""

    tag: str
    seconds: float  # lab clock, console cost subtracted
    console: float  # what one console line cost (median of the NL spacings); 0 without NL lines
    stats: dict[str, int]

    @property
    def guest_seconds(self) -> float | None:
        ns = self.stats.get("guest_ns")
        return ns / 1e9 if ns else None


class MarkerError(ValueError):
    pass


def spans(lines: Iterable[tuple[float, str]]) -> dict[str, Span]:
    """Every complete `BENCH <tag>` group in lab-clock-stamped console lines, by tag."""
    seen: dict[str, dict[str, float]] = {}
    stats: dict[str, dict[str, int]] = {}
    for stamp, line in lines:
        match = _MARKER.search(line)
        if not match:
            continue
        tag, word, rest = match.groups()
        if word == "ERROR":
            raise MarkerError(f"{tag}: {rest.strip()}")
        if word == "STATS":
            stats[tag] = {k: int(v, 0) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+|\d+)", rest)}
        else:
            seen.setdefault(tag, {}).setdefault(word, stamp)
    out: dict[str, Span] = {}
    for tag, words in seen.items():
        if "START" not in words or "END" not in words:
            continue
        nl = [words[f"NL{i}"] for i in range(10) if f"NL{i}" in words]
        console = statistics.median(b - a for a, b in itertools.pairwise(nl)) if len(nl) > 1 else 0.0
        elapsed = max(words["END"] - words["START"] - console, 1e-6)
        out[tag] = Span(tag, elapsed, console, stats.get(tag, {}))
    return out


def stats(text: str, tag: str) -> dict[str, int]:
    """The figures of the `BENCH <tag> STATS k=v ...` line in a helper's output (the lab-side bench-net)."""
    for line in text.splitlines():
        match = _MARKER.search(line)
        if match and match.group(1) == tag:
            if match.group(2) == "ERROR":
                raise MarkerError(f"{tag}: {match.group(3).strip()}")
            if match.group(2) == "STATS":
                return {k: int(v, 0) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+|\d+)", match.group(3))}
    raise MarkerError(f"{tag}: no STATS line in {text.strip()[-200:]!r}")


def first_stamp(lines: Iterable[tuple[float, str]], needle: str) -> float | None:
    for stamp, line in lines:
        if needle in line:
            return stamp
    return None


def mb_per_s(span: Span) -> float:
    return span.stats["bytes"] / span.seconds / 1e6


def iops(span: Span) -> float:
    return span.stats["ios"] / span.seconds


def micros_per_access(span: Span) -> float:
    return span.seconds / span.stats["ios"] * 1e6


def guest_figure(span: Span, kind: str) -> float | None:
    """The same figure by the guest's own clock (secondary: a nested guest's clock drifts)."""
    guest = span.guest_seconds
    if not guest:
        return None
    if kind == "MB/s":
        return span.stats["bytes"] / guest / 1e6
    if kind == "IOPS":
        return span.stats["ios"] / guest
    return guest / span.stats["ios"] * 1e6


# -- /proc parsing (the harness reads the files; these only parse) -------------------------------------
def cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks, every thread of the process) from /proc/PID/stat."""
    fields = stat_text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted after the comm


def kernel_log_stamp(line: str) -> float | None:
    """The timestamp (seconds since boot) of a `dmesg` line such as `[  12.345678] text`, if it has one."""
    match = re.match(r"\[\s*(\d+\.\d+)\]", line)
    return float(match.group(1)) if match else None


def status_kib(status_text: str, key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", status_text, re.MULTILINE)
    if not match:
        raise ValueError(f"no {key} in /proc/PID/status")
    return int(match.group(1))


def guest_ram_rss_kib(smaps_text: str, ram_bytes: int) -> int:
    """Resident KiB of the anonymous or memfd mappings big enough to be guest RAM (at least half of it):
    with shared memory (vhost-user) a VMM maps guest RAM from a memfd."""
    total = 0
    size = rss = 0
    anonymous = False
    header = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ (\d+)\s*(.*)$")

    def flush() -> int:
        return rss if anonymous and size * 1024 >= ram_bytes // 2 else 0

    for line in smaps_text.splitlines():
        match = header.match(line)
        if match:
            total += flush()
            inode, name = match.groups()
            anonymous = (inode == "0" and not name.startswith("/")) or name.startswith("/memfd:")
            size = rss = 0
        elif line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
    return total + flush()


# -- statistics ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    n: int
    min: float
    median: float
    max: float


def summarize(samples: Sequence[float]) -> Summary | None:
    values = [float(v) for v in samples if v is not None]
    if not values:
        return None
    return Summary(len(values), min(values), statistics.median(values), max(values))


def ratio(metric: Metric, samples: dict[str, list[float]], against: str) -> float | None:
    ours, theirs = summarize(samples.get(PYVMM, [])), summarize(samples.get(against, []))
    if ours is None or theirs is None or theirs.median == 0:
        return None
    return ours.median / theirs.median


def fmt(value: float | None) -> str:
    """A figure with 3 significant digits (no exponent), or an em dash."""
    if value is None:
        return "—"
    magnitude = abs(value)
    digits = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
    return f"{value:,.{digits}f}"
