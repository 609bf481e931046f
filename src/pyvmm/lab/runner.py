"""`pyvmm-lab run` and `pyvmm-lab shell`: boot the lab (QEMU/TCG, q35, Intel IOMMU) and run a command."""

from __future__ import annotations

import compileall
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pyvmm.lab.assets import Manifest, load_manifest
from pyvmm.lab.devices import NINEP_SLOT, parse_device_spec, qemu_device_args
from pyvmm.lab.paths import AssetPaths

READY_MARKER = "PYVMM-LAB-READY"
EXIT_MARKER = "PYVMM-LAB-EXIT="
FAIL_MARKER = "PYVMM-LAB-FAIL:"

EXIT_TIMEOUT = 124
EXIT_LAB_FAILED = 125

_PASSED_ENV = ("LANG", "LC_ALL", "TERM", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")


class LabError(RuntimeError):
    """The lab itself could not run (not the command inside it)."""


@dataclass
class LabOptions:
    devices: list[str] = field(default_factory=lambda: parse_device_spec(None))
    memory_mib: int = 2048
    cpus: int = 1
    timeout: float = 900.0
    verbose: bool = False


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
                "PYVMM_GUEST_INITRAMFS": str(self.paths.guest_initramfs),
                # The lab root is an overlay on a tmpfs: writing this path copies it up inside the lab,
                # so every run starts from the pristine image and the outside copy is never changed.
                "PYVMM_GUEST_DISK": str(self.paths.guest_disk),
                "PYVMM_LAB_SD_SHA256": self.manifest.sd_sha256,
                "PYVMM_LAB_NVME_SHA256": self.manifest.nvme_sha256,
                "PYVMM_LAB_CWD": os.getcwd(),
            }
        )
        for key, value in os.environ.items():
            if key.startswith("PYVMM_") and key not in env:
                env[key] = value
        return env

    def _prepare(self, run_dir: Path, command: list[str] | None) -> None:
        env = self.environment()
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
            f"pyvmm_lab.run={run_dir}", f"pyvmm_lab.kernel_root={self.kernel_root}",
        ]
        if interactive:
            append.append("pyvmm_lab.interactive=1")
        devices = qemu_device_args(options.devices, str(self.paths.sd_image), str(self.paths.nvme_image))
        argv = [
            qemu_binary(), "-accel", "tcg,thread=multi" if options.cpus > 1 else "tcg",
            "-M", "q35,kernel-irqchip=split", "-cpu", "max",
            "-m", str(options.memory_mib), "-smp", str(options.cpus),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-device", "intel-iommu,intremap=on,caching-mode=on",
            "-kernel", str(self.paths.kernel), "-initrd", str(self.paths.lab_initramfs),
            "-append", " ".join(append),
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,addr={NINEP_SLOT:#04x}.0",
        ]
        if interactive:
            argv += ["-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0"]
        else:
            argv += ["-serial", "stdio"]
        return argv + devices.args

    def run(self, command: list[str], options: LabOptions) -> int:
        """Run `command` in a fresh lab; its output streams to stdout; returns its exit status."""
        compile_pyvmm()
        self.paths.runs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="run-", dir=self.paths.runs) as tmp:
            run_dir = Path(tmp)
            self._prepare(run_dir, command)
            argv = self.qemu_argv(run_dir, options, interactive=False)
            status, ready = _supervise(argv, options)
            if status == EXIT_LAB_FAILED and not ready:
                # The lab never reached the command (a boot-time flake of the emulated host): one more try.
                print("pyvmm-lab: booting the lab again", file=sys.stderr)
                status, ready = _supervise(argv, options)
            return status

    def shell(self, options: LabOptions) -> int:
        compile_pyvmm()
        self.paths.runs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="shell-", dir=self.paths.runs) as tmp:
            run_dir = Path(tmp)
            self._prepare(run_dir, None)
            argv = self.qemu_argv(run_dir, options, interactive=True)
            print("pyvmm-lab: booting the lab; leave the shell with `exit` or Ctrl-D", file=sys.stderr)
            proc = subprocess.run(argv)
            return 0 if proc.returncode == 0 else EXIT_LAB_FAILED


def compile_pyvmm() -> None:
    """Byte-compile the pyvmm package the lab imports, as installing a package does. The lab sees this
    machine's files read-only, so without .pyc files (a source checkout run with PYTHONDONTWRITEBYTECODE,
    say) every pyvmm start in the emulated host compiles all of its modules again: seconds under TCG.
    Up-to-date files are skipped; a package directory we cannot write to is left as it is."""
    package = Path(__file__).resolve().parent.parent
    compileall.compile_dir(package, quiet=2)


def _supervise(argv: list[str], options: LabOptions) -> tuple[int, bool]:
    """Stream the command's output (after the READY marker); return its exit status and whether the lab
    got as far as starting the command."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(options.timeout, on_timeout)
    timer.daemon = True
    timer.start()
    boot_log: list[str] = []
    status: int | None = None
    failure: str | None = None
    ready = False
    out = sys.stdout
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            if not ready:
                boot_log.append(line)
                if options.verbose:
                    print(line, file=sys.stderr, flush=True)
                if line.startswith(READY_MARKER):
                    ready = True
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
            out.write(line + "\n")
            out.flush()
    finally:
        timer.cancel()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        print(f"pyvmm-lab: the lab timed out after {options.timeout:.0f} s", file=sys.stderr)
        return EXIT_TIMEOUT, ready
    if status is not None:
        return status, ready
    tail = "\n".join(boot_log[-25:])
    if failure is None:
        failure = "kernel panic" if "Kernel panic" in tail else f"QEMU exited with {proc.returncode}"
        if not ready:
            failure = f"the lab failed to boot ({failure})"
        else:
            failure = f"the lab stopped before the command finished ({failure})"
    if not options.verbose:
        print(tail, file=sys.stderr)
    print(f"pyvmm-lab: {failure}", file=sys.stderr)
    return EXIT_LAB_FAILED, ready
