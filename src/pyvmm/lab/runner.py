"""`pyvmm-lab run` and `pyvmm-lab shell`: boot the lab (QEMU/TCG, q35, Intel IOMMU) and run a command."""

from __future__ import annotations

import compileall
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.lab.assets import Manifest, load_manifest
from pyvmm.lab.devices import NINEP_SLOT, parse_device_spec, qemu_device_args
from pyvmm.lab.paths import AssetPaths
from pyvmm.lab.pulse import Pulse

READY_MARKER = "PYVMM-LAB-READY"
EXIT_MARKER = "PYVMM-LAB-EXIT="
FAIL_MARKER = "PYVMM-LAB-FAIL:"

EXIT_TIMEOUT = 124
EXIT_LAB_FAILED = 125
EXIT_LAB_STALLED = 126  # internal: the lab stopped answering its pulse (a new lab may run the command)
EXIT_LAB_DIED = 127  # internal: the lab was reset or its kernel panicked under the command (likewise)
# Printed on stdout before a command runs again in a new lab: what came before it is the stalled lab's.
RESTART_MARKER = "PYVMM-LAB-RESTART"

QMP_SOCKET = "qmp.sock"
PULSE_SOCKET = "pulse.sock"
QEMU_LOG = "qemu.log"
# QMP's SHUTDOWN reasons, as a lab failure says them
_SHUTDOWN_REASONS = {
    "guest-shutdown": "the lab powered itself off",
    "guest-reset": "the lab was reset (a triple fault or a reset request in the emulated host)",
    "guest-panic": "the lab kernel panicked",
}

_PASSED_ENV = ("LANG", "LC_ALL", "TERM", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")


class LabError(PyvmmError, RuntimeError):
    """The lab itself could not run (not the command inside it)."""


def default_lab_cpus() -> int:
    """2 lab CPUs where this machine has 2 cores or more, else 1. With one lab CPU a guest with several
    vCPUs crawls (every vCPU thread and the lab's own work share one emulated CPU: a 4-vCPU guest did not
    reach init in 25 minutes); with two, QEMU runs them on two host threads (multi-threaded TCG). More lab
    CPUs than host cores only adds contention."""
    return min(DEFAULT_LAB_CPUS, len(os.sched_getaffinity(0)))


DEFAULT_LAB_CPUS = 2


@dataclass
class LabOptions:
    devices: list[str] = field(default_factory=lambda: parse_device_spec(None))
    memory_mib: int = 2048
    cpus: int = field(default_factory=default_lab_cpus)
    timeout: float = 900.0
    stall_timeout: float | None = None  # give up when the command prints nothing for this long
    # The lab itself has stalled when it answers no pulse for this long (pyvmm/lab/pulse.py); a healthy lab
    # answers within a second or two even with a nested guest keeping its CPUs busy.
    pulse_timeout: float = 120.0
    restarts: int = 1  # new labs for a command whose lab stalled
    # The lab's KVM gives its guests nested paging (kvm_amd npt=1, the module's default); off, it shadows
    # their page tables instead (the emulated CPU's nested page walks are then not used).
    npt: bool = True
    verbose: bool = False


# A 1-CPU lab's CPU: every feature TCG emulates (SVM for the nested KVM among them), as AMD family 0x14. `max`
# alone says family 0xf (K8), one of the families Linux believes has a GART (amd_gart_present()), so every
# kernel the lab boots, the lab's own and all its guests (a VMM hands them the lab's family), searched all
# 256 PCI buses for an AGP bridge twice at boot: 16,384 config-space reads, each an exit to the guest's VMM
# (about 5 s of a pyvmm guest's boot, 2 s of a QEMU one). No host of today has a GART (families 0x17 and
# later); 0x14 has none either, and the kernel gives it no mitigation the emulated CPU would pay for (it
# reports spectre_v2 "not affected" there, where family 0xf got retpolines; the kernel's table puts 0x17
# and 0x19 under retbleed and SRSO). README.md, the lab.
LAB_CPU = "max,family=0x14,model=0"
# A lab with more than one CPU (multi-threaded TCG) keeps plain `max`: as family 0x14 a 2-CPU lab stalled
# within minutes under eight 2-vCPU boots that `max` ran through, and twice in one `make bench` (both lab
# CPUs spinning on a lock in try_to_wake_up from kvm_vcpu_kick); why is not known yet.
LAB_CPU_SMP = "max"


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise LabError("qemu-system-x86_64 not found: run `make deps` (Debian package qemu-system-x86)")
    return path


class Lab:
    def __init__(self, paths: AssetPaths | None = None) -> None:
        self.paths = paths or AssetPaths()
        try:
            self.manifest: Manifest = load_manifest(self.paths)
        except RuntimeError as exc:
            raise LabError(str(exc)) from exc

    @property
    def kernel_root(self) -> Path:
        return self.paths.kernel_root / self.manifest.kernel_release

    def environment(self) -> dict[str, str]:
        """Variables the command sees inside the lab."""
        venv_bin = str(Path(sys.prefix) / "bin")
        path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        if venv_bin not in path.split(":"):
            path = f"{venv_bin}:{path}"
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        env.update(
            {
                "PATH": path,
                "HOME": os.environ.get("HOME", "/root"),
                "TMPDIR": "/tmp",
                "PYVMM_LAB": "1",
                "PYVMM_CACHE": str(self.paths.root),
                "PYVMM_GUEST_KERNEL": str(self.paths.kernel),
                "PYVMM_GUEST_VMLINUX": str(self.paths.vmlinux),
                "PYVMM_GUEST_INITRAMFS": str(self.paths.guest_initramfs),
                # The lab root is an overlay on a tmpfs: writing this path copies it up inside the lab,
                # so every run starts from the pristine image and the outside copy is never changed.
                "PYVMM_GUEST_DISK": str(self.paths.guest_disk),
                # The Debian systemd root disk: a fresh copy in every lab run the same way.
                "PYVMM_GUEST_DISTRO_DISK": str(self.paths.distro_disk),
                "PYVMM_LAB_SD_SHA256": self.manifest.sd_sha256,
                "PYVMM_LAB_NVME_SHA256": self.manifest.nvme_sha256,
                "PYVMM_LAB_CWD": os.getcwd(),
            }
        )
        for key, value in os.environ.items():
            if key.startswith("PYVMM_") and key not in env:
                env[key] = value
        return env

    def _prepare(self, run_dir: Path, command: list[str] | None, attempt: int = 1) -> None:
        env = self.environment()
        env["PYVMM_LAB_ATTEMPT"] = str(attempt)  # 2 when the command runs again after its lab stalled
        lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
        (run_dir / "env.sh").write_text("\n".join(lines) + "\n")
        setup = resources.files("pyvmm.lab").joinpath("data", "lab-setup.sh").read_bytes()
        (run_dir / "setup.sh").write_bytes(setup)
        if command is not None:
            script = (
                f". {shlex.quote(str(run_dir / 'env.sh'))}\n"
                'cd "$PYVMM_LAB_CWD" 2>/dev/null || cd /\n'
                f"exec {shlex.join(command)}\n"
            )
            (run_dir / "run.sh").write_text(script)

    def qemu_argv(self, run_dir: Path, options: LabOptions, interactive: bool) -> list[str]:
        append = [
            # no_timer_check: under a loaded host, TCG can be too slow for the kernel's IO-APIC timer check,
            # which then panics the lab at boot.
            "console=ttyS0", "intel_iommu=on", "panic=-1", "quiet", "loglevel=3", "no_timer_check",
            # a stalled lab is asked for its backtraces over the serial line (see _show_backtraces)
            "sysrq_always_enabled",
            # fixed kernel addresses: a stalled lab's instruction pointers (see _show_backtraces) can be
            # looked up in the /proc/kallsyms of any lab
            "nokaslr",
            f"pyvmm_lab.run={run_dir}", f"pyvmm_lab.kernel_root={self.kernel_root}",
        ]
        if not options.npt:
            append.append("kvm_amd.npt=0")  # modprobe takes a module's parameters from the command line
        if interactive:
            append.append("pyvmm_lab.interactive=1")
        devices = qemu_device_args(options.devices, str(self.paths.sd_image), str(self.paths.nvme_image))
        argv = [
            qemu_binary(), "-accel", "tcg,thread=multi" if options.cpus > 1 else "tcg",
            "-M", "q35,kernel-irqchip=split", "-cpu", LAB_CPU if options.cpus == 1 else LAB_CPU_SMP,
            "-m", str(options.memory_mib), "-smp", str(options.cpus),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-device", "intel-iommu,intremap=on,caching-mode=on",
            # The uncompressed vmlinux through its PVH entry: the emulated CPU skips the bzImage's
            # real-mode setup and decompression, 3-4 s of every lab boot under TCG.
            "-kernel", str(self.paths.vmlinux), "-initrd", str(self.paths.lab_initramfs),
            "-append", " ".join(append),
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,addr={NINEP_SLOT:#04x}.0",
        ]
        if interactive:
            argv += ["-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0"]
        else:
            # mon: lets the supervisor send a serial break (Ctrl-A b), the lead-in of a magic SysRq key
            argv += ["-serial", "mon:stdio"]
            # Why a lab that ends early ended: QMP's SHUTDOWN event says whether the emulated host powered
            # itself off or was reset (-no-reboot turns a reset into an exit with status 0, like a power
            # off), and QEMU's log records triple faults and what the emulated hardware refused.
            argv += ["-qmp", f"unix:{run_dir / QMP_SOCKET},server=on,wait=off",
                     "-d", "cpu_reset,guest_errors", "-D", str(run_dir / QEMU_LOG)]
        # ttyS1 (after the console's port): the pulse (pyvmm/lab/pulse.py)
        argv += ["-chardev", f"socket,id=pulse,path={run_dir / PULSE_SOCKET},server=on,wait=off",
                 "-serial", "chardev:pulse"]
        return argv + devices.args

    def run(self, command: list[str], options: LabOptions) -> int:
        """Run `command` in a fresh lab; its output streams to stdout; returns its exit status."""
        compile_pyvmm()
        self.paths.runs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="run-", dir=self.paths.runs) as tmp:
            run_dir = Path(tmp)
            self._prepare(run_dir, command)
            argv = self.qemu_argv(run_dir, options, interactive=False)
            status, ready = _supervise(argv, options, run_dir)
            if status == EXIT_LAB_FAILED and not ready:
                # The lab never reached the command (a boot-time flake of the emulated host): one more try.
                print("pyvmm-lab: booting the lab again", file=sys.stderr)
                status, ready = _supervise(argv, options, run_dir)
            attempt = 1
            while status in (EXIT_LAB_STALLED, EXIT_LAB_DIED) and attempt <= options.restarts:
                # The emulated host stalled under the command (a process of the lab's own stopped running),
                # or died under it (QEMU's emulation of nested virtualization has reset the lab, and
                # overflowed its kernel's stack in the exception entry during a guest's KVM_RUN); the lab
                # keeps nothing between runs, so a new one starts over.
                attempt += 1
                print(f"pyvmm-lab: running the command again in a new lab (attempt {attempt})",
                      file=sys.stderr, flush=True)
                print(RESTART_MARKER, flush=True)
                self._prepare(run_dir, command, attempt)
                status, ready = _supervise(argv, options, run_dir)
            return {EXIT_LAB_STALLED: EXIT_TIMEOUT, EXIT_LAB_DIED: EXIT_LAB_FAILED}.get(status, status)

    def shell(self, options: LabOptions) -> int:
        compile_pyvmm()
        self.paths.runs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="shell-", dir=self.paths.runs) as tmp:
            run_dir = Path(tmp)
            self._prepare(run_dir, None)
            argv = self.qemu_argv(run_dir, options, interactive=True)
            print("pyvmm-lab: booting the lab; leave the shell with `exit` or Ctrl-D", file=sys.stderr)
            (run_dir / PULSE_SOCKET).unlink(missing_ok=True)
            pulse = Pulse(run_dir / PULSE_SOCKET)
            pulse.start()
            try:
                proc = subprocess.run(argv)
            finally:
                pulse.stop()
            return 0 if proc.returncode == 0 else EXIT_LAB_FAILED


# Magic SysRq keys sent to a stalled lab: console loglevel 8 (so that what follows is printed), the
# backtraces of all active CPUs, then every task's state and stack.
_SYSRQ_KEYS = b"8lt"
# What the lab kernel prints on its console when it finds a CPU or a task stuck: the lab is then asked for
# its backtraces at once (the lockup report's own are below the console's loglevel).
_LOCKUP_SIGNS = (
    "BUG: soft lockup", "self-detected stall", "detected stalls on CPUs", "blocked for more than",
)
_KERNEL_LINE = re.compile(r"\[\s*\d+\.\d+\] ")
_SYSRQ_SETTLE = 20.0  # seconds the lab gets to print them (slow under TCG)


_backtraces_lock = threading.Lock()


def _show_backtraces(proc: subprocess.Popen[bytes]) -> None:
    """Ask the lab kernel for its backtraces: a serial break (the QEMU mux's Ctrl-A b) then a key is a magic
    SysRq. The output arrives on the console like any other; a lab too wedged to take interrupts prints
    nothing, which says as much."""
    with _backtraces_lock:
        _ask_for_backtraces(proc)


def _ask_for_backtraces(proc: subprocess.Popen[bytes]) -> None:
    print("pyvmm-lab: asking the lab for its backtraces (magic SysRq over the serial line)", file=sys.stderr,
          flush=True)
    assert proc.stdin is not None
    try:
        for key in _SYSRQ_KEYS:
            proc.stdin.write(b"\x01b")
            proc.stdin.flush()
            time.sleep(0.5)
            proc.stdin.write(bytes([key]))
            proc.stdin.flush()
            time.sleep(2.0)
        time.sleep(_SYSRQ_SETTLE)
        # A lab that takes no interrupts prints nothing for those; QEMU's monitor (Ctrl-A c switches the
        # console to it and back) still shows where each CPU is, twice: moving or stuck.
        proc.stdin.write(b"\x01c")
        for _ in range(2):
            proc.stdin.write(b"info registers -a\n")
            proc.stdin.flush()
            time.sleep(2.0)
        proc.stdin.write(b"\x01c")
        proc.stdin.flush()
        time.sleep(2.0)
    except OSError:
        return  # QEMU is gone already


def compile_pyvmm() -> None:
    """Byte-compile the pyvmm package the lab imports, as installing a package does. The lab sees this
    machine's files read-only, so without .pyc files (a source checkout run with PYTHONDONTWRITEBYTECODE,
    say) every pyvmm start in the emulated host compiles all of its modules again: seconds under TCG.
    Up-to-date files are skipped; a package directory we cannot write to is left as it is."""
    package = Path(__file__).resolve().parent.parent
    compileall.compile_dir(package, quiet=2)


class ShutdownWatch:
    """Listens on the lab's QMP socket for the SHUTDOWN event and keeps its reason."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reason: str | None = None
        self._thread = threading.Thread(target=self._listen, name="lab-qmp", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for _ in range(100):  # QEMU makes the socket as it starts
                try:
                    sock.connect(str(self.path))
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                return
            stream = sock.makefile("rwb")
            stream.readline()  # the greeting
            stream.write(b'{"execute": "qmp_capabilities"}\n')
            stream.flush()
            for line in stream:
                message = json.loads(line)
                if message.get("event") == "SHUTDOWN":
                    self.reason = str(message.get("data", {}).get("reason"))
        except (OSError, ValueError):
            return  # QEMU gone or a line we cannot read: no reason known
        finally:
            sock.close()


def _log_after(path: Path, offset: int, lines: int = 40) -> list[str]:
    """The last `lines` lines QEMU logged after `offset` (the lab's start of the command)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _supervise(argv: list[str], options: LabOptions, run_dir: Path) -> tuple[int, bool]:
    """Stream the command's output (after the READY marker); return its exit status and whether the lab
    got as far as starting the command."""
    start = time.monotonic()
    (run_dir / QMP_SOCKET).unlink(missing_ok=True)
    (run_dir / PULSE_SOCKET).unlink(missing_ok=True)
    qemu_log = run_dir / QEMU_LOG
    qemu_log.unlink(missing_ok=True)
    log_at_ready = [0]  # QEMU's log up to the READY marker is the lab's own boot
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shutdown = ShutdownWatch(run_dir / QMP_SOCKET)
    shutdown.start()
    pulse = Pulse(run_dir / PULSE_SOCKET)
    pulse.start()
    timed_out = threading.Event()
    stalled = threading.Event()
    lab_stalled = threading.Event()
    ready_at = [start]
    done = threading.Event()
    last_output = [start]  # when the command last printed (the watchdog reads it)
    ready = threading.Event()  # the lab reached the command (set by the reader, read by the watchdog)

    def watchdog() -> None:
        while not done.wait(1.0):
            now = time.monotonic()
            if now - start > options.timeout:
                timed_out.set()
            elif ready.is_set() and pulse.silent_for(ready_at[0], now) > options.pulse_timeout:
                lab_stalled.set()
            elif (options.stall_timeout is not None and ready.is_set()
                  and now - last_output[0] > options.stall_timeout):
                stalled.set()
            else:
                continue
            if ready.is_set():
                _show_backtraces(proc)
            proc.kill()
            return

    threading.Thread(target=watchdog, name="lab-watchdog", daemon=True).start()
    boot_log: list[str] = []
    status: int | None = None
    failure: str | None = None
    asked = False  # for backtraces, after a lockup report
    out = sys.stdout
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            if not ready.is_set():
                boot_log.append(line)
                if options.verbose:
                    print(line, file=sys.stderr, flush=True)
                if line.startswith(READY_MARKER):
                    last_output[0] = ready_at[0] = time.monotonic()
                    log_at_ready[0] = _log_size(qemu_log)
                    ready.set()
                    if options.verbose:
                        print(f"pyvmm-lab: lab ready after {time.monotonic() - start:.1f} s", file=sys.stderr)
                elif line.startswith(FAIL_MARKER):
                    failure = line.removeprefix(FAIL_MARKER).strip()
                continue
            if status is not None:
                continue  # the lab's own shutdown messages
            if line.startswith(EXIT_MARKER):
                try:
                    status = int(line.removeprefix(EXIT_MARKER).strip())
                except ValueError:
                    failure = f"unreadable exit marker {line!r}"
                continue
            if line.startswith("(qemu)"):
                continue  # the monitor echoing what _show_backtraces typed
            if _KERNEL_LINE.match(line):
                if not asked and any(sign in line for sign in _LOCKUP_SIGNS):
                    asked = True
                    threading.Thread(target=_show_backtraces, args=(proc,), daemon=True).start()
            else:  # the lab kernel's console messages are not the command's output
                last_output[0] = time.monotonic()
            out.write(line + "\n")
            out.flush()
    finally:
        done.set()
        pulse.stop()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        print(f"pyvmm-lab: the lab timed out after {options.timeout:.0f} s", file=sys.stderr)
        return EXIT_TIMEOUT, ready.is_set()
    if lab_stalled.is_set():
        print(f"pyvmm-lab: the lab stalled: it answered no pulse for {options.pulse_timeout:.0f} s (the "
              "emulated host stopped running its own processes; its backtraces are above)", file=sys.stderr)
        return EXIT_LAB_STALLED, ready.is_set()
    if stalled.is_set():
        print(f"pyvmm-lab: the command printed nothing for {options.stall_timeout:.0f} s: gave up "
              "(the lab's backtraces are above)", file=sys.stderr)
        return EXIT_TIMEOUT, ready.is_set()
    if status is not None:
        return status, ready.is_set()
    tail = "\n".join(boot_log[-25:])
    shutdown.wait(5.0)
    if failure is None:
        failure = "kernel panic" if "Kernel panic" in tail else f"QEMU exited with {proc.returncode}"
        if shutdown.reason is not None:
            why = _SHUTDOWN_REASONS.get(shutdown.reason, f"QEMU's shutdown reason: {shutdown.reason}")
            failure += f"; {why}"
        if not ready.is_set():
            failure = f"the lab failed to boot ({failure})"
        else:
            failure = f"the lab stopped before the command finished ({failure})"
    if not options.verbose:
        print(tail, file=sys.stderr)
    logged = _log_after(qemu_log, log_at_ready[0] if ready.is_set() else 0)
    if logged:
        print("pyvmm-lab: QEMU's log (CPU resets, triple faults, guest errors) since the command started:",
              file=sys.stderr)
        print("\n".join(logged), file=sys.stderr)
    print(f"pyvmm-lab: {failure}", file=sys.stderr)
    died = ready.is_set() and (shutdown.reason in ("guest-reset", "guest-panic") or "Kernel panic" in tail)
    return (EXIT_LAB_DIED if died else EXIT_LAB_FAILED), ready.is_set()
