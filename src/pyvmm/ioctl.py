"""ioctl(2): request numbers as <asm-generic/ioctl.h> encodes them, and the call through libc with errno.

`IO`, `IOR`, `IOW`, `IOWR` and `IOC` are the kernel's `_IO`, `_IOR`, `_IOW`, `_IOWR` and `_IOC` (without the
underscore, which in Python would mean "private"): `IOR(KVMIO, 0x81, kvm_regs)` reads as the header's
`_IOR(KVMIO, 0x81, struct kvm_regs)`. The argument may be a ctypes type or a size in bytes.

Python's fcntl.ioctl holds the GIL and copies buffers; calling libc through ctypes releases the GIL for the
duration of the call (so a KVM_RUN in one thread does not stall the others) and passes pointers as is.

The KVM and VFIO bindings both build on this module; it imports nothing of pyvmm but its errors.
"""

from __future__ import annotations

import ctypes
import errno
import os
from enum import IntEnum
from typing import Any, TypeAlias

from pyvmm.errors import PyvmmError

# --- request numbers (include/uapi/asm-generic/ioctl.h) --------------------------------------------------

IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

def IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """The request number of `direction` (IOC_NONE, IOC_READ, IOC_WRITE or both), `type_`, `nr`, `size`."""
    if not 0 <= nr < 1 << IOC_NRBITS or not 0 <= type_ < 1 << IOC_TYPEBITS:
        raise ValueError(f"ioctl type {type_:#x} / nr {nr:#x} out of range")
    if not 0 <= size < 1 << IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {IOC_SIZEBITS} bits")
    return (
        (direction << IOC_DIRSHIFT)
        | (type_ << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
    )


def _size(arg: type[ctypes._CData] | int) -> int:
    return arg if isinstance(arg, int) else ctypes.sizeof(arg)


def IO(type_: int, nr: int) -> int:
    """A request without an argument struct (an int argument, or none)."""
    return IOC(IOC_NONE, type_, nr, 0)


def IOR(type_: int, nr: int, arg: type[ctypes._CData] | int) -> int:
    """A request the kernel answers by filling `arg`."""
    return IOC(IOC_READ, type_, nr, _size(arg))


def IOW(type_: int, nr: int, arg: type[ctypes._CData] | int) -> int:
    """A request that passes `arg` to the kernel."""
    return IOC(IOC_WRITE, type_, nr, _size(arg))


def IOWR(type_: int, nr: int, arg: type[ctypes._CData] | int) -> int:
    """A request that passes `arg` to the kernel and gets it back updated."""
    return IOC(IOC_READ | IOC_WRITE, type_, nr, _size(arg))


# --- the call ---------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
libc_ioctl = _libc.ioctl
libc_ioctl.restype = ctypes.c_int
libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)

# What ioctl() passes: an int by value, a ctypes object by address, nothing as 0.
Arg: TypeAlias = "int | ctypes.Structure | ctypes.Union | ctypes.Array[Any] | ctypes._SimpleCData[Any] | None"


class IoctlError(OSError, PyvmmError):
    """An ioctl that failed; `errno` is set and the message names the request (exit status 1)."""

    def __str__(self) -> str:
        return str(self.strerror)  # "KVM_CREATE_VCPU failed: Invalid argument", without "[Errno 22]"


def request_name(request: int) -> str:
    """The request's name when it is an IntEnum member (KvmIoctl, VfioIoctl), else its number."""
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
        ret: int = libc_ioctl(fd, request, value)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise IoctlError(err, f"{request_name(request)} failed: {os.strerror(err)}")
