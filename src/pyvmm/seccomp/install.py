"""Putting the filters in place: PR_SET_NO_NEW_PRIVS, then seccomp(2) with the programs of bpf.py built
from allowlists.py. `install(mode)` is called once, on the main thread: by `pyvmm` when the VM is built and
before its vCPUs start, by `pyvmm --api-socket` before it serves the first call (docs/seccomp.md#when)."""

from __future__ import annotations

import ctypes
import logging
import os

from pyvmm import sandbox
from pyvmm.errors import VmError
from pyvmm.sandbox import BASE_KINDS, SeccompMode, ThreadKind
from pyvmm.seccomp.allowlists import PR_SET_NO_NEW_PRIVS, SECCOMP_SET_MODE_FILTER, rules
from pyvmm.seccomp.bpf import SeccompRet, compile_filter, sock_filter, sock_fprog, to_sock_filters
from pyvmm.seccomp.syscalls import SYSCALLS

log = logging.getLogger("pyvmm")

SECCOMP_FILTER_FLAG_TSYNC = 1  # <linux/seccomp.h>: every thread of the process gets the filter

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
# Variadic: every argument passed as a full unsigned long (PR_SET_NO_NEW_PRIVS wants arguments 3-5 zero).
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class SeccompError(VmError):
    """The kernel refused a filter (no seccomp in this kernel, or a thread that could not take it)."""


def default_action(mode: SeccompMode) -> int:
    if mode is SeccompMode.LOG:
        return int(SeccompRet.SECCOMP_RET_LOG)
    return int(SeccompRet.SECCOMP_RET_KILL_PROCESS)


class _Program:
    """One compiled filter, kept alive with its sock_fprog for the life of the process."""

    def __init__(self, kind: ThreadKind, mode: SeccompMode) -> None:
        self.kind = kind
        self.insns = compile_filter(rules(kind), default_action(mode))
        self._array = to_sock_filters(self.insns)
        self.fprog = sock_fprog(len(self.insns), ctypes.cast(self._array, ctypes.POINTER(sock_filter)))

    def load(self, flags: int = 0) -> None:
        ret = _libc.syscall(
            ctypes.c_long(SYSCALLS["seccomp"]), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
            ctypes.c_ulong(flags), ctypes.byref(self.fprog),
        )
        if ret < 0:
            err = ctypes.get_errno()
            raise SeccompError(f"--seccomp: the kernel refused the {self.kind.value} filter: "
                               f"{os.strerror(err)} (run with --seccomp false on a kernel without seccomp)")
        if ret > 0:  # TSYNC: the id of a thread that could not be synchronised
            raise SeccompError(f"--seccomp: thread {ret} could not take the {self.kind.value} filter")


class _Policy:
    """What sandbox.enter does once the filters are on: load the thread kind's own filter."""

    def __init__(self, mode: SeccompMode) -> None:
        # Compiled before any filter is on: the threads only load them.
        self.programs: dict[ThreadKind, _Program] = {
            kind: _Program(kind, mode) for kind in ThreadKind if kind not in BASE_KINDS
        }

    def __call__(self, kind: ThreadKind) -> None:
        program = self.programs.get(kind)
        if program is None:
            return
        try:
            program.load()
        except SeccompError as exc:  # the thread still has the VMM filter
            log.error("%s; the thread goes on under the VMM filter only", exc)


def install(mode: SeccompMode, base: ThreadKind = ThreadKind.VMM) -> None:
    """No new privileges, the `base` filter (VMM, or API_VMM for a VMM that serves the API) on every
    thread, and each thread kind's filter as it starts."""
    if base not in BASE_KINDS:
        raise ValueError(f"{base} is not a base filter")
    if mode is SeccompMode.FALSE:
        return
    policy = _Policy(mode)
    vmm = _Program(base, mode)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SeccompError(f"--seccomp: PR_SET_NO_NEW_PRIVS failed: {os.strerror(ctypes.get_errno())}")
    vmm.load(SECCOMP_FILTER_FLAG_TSYNC)
    sandbox.set_policy(policy)
    log.info("seccomp: filters on (%s), %s filter of %d instructions on every thread", mode.value,
             base.value, len(vmm.insns))
