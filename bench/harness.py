"""Runs inside the lab (bench/run.py starts it): pyvmm and QEMU on the same guest kernel, bench initramfs,
disk image and NVMe drive, interleaved, timed by the lab's clock as console lines arrive.

Per repetition: three boots (pyvmm, QEMU q35, QEMU microvm), a virtio-blk run per VMM (I/O, then the
guest idles while the VMM's CPU time and memory are read from /proc), a data-plane run per VMM (network
rows against the lab on a vhost-net NIC, then the virtio-blk workload on a vhost-user-blk disk served by
qemu-storage-daemon), the NVMe drive measured on the
lab's own nvme driver, then bound to vfio-pci and a passthrough run per VMM (NVMe I/O, then trapped
config-space reads and MSI-X table writes), then the drive back on its driver. The order of the VMMs
alternates between repetitions. The last output line is `BENCH-JSON {...}` with every sample."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import analysis as an

# guest/virtio.sh's tags, in its order, and the bench's metric keys (bench/ab_virtio.py reads them too)
VIRTIO_TAGS = {
    "blk-read": "blk_seq_read",
    "blk-write": "blk_seq_write",
    "blk-read-pages": "blk_seq_read_pages",
    "blk-write-pages": "blk_seq_write_pages",
    "blk-rand1": "blk_randread_qd1",
    "blk-rand32": "blk_randread_qd32",
}

# the same workload on a vhost-user-blk disk (guest/virtio.sh again, on the daemon's disk)
VHOST_TAGS = {tag: "vu_" + key.removeprefix("blk_") for tag, key in VIRTIO_TAGS.items()}
# bench-net's modes (guest/bench-net.c) and their metric keys, in the order they are measured
NET_MODES = {"T": "net_guest_to_lab", "R": "net_lab_to_guest", "P": "net_rr"}

# The network rows' tap, inside the lab only: the lab is 192.168.249.1 on it, the guest .2 (no route
# leads anywhere else). One persistent tap that both VMMs open in turn, with the same guest MAC, so each
# sees the same interface and the lab's neighbour entry stays right.
TAP = "benchtap0"
LAB_IP = "192.168.249.1"
GUEST_IP = "192.168.249.2"
NET_MASK = "255.255.255.0"
NET_PORT = 5201
GUEST_MAC = "52:54:00:62:65:01"

# qemu-storage-daemon as docs/virtio-blk.md found fastest in the lab: an iothread that polls for 400 us,
# and io_uring; through the lab's page cache (no cache.direct), as the default --disk and QEMU's
# virtio-blk-pci are.
QSD_IOTHREAD = "iothread,id=iot0,poll-max-ns=400000"
QSD_AIO = "io_uring"

NVME_BDF = "0000:00:03.0"  # the lab's only device (pyvmm-lab run --devices nvme)
GUEST_RAM = 512 << 20
# hugepages: bench-io's BENCH_IO_BUFFER=huge|pages buffers, which fix how many segments a request has
# (with ordinary pages that depends on how the guest's allocator placed them at that boot).
CMDLINE = "console=ttyS0 quiet panic=-1 hugepages=4"


# Test hook (tests/lab/test_bench_smoke.py): the first lab goes silent in this repetition, as a stalled
# lab does, so that bench/run.py's restart in a new lab can be shown. A new lab starts at that repetition,
# so it runs normally there.
STALL_IN_REP = int(os.environ.get("PYVMM_BENCH_STALL_IN_REP", "0"))

# passthrough includes the lab-native and trap runs; net and vhost share one boot per VMM when both run
PARTS = frozenset({"boot", "virtio", "vhost", "net", "passthrough", "distro"})
# distro: cloud-hypervisor's VFIO-guide line (without the device) on the Debian systemd disk, pyvmm and QEMU
# q35 with the same PVH vmlinux; bench/run.py runs it in a lab of its own, without nested paging (README.md,
# the distro disk: QEMU 7.2's emulated nested paging triple-faults such guests).
DISTRO_CMDLINE = "console=ttyS0 root=/dev/vda1 rw"  # the guide's, verbatim: a verbose console
DISTRO_CPUS = 4
# What a failed run whose guest did not finish says (Bench.again takes such a measurement once more).
GUEST_DIED = "the guest or the VMM did not finish cleanly"
MULTI_USER = "Multi-User System"  # systemd's "[  OK  ] Reached target multi-user.target - Multi-User System."


@dataclass
class Settings:
    reps: int
    span: str  # the range sequential passes and random reads cover, e.g. 64M
    io_seconds: float  # each I/O measurement runs this long (the guest's clock)
    trap_seconds: float
    idle_seconds: float
    kernel: str
    vmlinux: str  # the same kernel as an ELF vmlinux, entered through PVH
    initramfs: str
    disk: str
    helpers: str  # directory with bench-io and bench-trap for the lab-native runs
    vm_timeout: float = 300.0
    distro_disk: str = ""  # PYVMM_GUEST_DISTRO_DISK
    guest_initramfs: str = ""  # PYVMM_GUEST_INITRAMFS: mounts root= and hands over to its init
    only: frozenset[str] = PARTS  # which parts to run (a subset while working on one of them)
    first_rep: int = 1  # a lab that continues a stalled run starts at the repetition that stalled
    # --smoke: the data-plane devices join the virtio-blk run's boot (two boots fewer per repetition; the
    # suite's time). Its figures are not compared, and the command lines and helpers are the same.
    one_boot: bool = False
    boot_vmms: frozenset[str] = frozenset(an.BOOT_VMMS)  # who boots for the boot rows (a subset: --boot-vmms)


@dataclass
class RunResult:
    label: str
    lines: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    exited: float = 0.0
    status: int | None = None
    probes: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 0

    def log(self) -> str:
        return "\n".join(f"{t - self.started:9.3f} {line}" for t, line in self.lines)


Probe = Callable[[int, str, dict[str, float]], None]


class VmmStuck(RuntimeError):
    """A VMM outlived SIGKILL: it is stuck in the lab kernel, and the lab is no place to measure any more."""


def run_vmm(label: str, argv: list[str], timeout: float, probe: Probe | None = None) -> RunResult:
    """Start argv, stamp each output line with the lab's clock as it arrives, return at exit.

    Past `timeout` the VMM is killed. One that does not die then is stuck in the kernel: its kernel stacks
    and the lab's blocked tasks are printed and VmmStuck is raised (the reader thread is left behind, since
    its pipe never closes)."""
    result = RunResult(label)
    result.started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put((time.monotonic(), raw))  # stamped as it arrives
        lines.put(None)

    threading.Thread(target=read, name=f"read-{label}", daemon=True).start()
    deadline = result.started + timeout
    killed = False

    def take(item: tuple[float, bytes]) -> None:
        stamp, raw = item
        line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
        result.lines.append((stamp, line))
        if probe is not None:
            try:
                probe(proc.pid, line, result.probes)
            except (OSError, ValueError) as exc:
                result.lines.append((stamp, f"bench: probe failed: {exc}"))

    while True:
        try:
            item = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            say(f"{label}: still running after {timeout:.0f} s; killing it")
            proc.kill()
            killed = True
            break
        if item is None:
            break
        take(item)
    try:
        result.status = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            result.status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            show_stuck(proc.pid)
            raise VmmStuck(f"{label} (pid {proc.pid}) did not exit after SIGKILL") from None
    if killed:  # what it printed last (a child of it may still hold the pipe open: do not wait for the end)
        with contextlib.suppress(queue.Empty):
            while (item := lines.get(timeout=1.0)) is not None:
                take(item)
    result.exited = time.monotonic()
    return result


def show_stuck(pid: int) -> None:
    """What a process stuck in the kernel is waiting for, and every blocked task of the lab."""
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        with contextlib.suppress(OSError):
            state = next(x for x in (task / "status").read_text().splitlines() if x.startswith("State:"))
            say(f"stuck task {task.name} ({(task / 'comm').read_text().strip()}) {state}")
            for frame in (task / "stack").read_text().splitlines():
                say(f"    {frame}")
    with contextlib.suppress(OSError):
        Path("/proc/sysrq-trigger").write_text("w")  # blocked tasks, into the kernel log
    show_kernel_log("emerg,alert,crit,err,warn,notice,info")


def lab_memory() -> str:
    """The lab's memory in a few MiB figures (a run that stalls the lab may be short of it)."""
    kib = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        kib[key] = int(rest.split()[0])
    keys = ("MemAvailable", "MemFree", "Shmem", "AnonPages", "AnonHugePages", "Mlocked")
    return ", ".join(f"{k} {kib.get(k, 0) >> 10}" for k in keys)


_kernel_log_shown = -1.0  # the timestamp of the last kernel message shown


def show_kernel_log(levels: str = "emerg,alert,crit,err,warn") -> None:
    """Print the lab kernel's messages (at these levels) that are newer than the last one shown."""
    global _kernel_log_shown
    proc = subprocess.run(["dmesg", "--level", levels], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        stamp = an.kernel_log_stamp(line)
        if stamp is None or stamp <= _kernel_log_shown:
            continue
        say(f"lab kernel: {line}")
        _kernel_log_shown = stamp


# -- the VMM command lines -------------------------------------------------------------------------------
def cmdline(cmd: str, quiet: bool = True) -> str:
    """The guest's command line; without `quiet` the kernel prints its whole log on the console, as the
    command lines of cloud-hypervisor's docs have it."""
    text = CMDLINE if quiet else CMDLINE.replace(" quiet", "")
    return f'{text} pyvmm.cmd="{cmd}"'


def pyvmm_argv(
    s: Settings,
    cmd: str,
    disk: str | None = None,
    kernel: str | None = None,
    quiet: bool = True,
    device: str | None = None,
    shared: bool = False,
    net: bool = False,
    vhost_socket: str | None = None,
) -> list[str]:
    """`shared`: guest RAM in a memfd (what vhost-user needs); `net`: a NIC on TAP; `vhost_socket`: a
    vhost-user-blk disk served there."""
    argv = [
        "pyvmm",
        "--kernel",
        kernel or s.kernel,
        "--initramfs",
        s.initramfs,
        "--cpus",
        "boot=1",
        "--memory",
        f"size={GUEST_RAM >> 20}M" + (",shared=on" if shared else ""),
        "--serial",
        "tty",
        "--console",
        "off",
        "--cmdline",
        cmdline(cmd, quiet),
    ]
    if disk:
        argv += ["--disk", f"path={disk}"]
    if vhost_socket:
        argv += ["--disk", f"vhost_user=on,socket={vhost_socket}"]
    if net:
        argv += ["--net", f"tap={TAP},ip={LAB_IP},mask={NET_MASK},mac={GUEST_MAC}"]
    if device:
        argv += ["--device", f"path=/sys/bus/pci/devices/{device}/"]
    return argv


def distro_pyvmm_argv(s: Settings, disk: str) -> list[str]:
    """cloud-hypervisor's VFIO-guide line without its --device, and the initramfs the guest kernel needs."""
    return [
        "pyvmm", "--kernel", s.vmlinux, "--initramfs", s.guest_initramfs, "--disk", f"path={disk}",
        "--console", "off", "--serial", "tty", "--cmdline", DISTRO_CMDLINE,
        "--cpus", str(DISTRO_CPUS), "--memory", f"size={GUEST_RAM >> 20}M",
    ]  # fmt: skip


def distro_qemu_argv(s: Settings, disk: str) -> list[str]:
    """The same guest on QEMU q35: the PVH vmlinux, virtio-blk and virtio-rng on PCI, the console on COM1."""
    return [
        "qemu-system-x86_64", "-enable-kvm", "-M", "q35", "-cpu", "host", "-m", str(GUEST_RAM >> 20),
        "-smp", str(DISTRO_CPUS), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio", "-kernel", s.vmlinux, "-initrd", s.guest_initramfs, "-append", DISTRO_CMDLINE,
        "-device", "virtio-rng-pci",
        "-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0",
    ]  # fmt: skip


def qemu_argv(
    s: Settings,
    cmd: str,
    machine: str = "q35",
    disk: str | None = None,
    kernel: str | None = None,
    quiet: bool = True,
    device: str | None = None,
    shared: bool = False,
    net: bool = False,
    vhost_socket: str | None = None,
) -> list[str]:
    """As pyvmm_argv; `shared` is a memfd memory backend with share=on, as vhost-user-blk-pci needs."""
    argv = [
        "qemu-system-x86_64",
        "-enable-kvm",
        "-M",
        machine + (",memory-backend=mem0" if shared else ""),
        "-cpu",
        "host",
        "-m",
        str(GUEST_RAM >> 20),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        kernel or s.kernel,
        "-initrd",
        s.initramfs,
        "-append",
        cmdline(cmd, quiet),
    ]
    # the virtio-rng every pyvmm (and cloud-hypervisor) guest has: the guest's cost of it is the same here
    argv += ["-device", "virtio-rng-device" if machine == "microvm" else "virtio-rng-pci"]
    if disk:
        argv += ["-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0"]
    if shared:
        argv += ["-object", f"memory-backend-memfd,id=mem0,size={GUEST_RAM >> 20}M,share=on"]
    if vhost_socket:
        argv += [
            "-chardev",
            f"socket,id=vu0,path={vhost_socket}",
            "-device",
            "vhost-user-blk-pci,chardev=vu0,num-queues=1",
        ]
    if net:
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=on",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={GUEST_MAC},romfile=",  # no iPXE: the guest boots its kernel
        ]
    if device:
        argv += ["-device", f"vfio-pci,host={device}"]
    return argv


# -- measurements ----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.samples: dict[str, dict[str, list[float]]] = {m.key: {v: [] for v in m.vmms} for m in an.METRICS}
        self.guest: dict[str, dict[str, list[float]]] = {}
        self.extra: dict[str, dict[str, list[float]]] = {}
        self.errors: list[str] = []
        self.notes: dict[str, set[str]] = {}
        self.timings: list[dict[str, object]] = []
        self.reps_done: list[int] = []
        self.retried: list[str] = []  # failures whose measurement was taken again (`again`)

    def add(self, key: str, vmm: str, value: float, guest: float | None = None) -> None:
        self.samples[key][vmm].append(round(value, 6))
        if guest is not None:
            self.guest.setdefault(key, {}).setdefault(vmm, []).append(round(guest, 6))

    def add_extra(self, key: str, vmm: str, value: float) -> None:
        self.extra.setdefault(key, {}).setdefault(vmm, []).append(round(value, 6))

    def fail(self, what: str, result: RunResult | None = None, detail: str = "") -> None:
        message = f"{what}: {detail}" if detail else what
        if result is not None:
            message += f" (exit status {result.status})"
        self.errors.append(message)
        say(f"FAILED {message}")
        if result is not None:
            tail = result.log().splitlines()[-40:]
            say("  last lines:\n    " + "\n    ".join(tail))

    def run(self, label: str, argv: list[str], probe: Probe | None = None) -> RunResult:
        say(f"{label}: starting; lab memory {lab_memory()}")
        result = run_vmm(label, argv, self.s.vm_timeout, probe)
        show_kernel_log()  # a warning from the lab kernel during a run is worth seeing next to it
        self.timings.append(
            {"run": label, "seconds": round(result.exited - result.started, 3), "status": result.status}
        )
        return result

    def _guest_ok(self, label: str, result: RunResult) -> bool:
        if result.ok and any("PYVMM-GUEST-EXIT=0" in line for _, line in result.lines):
            return True
        self.fail(label, result, GUEST_DIED)
        return False

    def again(self, measure: Callable[[], None]) -> None:
        """Take one VMM run's measurement; if its only failure was the guest dying under it, take it once
        more. The emulated lab sometimes kills a nested guest of either VMM mid-run (a QEMU guest then just
        ends, QEMU's status 0 with -no-reboot; README, the distro disk: QEMU 7.2's nested paging). The
        first failure is kept in `retried`, which the report lists; a second one is an error."""
        before = len(self.errors)
        measure()
        failed = self.errors[before:]
        if failed and all(GUEST_DIED in error for error in failed):
            del self.errors[before:]
            self.retried += failed
            say("the guest died under that run; it is run again once")
            measure()

    def _guest_spans(self, label: str, result: RunResult) -> dict[str, an.Span] | None:
        """The guest's marked spans, or None (the failure recorded) when the run or its markers went wrong."""
        if not self._guest_ok(label, result):
            return None
        try:
            return an.spans(result.lines)
        except an.MarkerError as exc:
            self.fail(label, result, str(exc))
            return None

    # boot: start -> first init line, start -> exit
    def boot(self, vmm: str, rep: int) -> None:
        if vmm == an.PYVMM:
            argv = pyvmm_argv(self.s, "true")
        else:
            argv = qemu_argv(self.s, "true", machine="q35" if vmm == an.QEMU_Q35 else "microvm")
        label = f"rep {rep} boot {vmm}"
        result = self.run(label, argv)
        init = an.first_stamp(result.lines, "pyvmm-guest: init")
        if not self._guest_ok(label, result) or init is None:
            if init is None and result.ok:
                self.fail(label, result, "no init line")
            return
        self.add("boot_init", vmm, init - result.started)
        self.add("boot_exit", vmm, result.exited - result.started)
        say(f"{label}: init {init - result.started:.2f} s, exit {result.exited - result.started:.2f} s")

    def boot_variants(self, vmm: str, rep: int) -> None:
        """Issue 17's boots: a bzImage with a verbose console, a PVH vmlinux quiet and verbose, and from
        the PVH pair what one console line costs."""
        variants = [("boot_exit_verbose", self.s.kernel, False), ("boot_exit_pvh", self.s.vmlinux, True),
                    ("boot_exit_pvh_verbose", self.s.vmlinux, False)]
        exits: dict[str, float] = {}
        lines = 0
        def variant(key: str, kernel: str, quiet: bool) -> None:
            nonlocal lines
            if vmm == an.PYVMM:
                argv = pyvmm_argv(self.s, "true", kernel=kernel, quiet=quiet)
            else:
                argv = qemu_argv(self.s, "true", kernel=kernel, quiet=quiet)
            label = f"rep {rep} {key} {vmm}"
            result = self.run(label, argv)
            if not self._guest_ok(label, result):
                return
            exits[key] = result.exited - result.started
            self.add(key, vmm, exits[key])
            if key == "boot_exit_pvh_verbose":
                lines = sum(an.kernel_log_stamp(line) is not None for _, line in result.lines)
            say(f"{label}: exit {exits[key]:.2f} s")

        for key, kernel, quiet in variants:
            self.again(lambda: variant(key, kernel, quiet))  # noqa: B023 (called before the loop goes on)
        if {"boot_exit_pvh", "boot_exit_pvh_verbose"} <= exits.keys() and lines:
            cost = (exits["boot_exit_pvh_verbose"] - exits["boot_exit_pvh"]) / lines * 1000
            self.add("console_line_ms", vmm, cost)
            self.add_extra("console_line_ms.lines", vmm, lines)
            say(f"rep {rep} console lines {vmm}: {lines} lines, {cost:.1f} ms each")

    def distro(self, vmm: str, rep: int) -> None:
        """VMM start to systemd's multi-user target on a fresh copy of the Debian disk (the copy is not
        timed); the VMM then gets SIGTERM, and its stop is not timed either."""
        s = self.s
        disk = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench-distro.raw")
        shutil.copyfile(s.distro_disk, disk)
        argv = distro_pyvmm_argv(s, disk) if vmm == an.PYVMM else distro_qemu_argv(s, disk)

        def stop_at_multi_user(pid: int, line: str, probes: dict[str, float]) -> None:
            if "reached" not in probes and MULTI_USER in line and "Reached target" in line:
                probes["reached"] = time.monotonic()
                os.kill(pid, signal.SIGTERM)

        label = f"rep {rep} distro {vmm}"
        try:
            result = self.run(label, argv, stop_at_multi_user)
        finally:
            os.unlink(disk)
        reached = next((t for t, line in result.lines if "Reached target" in line and MULTI_USER in line),
                       None)
        if reached is None:
            self.fail(label, result, f"{GUEST_DIED}: systemd did not reach the multi-user target")
            return
        self.add("distro_multi_user", vmm, reached - result.started)
        say(f"{label}: multi-user {reached - result.started:.2f} s")

    def _io(self, label: str, vmm: str, spans: dict[str, an.Span], table: dict[str, str]) -> None:
        parts = []
        for tag, key in table.items():
            span = spans.get(tag)
            if span is None:
                self.fail(label, None, f"no complete {tag} measurement")
                continue
            unit = an.METRICS_BY_KEY[key].unit
            value = an.mb_per_s(span) if unit == "MB/s" else an.iops(span)
            self.add(key, vmm, value, an.guest_figure(span, unit))
            self.add_extra(f"{key}.console_line_s", vmm, span.console)
            parts.append(f"{tag} {value:,.0f} {unit}")
        say(f"{label}: " + ", ".join(parts))

    # virtio-blk: I/O, then idle with CPU/RSS probes
    def virtio(self, vmm: str, rep: int, disk: str, dataplane: bool = False) -> None:
        """`dataplane`: the data-plane run's devices and work in this boot too (Settings.one_boot), with the
        vhost-user disk second (vdb) on its own copy of the image."""
        cmd = f"sh /bench/virtio.sh {self.s.span} {self.s.io_seconds:g} {self.s.idle_seconds:g}"
        label = f"rep {rep} virtio-blk{'+data-plane' if dataplane else ''} {vmm}"
        plane = DataPlane(self, label, disk + ".vu", second_disk=True) if dataplane else None
        if plane is not None and not plane.start():
            return
        if plane is not None:
            argv = plane.argv(vmm, " && ".join([*plane.steps, cmd]), disk)
        elif vmm == an.PYVMM:
            argv = pyvmm_argv(self.s, cmd, disk=disk)
        else:
            argv = qemu_argv(self.s, cmd, disk=disk)
        try:
            result = self.run(label, argv, probe=plane.probe if plane else idle_probe)
        finally:
            if plane is not None:
                plane.stop()
        spans = self._guest_spans(label, result)
        if plane is not None:
            plane.finish(vmm, spans)
        if spans is None:
            return
        self._io(
            label,
            vmm,
            spans,
            VIRTIO_TAGS,
        )
        p = result.probes
        if not {"cpu0", "cpu1", "hwm_kib", "ram_kib"} <= p.keys():
            self.fail(label, result, f"idle probes missing ({sorted(p)})")
            return
        tick = os.sysconf("SC_CLK_TCK")
        cpu = (p["cpu1"] - p["cpu0"]) / tick
        rss = (p["hwm_kib"] - p["ram_kib"]) / 1024
        self.add("vmm_idle_cpu", vmm, cpu)
        self.add("vmm_rss", vmm, rss)
        self.add_extra("vmm_idle_cpu.schedstat_s", vmm, (p["sched1"] - p["sched0"]) / 1e9)
        self.add_extra("vmm_idle_cpu.idle_lab_s", vmm, p["t1"] - p["t0"])
        self.add_extra("vmm_rss.vmhwm_mib", vmm, p["hwm_kib"] / 1024)
        self.add_extra("vmm_rss.guest_ram_rss_mib", vmm, p["ram_kib"] / 1024)
        say(
            f"{label}: idle CPU {cpu:.2f} s over {p['t1'] - p['t0']:.1f} s, "
            f"VmHWM {p['hwm_kib'] / 1024:.0f} MiB - guest RAM {p['ram_kib'] / 1024:.0f} MiB = {rss:.0f} MiB"
        )

    # network and vhost-user-blk: the data planes pyvmm hands to the kernel (vhost-net) or to a daemon
    def dataplane(self, vmm: str, rep: int, disk: str) -> None:
        """One boot per VMM for the net and vhost parts (whichever run): the guest serves the lab's network
        measurements first (guest/net.sh), then runs the virtio-blk workload on its vhost-user disk. Both
        VMMs' guests have their RAM in a shared memfd, which vhost-user needs."""
        only = self.s.only
        parts = [p for p, on in (("net", "net" in only), ("vhost-user-blk", "vhost" in only)) if on]
        label = f"rep {rep} {'+'.join(parts)} {vmm}"
        plane = DataPlane(self, label, disk, second_disk=False)
        if not plane.start():
            return
        try:
            result = self.run(label, plane.argv(vmm, " && ".join(plane.steps)), probe=plane.probe)
        finally:
            plane.stop()
        plane.finish(vmm, self._guest_spans(label, result))

    def _net(self, label: str, vmm: str, stats: dict[str, dict[str, int]]) -> None:
        parts = []
        for mode, key in NET_MODES.items():
            st = stats.get(mode)
            if not st or not st.get("ns") or not st.get("ios"):
                self.fail(label, None, f"no complete {key} measurement")
                continue
            seconds = st["ns"] / 1e9
            unit = an.METRICS_BY_KEY[key].unit
            value = st["bytes"] / seconds / 1e6 if unit == "MB/s" else st["ios"] / seconds
            self.add(key, vmm, value)
            parts.append(f"{key} {value:,.1f} {unit}")
        say(f"{label}: " + ", ".join(parts))

    def start_daemon(self, label: str, disk: str, sock: str) -> subprocess.Popen[bytes] | None:
        """qemu-storage-daemon serving `disk` on `sock` (a fresh one for each VMM's run), once listening."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        log = open(sock + ".log", "wb")  # noqa: SIM115 - the daemon writes it; closed with the process
        daemon = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--object",
                QSD_IOTHREAD,
                "--blockdev",
                f"driver=file,node-name=disk0,filename={disk},aio={QSD_AIO}",
                "--export",
                "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,"
                f"addr.path={sock},writable=on,num-queues=1,iothread=iot0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait_for(lambda: os.path.exists(sock) or daemon.poll() is not None, 30) and daemon.poll() is None:
            return daemon
        daemon.kill()
        daemon.wait()
        tail = Path(sock + ".log").read_text(errors="replace")[-500:]
        self.fail(label, None, f"qemu-storage-daemon did not listen on {sock}: {tail}")
        return None

    def stop_daemon(self, daemon: subprocess.Popen[bytes]) -> None:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()

    def setup_tap(self) -> bool:
        """The persistent tap both VMMs open, configured once: the lab's address on it, up."""
        steps = [
            ["modprobe", "-a", "tun", "vhost_net"],
            ["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"],
            ["ip", "addr", "add", f"{LAB_IP}/24", "dev", TAP],
            ["ip", "link", "set", TAP, "up"],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode != 0:
                self.fail(" ".join(step), None, (proc.stderr or proc.stdout).strip())
                return False
        return True

    # NVMe on the lab's own driver: the ceiling
    def native(self, rep: int) -> None:
        label = f"rep {rep} nvme {an.NATIVE}"
        dev = "/dev/nvme0n1"
        if not wait_for(lambda: Path(dev).exists(), 30):
            self.fail(label, None, f"{dev} did not appear")
            return
        io = str(Path(self.s.helpers) / "bench-io")
        span = self.s.span
        secs = f"{self.s.io_seconds:g}"
        script = (  # the sequential buffer in a huge page, as in the guests (passthrough.sh)
            "echo 2 > /proc/sys/vm/nr_hugepages && "
            f"BENCH_IO_BUFFER=huge {io} nvme-seq {dev} read 1M 1 {span} 0 {secs} && "
            f"{io} nvme-rand1 {dev} randread 4K 1 {span} 0 {secs} && "
            f"{io} nvme-rand32 {dev} randread 4K 32 {span} 0 {secs}"
        )
        result = self.run(label, ["sh", "-c", script])
        if not result.ok:
            self.fail(label, result)
            return
        self._io(
            label,
            an.NATIVE,
            an.spans(result.lines),
            {
                "nvme-seq": "nvme_seq_read",
                "nvme-rand1": "nvme_randread_qd1",
                "nvme-rand32": "nvme_randread_qd32",
            },
        )

    # passthrough: NVMe I/O, then trapped accesses
    def passthrough(self, vmm: str, rep: int) -> None:
        cmd = f"sh /bench/passthrough.sh {self.s.span} {self.s.io_seconds:g} {self.s.trap_seconds:g}"
        argv = (
            pyvmm_argv(self.s, cmd, device=NVME_BDF)
            if vmm == an.PYVMM
            else qemu_argv(self.s, cmd, device=NVME_BDF)
        )
        label = f"rep {rep} passthrough {vmm}"
        result = self.run(label, argv)
        spans = self._guest_spans(label, result)
        if spans is None:
            return
        self._io(
            label,
            vmm,
            spans,
            {
                "nvme-seq": "nvme_seq_read",
                "nvme-rand1": "nvme_randread_qd1",
                "nvme-rand32": "nvme_randread_qd32",
            },
        )
        parts = []
        for tag, key in (("cfg", "trap_config_read"), ("msix", "trap_msix_write")):
            span = spans.get(tag)
            if span is None or not span.stats.get("ios"):
                self.fail(label, result, f"no complete {tag} measurement")
                continue
            value = an.micros_per_access(span)
            self.add(key, vmm, value, an.guest_figure(span, "µs"))
            self.add_extra(f"{key}.accesses", vmm, span.stats["ios"])
            if "offset" in span.stats:
                self.notes.setdefault("trap_config_read.offset", set()).add(hex(span.stats["offset"]))
            parts.append(f"{tag} {value:.1f} µs ({span.stats['ios']} accesses)")
        say(f"{label}: " + ", ".join(parts))

    def host(self, action: str) -> bool:
        proc = subprocess.run(["pyvmm-host", action, NVME_BDF], capture_output=True, text=True)
        if proc.returncode != 0:
            self.fail(f"pyvmm-host {action} {NVME_BDF}", None, (proc.stderr or proc.stdout).strip())
            return False
        return True

    def run_all(self) -> None:
        s = self.s
        disk = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench-disk.raw")
        shutil.copyfile(s.disk, disk)
        if "net" in s.only and not self.setup_tap():
            s.only = s.only - {"net"}  # the failure is recorded; the other parts go on
        last = s.first_rep + s.reps - 1
        for rep in range(s.first_rep, last + 1):
            say(f"== repetition {rep}/{last}")
            if rep == STALL_IN_REP and rep > s.first_rep:
                time.sleep(1e6)  # the test hook: silent, as a stalled lab is (see STALL_IN_REP)
            self.repetition(rep, disk)
            self.reps_done.append(rep)
            # Everything so far, after every repetition: if the lab stalls later, bench/run.py keeps these
            # and goes on in a new lab.
            print("BENCH-JSON " + json.dumps(self.result(), sort_keys=True), flush=True)

    def repetition(self, rep: int, disk: str) -> None:
        s = self.s
        flip = rep % 2 == 0
        pair = [an.PYVMM, an.QEMU][:: -1 if flip else 1]
        boots = [an.PYVMM, an.QEMU_Q35, an.QEMU_MICROVM]
        boots = [vmm for vmm in boots[rep % 3 :] + boots[: rep % 3] if vmm in s.boot_vmms]
        if "boot" in s.only:
            for vmm in boots:
                self.again(lambda: self.boot(vmm, rep))  # noqa: B023 (called before the loop goes on)
            # Not in the suite's smoke run: each boot there is one more chance of the lab's nested-paging
            # fault (README, the distro disk), and the variants' command lines are unit-tested.
            if not s.one_boot:
                for vmm in pair:
                    self.boot_variants(an.QEMU_Q35 if vmm == an.QEMU else vmm, rep)
        if "distro" in s.only:
            for vmm in pair:
                self.again(lambda: self.distro(an.QEMU_Q35 if vmm == an.QEMU else vmm, rep))  # noqa: B023
        merged = s.one_boot and "virtio" in s.only and bool(s.only & {"net", "vhost"})
        if "virtio" in s.only:
            for vmm in pair:
                self.again(lambda: self.virtio(vmm, rep, disk, dataplane=merged))  # noqa: B023
        if s.only & {"net", "vhost"} and not merged:
            for vmm in pair:
                self.again(lambda: self.dataplane(vmm, rep, disk))  # noqa: B023
        if "passthrough" not in s.only:
            return
        self.native(rep)
        if self.host("bind"):
            for vmm in pair:
                self.again(lambda: self.passthrough(vmm, rep))  # noqa: B023
            self.host("unbind")

    def result(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "guest_clock_samples": self.guest,
            "details": self.extra,
            "notes": {k: sorted(v) for k, v in self.notes.items()},
            "errors": self.errors,
            "retried": self.retried,
            "runs": self.timings,
            "reps_done": self.reps_done,
        }


class DataPlane:
    """What a run with the data-plane devices adds, for one VMM: the guest's steps (guest/net.sh, then
    guest/virtio.sh on the vhost-user disk), the qemu-storage-daemon serving `disk` (a fresh one per run),
    the lab's side of the network rows, and their figures. `second_disk`: the vhost-user disk is the
    guest's second (vdb, tags `vu-blk-...`), after the run's own --disk."""

    def __init__(self, bench: Bench, label: str, disk: str, second_disk: bool) -> None:
        s = bench.s
        self.bench, self.label, self.disk = bench, label, disk
        self.net, self.vhost = "net" in s.only, "vhost" in s.only
        self.prefix = "vu-" if second_disk else ""
        self.steps: list[str] = []
        if self.net:
            serve_for = int(120 + 3 * s.io_seconds)  # the guest's server gives up after this
            self.steps.append(f"sh /bench/net.sh {GUEST_IP}/24 {LAB_IP} {NET_PORT} {serve_for}")
        if self.vhost:
            device = "vdb" if second_disk else "vda"
            self.steps.append(f"sh /bench/virtio.sh {s.span} {s.io_seconds:g} 0 {device} {self.prefix}")
        self.socket = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench-vu.sock") if self.vhost else None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.client = NetClient(Path(s.helpers) / "bench-net", s.io_seconds) if self.net else None
        self.probes_idle = second_disk  # the run's own idle stretch is measured too

    def start(self) -> bool:
        if self.socket is None:
            return True
        if self.prefix and not os.path.exists(self.disk):  # its own copy: two disks, two writers
            shutil.copyfile(self.bench.s.disk, self.disk)
        self.daemon = self.bench.start_daemon(self.label, self.disk, self.socket)
        return self.daemon is not None

    def argv(self, vmm: str, cmd: str, disk: str | None = None) -> list[str]:
        build = pyvmm_argv if vmm == an.PYVMM else qemu_argv
        return build(self.bench.s, cmd, disk=disk, shared=True, net=self.net, vhost_socket=self.socket)

    def probe(self, pid: int, line: str, probes: dict[str, float]) -> None:
        if self.client is not None:
            self.client.probe(pid, line, probes)
        if self.probes_idle:
            idle_probe(pid, line, probes)

    def stop(self) -> None:
        if self.daemon is not None:
            self.bench.stop_daemon(self.daemon)

    def finish(self, vmm: str, spans: dict[str, an.Span] | None) -> None:
        if self.client is not None:
            self.client.join()
            for error in self.client.errors:
                self.bench.fail(self.label, None, f"lab side of the network rows: {error}")
            if spans is not None:
                self.bench._net(self.label, vmm, self.client.stats)
        if self.vhost and spans is not None:
            tags = {self.prefix + tag: key for tag, key in VHOST_TAGS.items()}
            self.bench._io(self.label, vmm, spans, tags)


class NetClient:
    """The lab's side of the network rows: when the guest says `BENCH net READY`, a thread runs bench-net
    against it once per mode (guest/bench-net.c), each for `seconds` of the lab's clock, then tells the
    guest's server to quit. `stats` has each mode's `STATS` figures."""

    def __init__(self, binary: Path, seconds: float) -> None:
        self.binary = binary
        self.seconds = seconds
        self.stats: dict[str, dict[str, int]] = {}
        self.errors: list[str] = []
        self.thread: threading.Thread | None = None

    def probe(self, pid: int, line: str, probes: dict[str, float]) -> None:
        if "BENCH net READY" in line and self.thread is None:
            self.thread = threading.Thread(target=self._measure, name="bench-net", daemon=True)
            self.thread.start()

    def _bench_net(self, mode: str) -> str:
        tag = f"net-{mode}"
        argv = [str(self.binary), tag, GUEST_IP, str(NET_PORT), mode, f"{self.seconds:g}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[1:])}: {(proc.stdout + proc.stderr).strip()}")
        return proc.stdout

    def _measure(self) -> None:
        try:
            for mode in NET_MODES:
                self.stats[mode] = an.stats(self._bench_net(mode), f"net-{mode}")
        except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            self.errors.append(str(exc))
        finally:
            with contextlib.suppress(OSError, RuntimeError, subprocess.TimeoutExpired):
                self._bench_net("Q")  # the guest goes on (or powers off) in any case

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=60)
        elif not self.errors:
            self.errors.append("the guest never said it was ready")


def idle_probe(pid: int, line: str, probes: dict[str, float]) -> None:
    """Reads the VMM's /proc files when the guest says its idle stretch starts and ends. The VMM's cost
    includes its child processes' (the qemu-storage-daemon pyvmm starts for a --disk does what QEMU's own
    threads do): their CPU time, and their private memory (RssAnon) on top of the VMM's peak."""
    if "BENCH idle START" in line:
        probes["t0"] = time.monotonic()
        probes["cpu0"] = sum(an.cpu_ticks(Path(f"/proc/{p}/stat").read_text()) for p in family(pid))
        probes["sched0"] = sum(schedstat_ns(p) for p in family(pid))
    elif "BENCH idle END" in line:
        probes["t1"] = time.monotonic()
        probes["cpu1"] = sum(an.cpu_ticks(Path(f"/proc/{p}/stat").read_text()) for p in family(pid))
        probes["sched1"] = sum(schedstat_ns(p) for p in family(pid))
        children = sum(an.status_kib(Path(f"/proc/{p}/status").read_text(), "RssAnon")
                       for p in family(pid)[1:])
        probes["hwm_kib"] = an.status_kib(Path(f"/proc/{pid}/status").read_text(), "VmHWM") + children
        probes["ram_kib"] = an.guest_ram_rss_kib(Path(f"/proc/{pid}/smaps").read_text(), GUEST_RAM)


def family(pid: int) -> list[int]:
    """`pid` and its child processes (/proc/PID/task/*/children)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *children]


def schedstat_ns(pid: int) -> int:
    """CPU time of every thread of the process in ns (/proc/PID/task/*/schedstat, first field)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total


def wait_for(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--span", default="64M")
    p.add_argument("--io-seconds", type=float, default=3)
    p.add_argument("--trap-seconds", type=float, default=2)
    p.add_argument("--idle-seconds", type=float, default=10)
    p.add_argument("--initramfs", required=True)
    p.add_argument("--helpers", required=True)
    p.add_argument("--vm-timeout", type=float, default=300)
    p.add_argument("--first-rep", type=int, default=1, help="number the repetitions from this one")
    p.add_argument("--one-boot", action="store_true", help="virtio, net and vhost in one boot per VMM")
    p.add_argument("--only", default=",".join(sorted(PARTS)), help="comma-separated parts to run")
    p.add_argument("--boot-vmms", default=",".join(an.BOOT_VMMS), help="who boots for the boot rows")
    a = p.parse_args()
    env = os.environ
    settings = Settings(
        a.reps,
        a.span,
        a.io_seconds,
        a.trap_seconds,
        a.idle_seconds,
        env["PYVMM_GUEST_KERNEL"],
        env["PYVMM_GUEST_VMLINUX"],
        a.initramfs,
        env["PYVMM_GUEST_DISK"],
        a.helpers,
        a.vm_timeout,
        env.get("PYVMM_GUEST_DISTRO_DISK", ""),
        env.get("PYVMM_GUEST_INITRAMFS", ""),
        frozenset(a.only.split(",")),
        a.first_rep,
        a.one_boot,
        frozenset(a.boot_vmms.split(",")),
    )
    bench = Bench(settings)  # pyvmm's bytecode is there: `pyvmm-lab run` compiles the package first
    started = time.monotonic()
    show_kernel_log()  # what the lab said before the first run, so that later lines are news
    try:
        bench.run_all()
    except VmmStuck as exc:
        bench.fail(f"{exc}; the bench stops here")
    finally:
        out = bench.result()
        out["lab_seconds"] = round(time.monotonic() - started, 1)
        out["lab"] = {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "qemu": qemu_version(),
            "python": sys.version.split()[0],
        }
        print("BENCH-JSON " + json.dumps(out, sort_keys=True), flush=True)
    return 0 if not bench.errors else 1


def qemu_version() -> str:
    proc = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.stdout else "?"


if __name__ == "__main__":
    sys.exit(main())
