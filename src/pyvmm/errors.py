"""The one error hierarchy of pyvmm: every error a user can cause carries a one-line message and the exit
status it ends the program with. `pyvmm.cli.main` catches `PyvmmError` once and prints `pyvmm: <message>`.

Modules define their own error types under these (ConfigError, KvmError, IoctlError, VfioError, PciError,
...), so that the type says what failed and the base says how the program ends.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    FAILURE = 1  # the VM could not be built, or failed while running; the host refused something
    USAGE = 2  # the command line asks for something wrong, or something this host or pyvmm cannot do


class PyvmmError(Exception):
    """A failure with a one-line message fit for a user; `exit_status` is how the program ends on it."""

    exit_status: ExitStatus = ExitStatus.FAILURE


class UsageError(PyvmmError):
    """The command line asks for something this host or pyvmm cannot do (exit status 2)."""

    exit_status = ExitStatus.USAGE


class VmError(PyvmmError):
    """The VM could not be built or failed while running (exit status 1)."""


def in_context(prefix: str, exc: PyvmmError) -> PyvmmError:
    """`exc` with `prefix` (the option or device it concerns) before its message; same exit status."""
    error = PyvmmError(f"{prefix}: {exc}")
    error.exit_status = exc.exit_status
    return error
