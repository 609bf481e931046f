"""Guest RAM: anonymous host mappings placed at guest-physical addresses."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import struct
from dataclasses import dataclass, field
from operator import add

from pyvmm import layout
from pyvmm.errors import PyvmmError

# Python's mmap module only exports MAP_NORESERVE from 3.12 on; the value is Linux's (x86-64 and arm64).
# Without it the kernel's overcommit heuristic refuses guests larger than the host's free memory, although
# a guest only ever touches part of its RAM.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

# Guest RAM is placed on 2 MiB boundaries and offered to transparent huge pages, as QEMU does: with 4 KiB
# pages every first touch of a guest page is a separate nested-paging fault, which under nested
# virtualization costs far more than the guest's own work (32,000 faults in a 512 MiB boot, against 67
# with huge pages).
HUGE_PAGE_SIZE = 2 << 20


class GuestMemoryError(PyvmmError):
    """A guest-physical range that is not (entirely) backed by one RAM region."""


@dataclass
class MemoryRegion:
    gpa: int
    size: int
    mapping: mmap.mmap = field(repr=False)
    host_address: int = 0
    offset: int = 0  # where the region starts in `mapping` (its first 2 MiB boundary)
    # One view of the whole region, sliced for every access: a fresh memoryview of the mmap per access was
    # the largest per-request cost of virtio-blk.
    whole: memoryview | None = field(default=None, repr=False)

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestMemory:
    """Guest RAM as a list of regions; every access is bounds-checked against one region."""

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        self.regions: list[MemoryRegion] = []
        for gpa, size in regions:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
            huge = size >= HUGE_PAGE_SIZE and gpa % HUGE_PAGE_SIZE == 0
            # Reserve a little more address space than needed so the region can start on a boundary; the
            # slack is never touched, so it costs no memory.
            length = size + HUGE_PAGE_SIZE if huge else size
            try:
                mapping = mmap.mmap(-1, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                self.close()
                raise GuestMemoryError(f"cannot map {size >> 20} MiB of guest RAM: {exc.strerror}") from exc
            base = _address_of(mapping)
            offset = -base % HUGE_PAGE_SIZE if huge else 0
            if huge and hasattr(mmap, "MADV_HUGEPAGE"):
                with contextlib.suppress(OSError):  # kernels without THP: plain pages
                    mapping.madvise(mmap.MADV_HUGEPAGE)
            whole = memoryview(mapping)[offset : offset + size]
            self.regions.append(MemoryRegion(gpa, size, mapping, base + offset, offset, whole))
        # (start, end, whole view) per region: the lookup every guest access makes
        self._spans = [(r.gpa, r.gpa + r.size, r.whole) for r in self.regions]

    def close(self) -> None:
        self._spans = []
        for region in self.regions:
            if region.whole is not None:
                with contextlib.suppress(BufferError):
                    region.whole.release()
                region.whole = None
            # Views still exported (a device holds one): the mapping goes away with them.
            with contextlib.suppress(BufferError):
                region.mapping.close()
        self.regions = []

    @classmethod
    def for_size(cls, ram_size: int) -> GuestMemory:
        return cls(layout.ram_regions(ram_size))

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        for region in self.regions:
            if region.contains(gpa, length):
                return region, gpa - region.gpa
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not in guest RAM")

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM (no copy); raises GuestMemoryError when out of range."""
        if length >= 0 and gpa >= 0:
            end = gpa + length
            for start, stop, whole in self._spans:
                if start <= gpa and end <= stop:
                    return whole[gpa - start : end - start]
        self._locate(gpa, length)  # raises with the reason
        raise AssertionError("unreachable")

    def views(self, gpas: list[int], lengths: list[int]) -> list[memoryview]:
        """`view` of many ranges at once, checked against one region as a whole when they all lie in one
        (the usual case for the buffers of one request)."""
        low = min(gpas, default=-1)
        if low >= 0 and min(lengths) >= 0:
            ends = list(map(add, gpas, lengths))
            high = max(ends)
            for start, stop, whole in self._spans:
                if start <= low and high <= stop:
                    if start:
                        return [whole[a - start : e - start] for a, e in zip(gpas, ends, strict=True)]
                    return [whole[a:e] for a, e in zip(gpas, ends, strict=True)]
        return list(map(self.view, gpas, lengths))

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def host_address(self, gpa: int, length: int = 1) -> int:
        region, offset = self._locate(gpa, length)
        return region.host_address + offset

    def read_u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.view(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self.view(gpa, 2), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self.view(gpa, 4), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.view(gpa, 8), 0, value)


def _address_of(mapping: mmap.mmap) -> int:
    """The host virtual address of an mmap object's first byte."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # the export would keep the mapping from being closed
