"""ioctl(2) through libc with errno, usable from any thread.

Python's fcntl.ioctl holds the GIL and copies buffers; calling libc through ctypes releases the GIL for the
duration of the call (so a KVM_RUN in one thread does not stall the others) and passes pointers as is.
"""

from __future__ import annotations

import ctypes
import errno
import os
from enum import IntEnum

from pyvmm.errors import PyvmmError

_libc = ctypes.CDLL(None, use_errno=True)
libc_ioctl = _libc.ioctl
libc_ioctl.restype = ctypes.c_int
libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)

Arg = int | ctypes.Structure | ctypes.Union | ctypes.Array | ctypes._SimpleCData | None


class IoctlError(OSError, PyvmmError):
    """An ioctl that failed; `errno` is set and the message names the request (exit status 1)."""

    def __str__(self) -> str:
        return str(self.strerror)  # "KVM_CREATE_VCPU failed: Invalid argument", without "[Errno 22]"


def request_name(request: int) -> str:
    return request.name if isinstance(request, IntEnum) else f"ioctl {request:#x}"


def ioctl(fd: int, request: int, arg: Arg = None) -> int:
    """Issue `request` on `fd`; a ctypes object is passed by address, an int by value.

    Returns the (non-negative) result; raises IoctlError on failure. A call a signal interrupted (EINTR)
    is made again, as Python does for its own system calls (PEP 475): a profiler's or a timer's signals must
    not fail KVM_CREATE_VM. KVM_RUN does not come through here: its EINTR means "kicked".
    """
    if arg is None:
        value: int = 0
    elif isinstance(arg, int):
        value = arg
    else:
        value = ctypes.addressof(arg)
    while True:
        ret = libc_ioctl(fd, request, value)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise IoctlError(err, f"{request_name(request)} failed: {os.strerror(err)}")
