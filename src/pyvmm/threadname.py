"""Thread names as the kernel shows them (/proc/PID/task/TID/comm): Python's thread name is not one, and tools
find pyvmm's threads by it (Kata Containers reads `vcpu<N>`)."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

PR_SET_NAME = 15
_COMM_MAX = 15  # TASK_COMM_LEN - 1


def set_thread_comm(name: str) -> None:
    """Name the calling thread; best effort: a failure is only logged."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:_COMM_MAX]), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_NAME, %s): errno %d", name, ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.debug("prctl(PR_SET_NAME, %s): %s", name, exc)
