"""Changes to the host, as steps: each is printable as the equivalent shell command, and a dry run
records the steps instead of making them."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from pyvmm import sandbox

from . import sysfs
from .errors import HostError


@dataclass(frozen=True)
class Step:
    """A sysfs write (`path` and `value`) or a command (`argv`)."""

    subject: str  # the device or module it concerns, for messages
    path: str = ""
    value: str = ""
    argv: tuple[str, ...] = ()

    def shell(self) -> str:
        if self.argv:
            return shlex.join(self.argv)
        text = self.value.rstrip("\n")
        return f"echo {shlex.quote(text)} > {self.path}" if text else f"echo > {self.path}"


StepHook = Callable[[Step], None]


class Changer:
    """Makes steps happen (or, in a dry run, only records them) and reports each one to `on_step`."""

    def __init__(self, dry_run: bool = False, on_step: StepHook | None = None) -> None:
        self.dry_run = dry_run
        self.on_step = on_step
        self.steps: list[Step] = []

    def note(self, step: Step) -> None:
        """Record a step made by its caller (e.g. a chown): shown with the others, made only when not a dry
        run (the caller checks)."""
        self._note(step)

    def _note(self, step: Step) -> None:
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)

    def write(self, subject: str, path: str, value: str, tolerate: Collection[int] = ()) -> int | None:
        """Write `value` to a sysfs attribute. Returns None on success, or the errno of a failure listed in
        `tolerate`; any other failure is a HostError naming the subject, the file and the reason."""
        step = Step(subject, path=str(path), value=value)
        self._note(step)
        if self.dry_run:
            return None
        try:
            sysfs.write_attr(step.path, value)  # looked up at call time: one place where sysfs changes
        except OSError as e:
            if e.errno in tolerate:
                return e.errno
            raise sysfs.sysfs_error(subject, step.path, value, e) from None
        return None

    def run(self, subject: str, argv: Sequence[str]) -> None:
        step = Step(subject, argv=tuple(argv))
        self._note(step)
        if self.dry_run:
            return
        if sandbox.filtered():
            # A managed=on device plugged under --seccomp: no list allows a fork, which would kill pyvmm.
            raise HostError(
                f"{subject}: `{step.shell()}` cannot run under --seccomp (no program may run): run it "
                "beforehand, or bind the device with `pyvmm-host bind` before plugging it"
            )
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
        except OSError as e:
            raise HostError(f"{subject}: cannot run {argv[0]}: {e.strerror}") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            reason = detail[-1] if detail else f"exit status {proc.returncode}"
            raise HostError(f"{subject}: `{step.shell()}` failed: {reason}")
