"""Which kind of thread this is, for the seccomp filters of `--seccomp` (docs/seccomp.md).

Each long-lived thread calls `enter(kind)` first thing. When a policy is set (pyvmm.seccomp sets one once
the VM is built, before the guest runs), `enter` installs that kind's filter on the calling thread;
otherwise (`--seccomp false`, unit tests, the lab's tools) it does nothing. This module imports nothing of
pyvmm, so the vCPU loop, the virtio worker and the console can call it without depending on the filters.

A new kind of thread (a new device's worker, say): add a member below, its list to
`pyvmm.seccomp.allowlists.ALLOWED` (every entry also in the base lists it stacks on, which the unit
tests check), and call `sandbox.enter(ThreadKind.X)` first thing in the thread
(docs/seccomp.md#adding-a-thread-kind).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import Enum


class ThreadKind(Enum):
    # The two base kinds: the main thread's list, installed on every thread at once (TSYNC).
    VMM = "vmm"  # `pyvmm` with a VM on its command line: the VM is built before the filter goes on
    API_VMM = "api-vmm"  # `pyvmm --api-socket`: the main thread builds VMs and hot-plugs under its filter
    # The kinds each thread adds on top of its base when it starts.
    VCPU = "vcpu"
    VIRTIO_WORKER = "virtio-worker"
    TERMINAL_INPUT = "terminal-input"
    HTTP_SERVER = "http-server"  # the API socket's thread (pyvmm.api.server)
    VSOCK_MUXER = "vsock-muxer"  # --vsock's host side (devices/virtio/vsock_muxer.py)
    VHOST_USER = "vhost-user"  # watches vhost-user backends' sockets for a hang-up (vhost/hangup.py)


BASE_KINDS = frozenset({ThreadKind.VMM, ThreadKind.API_VMM})


class SeccompMode(Enum):
    """`--seccomp`: what a syscall outside a thread's list does."""

    TRUE = "true"  # the whole process is killed (SIGSYS), as cloud-hypervisor's default
    FALSE = "false"  # no filter
    LOG = "log"  # the call goes through and the kernel logs it (audit type 1326, "seccomp" in dmesg)


_lock = threading.Lock()
_policy: Callable[[ThreadKind], None] | None = None


def set_policy(policy: Callable[[ThreadKind], None] | None) -> None:
    """`policy(kind)` is called by every thread that enters from now on (None: nothing is)."""
    global _policy
    with _lock:
        _policy = policy


def enter(kind: ThreadKind) -> None:
    """Called by a thread of `kind` before it does anything else."""
    with _lock:
        policy = _policy
    if policy is not None:
        policy(kind)


def filtered() -> bool:
    """Whether the filters are on in this process (code that would need a call no list allows asks)."""
    with _lock:
        return _policy is not None
