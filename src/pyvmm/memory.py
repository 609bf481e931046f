"""Guest RAM: anonymous host mappings placed at guest-physical addresses."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import struct
from dataclasses import dataclass, field

from pyvmm import layout

# Python's mmap module only exports MAP_NORESERVE from 3.12 on; the value is Linux's (x86-64 and arm64).
# Without it the kernel's overcommit heuristic refuses guests larger than the host's free memory, although
# a guest only ever touches part of its RAM.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class GuestMemoryError(Exception):
    """A guest-physical range that is not (entirely) backed by one RAM region."""


@dataclass
class MemoryRegion:
    gpa: int
    size: int
    mapping: mmap.mmap = field(repr=False)
    host_address: int = 0

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestMemory:
    """Guest RAM as a list of regions; every access is bounds-checked against one region."""

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        self.regions: list[MemoryRegion] = []
        for gpa, size in regions:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
            try:
                mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                self.close()
                raise GuestMemoryError(f"cannot map {size >> 20} MiB of guest RAM: {exc.strerror}") from exc
            host = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            self.regions.append(MemoryRegion(gpa, size, mapping, host))

    def close(self) -> None:
        for region in self.regions:
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
        region, offset = self._locate(gpa, length)
        return memoryview(region.mapping)[offset : offset + length]

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
