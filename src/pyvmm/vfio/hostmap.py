"""mmap of device-fd areas at aligned host addresses (docs/vfio.md#mapping-bar-areas).

A BAR area is mapped at a host address aligned to min(next power of two of its length, 1 GiB) so that the
kernel can back it with huge PMD/PUD mappings; Python's mmap module cannot place a mapping, so libc is
called directly: reserve an oversized PROT_NONE window, then map the device MAP_FIXED inside it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAX_ALIGN = 1 << 30
PAGE_SIZE = mmap.PAGESIZE


@dataclass
class HostMapping:
    address: int
    size: int

    def close(self) -> None:
        if self.size:
            _munmap(self.address, self.size)
            self.size = 0


def mapping_alignment(size: int) -> int:
    align = 1 << max(size - 1, 1).bit_length()
    return max(PAGE_SIZE, min(align, _MAX_ALIGN))


def _call_mmap(addr: int | None, size: int, prot: int, flags: int, fd: int, offset: int) -> int:
    result = _mmap(addr, size, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def map_aligned(fd: int, offset: int, size: int, prot: int) -> HostMapping:
    """MAP_SHARED `size` bytes of `fd` at `offset`, at a host address aligned as mapping_alignment says."""
    if size <= 0 or size % PAGE_SIZE or offset % PAGE_SIZE:
        raise ValueError(f"device mapping {offset:#x}+{size:#x} is not page aligned")
    align = mapping_alignment(size)
    reserve = size + align - PAGE_SIZE
    base = _call_mmap(None, reserve, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    start = (base + align - 1) & ~(align - 1)
    try:
        _call_mmap(start, size, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    except OSError:
        _munmap(base, reserve)
        raise
    # Give back the unused head and tail of the reservation.
    if start > base:
        _munmap(base, start - base)
    tail = base + reserve - (start + size)
    if tail > 0:
        _munmap(start + size, tail)
    return HostMapping(start, size)
