"""Guest RAM: host mappings placed at guest-physical addresses.

How RAM is backed follows cloud-hypervisor's `--memory` (docs/memory.md): private anonymous memory by
default; a memfd mapped shared with `shared=on`; a hugetlb memfd, also mapped shared, with `hugepages=on`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from operator import add
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm import layout
from pyvmm.errors import ExitStatus, PyvmmError

if TYPE_CHECKING:
    from pyvmm.config import MemoryConfig

log = logging.getLogger("pyvmm")


class MapFlag(IntFlag):
    """mmap(2) flags (Linux x86-64 and arm64); Python's mmap module lacks MAP_NORESERVE before 3.12."""

    SHARED = 0x01
    PRIVATE = 0x02
    ANONYMOUS = 0x20
    # Without it the kernel's overcommit heuristic refuses guests larger than the host's free memory,
    # although a guest only ever touches part of its RAM.
    NORESERVE = 0x4000


class MemfdFlag(IntFlag):
    """memfd_create(2) flags; a hugetlb page size is log2(size) in bits 26-31."""

    CLOEXEC = 0x0001
    HUGETLB = 0x0004
    HUGE_2MB = 21 << 26
    HUGE_1GB = 30 << 26

    @classmethod
    def huge(cls, page_size: int) -> MemfdFlag:
        return cls((page_size.bit_length() - 1) << 26)


class Madvice(IntEnum):
    """madvise(2) advice values (Linux); Python's mmap module does not export all of them."""

    MERGEABLE = 12
    HUGEPAGE = 14
    POPULATE_WRITE = 23  # Linux 5.14


# Guest RAM is placed on 2 MiB boundaries and offered to transparent huge pages, as QEMU does: with 4 KiB
# pages every first touch of a guest page is a separate nested-paging fault, which under nested
# virtualization costs far more than the guest's own work (32,000 faults in a 512 MiB boot, against 67
# with huge pages).
HUGE_PAGE_SIZE = 2 << 20
PAGE_SIZE = mmap.PAGESIZE

HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages")
# Sets the pool of the default huge page size only; other sizes have their own sysfs file.
NR_HUGEPAGES_PROC = Path("/proc/sys/vm/nr_hugepages")
MEMINFO = Path("/proc/meminfo")
MEMFD_NAME = "pyvmm-ram"


class GuestMemoryError(PyvmmError):
    """A guest-physical range that is not (entirely) backed by one RAM region, or RAM that cannot be
    mapped."""


class HugePagesError(GuestMemoryError):
    """`hugepages=on` asks for what this host cannot give: an unknown page size, a size that is not a
    multiple of it, a pool too small. The user fixes it (the command line or the host's pool)."""

    exit_status = ExitStatus.USAGE


@dataclass(frozen=True)
class Backing:
    """How guest RAM is mapped: what `--memory` asked for, with the huge page size resolved."""

    shared: bool = False  # a memfd mapped MAP_SHARED (always so with hugetlb)
    hugepage_size: int | None = None  # hugetlb pages of this size; None: normal pages
    prefault: bool = False
    thp: bool = True
    mergeable: bool = False

    @property
    def memfd(self) -> bool:
        return self.shared or self.hugepage_size is not None

    @property
    def page_size(self) -> int:
        return self.hugepage_size or PAGE_SIZE


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
    # The memfd behind a shared or hugetlb region and where the region starts in it (what a vhost-user
    # backend needs to map it); None for private anonymous memory. Owned by GuestMemory, closed in close().
    fd: int | None = None
    file_offset: int = 0

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


@dataclass(frozen=True)
class HugePagePool:
    """One huge page size's pool, as sysfs shows it."""

    page_size: int
    total: int  # nr_hugepages
    free: int
    reserved: int  # promised to mappings but not faulted in yet: counted in `free`, not available
    surplus: int
    overcommit: int  # nr_overcommit_hugepages: how many more the kernel may allocate on demand

    @property
    def available(self) -> int:
        return max(0, self.free - self.reserved) + max(0, self.overcommit - self.surplus)

    @classmethod
    def read(cls, page_size: int, sysfs: Path = HUGEPAGES_SYSFS) -> HugePagePool:
        directory = sysfs / f"hugepages-{page_size >> 10}kB"

        def number(name: str) -> int:
            try:
                return int((directory / name).read_text())
            except (OSError, ValueError):
                return 0

        return cls(page_size, number("nr_hugepages"), number("free_hugepages"), number("resv_hugepages"),
                   number("surplus_hugepages"), number("nr_overcommit_hugepages"))


def host_hugepage_sizes(sysfs: Path = HUGEPAGES_SYSFS) -> list[int]:
    """The huge page sizes this host's kernel offers, in bytes, smallest first."""
    try:
        names = [p.name for p in sysfs.iterdir()]
    except OSError:
        return []
    sizes = []
    for name in names:
        if name.startswith("hugepages-") and name.endswith("kB"):
            with contextlib.suppress(ValueError):
                sizes.append(int(name[len("hugepages-") : -2]) << 10)
    return sorted(sizes)


def default_hugepage_size(meminfo: Path = MEMINFO) -> int | None:
    """The host's default huge page size (what MFD_HUGETLB without a size gives), or None without
    hugetlb support."""
    with contextlib.suppress(OSError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) << 10
    return None


def nr_hugepages_path(page_size: int, default_size: int | None, sysfs: Path = HUGEPAGES_SYSFS) -> Path:
    """The file that sets the pool of `page_size` pages."""
    if page_size == default_size:
        return NR_HUGEPAGES_PROC
    return sysfs / f"hugepages-{page_size >> 10}kB" / "nr_hugepages"


def _size_text(size: int) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def resolve_hugepage_size(ram_size: int, requested: int | None, sysfs: Path = HUGEPAGES_SYSFS,
                          meminfo: Path = MEMINFO) -> int:
    """The huge page size guest RAM gets (`requested`, or the host's default as cloud-hypervisor takes
    it); refuses a size the host does not have and a RAM size that is not a multiple of it."""
    sizes = host_hugepage_sizes(sysfs)
    if not sizes:
        raise HugePagesError("hugepages=on: this host's kernel has no huge pages (no hugetlbfs support)")
    page_size = requested or default_hugepage_size(meminfo) or sizes[0]
    if page_size not in sizes:
        have = ", ".join(_size_text(s) for s in sizes)
        raise HugePagesError(f"hugepage_size={_size_text(page_size)}: this host has no huge pages of that "
                             f"size (it has {have})")
    if ram_size % page_size:
        # cloud-hypervisor's check and words (its memory manager, at VM creation)
        raise HugePagesError(
            f"Memory size is misaligned with default page size or its hugepage size: {ram_size} is not a "
            f"multiple of the {_size_text(page_size)} huge pages"
        )
    return page_size


def check_hugepage_pool(ram_size: int, page_size: int, sysfs: Path = HUGEPAGES_SYSFS,
                        meminfo: Path = MEMINFO) -> HugePagePool:
    """Refuse, in one line naming the file to write, a pool with fewer free pages than the guest needs:
    checked before mapping, since a guest short of huge pages would otherwise die of SIGBUS mid-run."""
    pool = HugePagePool.read(page_size, sysfs)
    needed = -(-ram_size // page_size)
    if pool.available < needed:
        path = nr_hugepages_path(page_size, default_hugepage_size(meminfo), sysfs)
        raise HugePagesError(
            f"hugepages=on needs {needed} huge pages of {_size_text(page_size)} but {pool.available} are "
            f"free; reserve them with: echo {pool.total + needed - pool.available} > {path}"
        )
    return pool


class GuestMemory:
    """Guest RAM as a list of regions; every access is bounds-checked against one region."""

    def __init__(self, regions: list[tuple[int, int]], backing: Backing | None = None) -> None:
        self.backing = backing = backing or Backing()
        self.regions: list[MemoryRegion] = []
        self._spans: list[tuple[int, int, memoryview]] = []
        self._fd: int | None = None
        try:
            if backing.memfd:
                # One file for all of RAM, each region at its own offset, as cloud-hypervisor does: one fd
                # and a list of offsets is what vhost-user's SET_MEM_TABLE hands out.
                offsets = _file_offsets([size for _, size in regions], backing.page_size)
                self._fd = _memfd(offsets[-1], backing.hugepage_size)
                for (gpa, size), file_offset in zip(regions, offsets, strict=False):
                    self.regions.append(self._map_file(gpa, size, file_offset))
            else:
                for gpa, size in regions:
                    self.regions.append(self._map_anonymous(gpa, size))
        except BaseException:
            self.close()
            raise
        # (start, end, whole view) per region: the lookup every guest access makes
        self._spans = [(r.gpa, r.gpa + r.size, r.whole) for r in self.regions if r.whole is not None]

    def _map_anonymous(self, gpa: int, size: int) -> MemoryRegion:
        huge = size >= HUGE_PAGE_SIZE and gpa % HUGE_PAGE_SIZE == 0
        # Reserve a little more address space than needed so the region can start on a boundary; the
        # slack is never touched, so it costs no memory.
        length = size + HUGE_PAGE_SIZE if huge else size
        flags = MapFlag.PRIVATE | MapFlag.ANONYMOUS | MapFlag.NORESERVE
        mapping = _mmap(-1, length, flags, 0, size)
        base = _address_of(mapping)
        offset = -base % HUGE_PAGE_SIZE if huge else 0
        region = MemoryRegion(gpa, size, mapping, base + offset, offset)
        self._prepare(region, thp=huge)
        return region

    def _map_file(self, gpa: int, size: int, file_offset: int) -> MemoryRegion:
        assert self._fd is not None
        flags = MapFlag.SHARED
        if self.backing.hugepage_size is None:
            flags |= MapFlag.NORESERVE
        # hugetlb without MAP_NORESERVE: the kernel sets the region's pages aside at mmap time, so a pool
        # emptied since the check fails here (ENOMEM) rather than as a SIGBUS in the guest later. The kernel
        # places hugetlb mappings (and shmem ones when THP may back them) on a huge page boundary itself.
        mapping = _mmap(self._fd, size, flags, file_offset, size)
        region = MemoryRegion(gpa, size, mapping, _address_of(mapping), 0, fd=self._fd,
                              file_offset=file_offset)
        self._prepare(region, thp=self.backing.hugepage_size is None)
        return region

    def _prepare(self, region: MemoryRegion, thp: bool) -> None:
        """Advice and population, then the view every access slices. Advice covers the whole mapping
        (alignment slack included: never touched, and one VMA rather than three); population only RAM."""
        backing, mapping, start, size = self.backing, region.mapping, region.offset, region.size
        if thp and backing.thp:
            with contextlib.suppress(OSError):  # kernels without THP: plain pages
                mapping.madvise(Madvice.HUGEPAGE)
        if backing.mergeable:
            try:
                mapping.madvise(Madvice.MERGEABLE)
            except OSError as exc:  # EINVAL: a kernel built without KSM; cloud-hypervisor warns too
                log.warning("--memory mergeable=on: KSM is not available on this host (%s)", exc.strerror)
        if backing.prefault:
            _populate(mapping, region.host_address, start, size)
        region.whole = memoryview(mapping)[start : start + size]

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
            region.fd = None
        self.regions = []
        if self._fd is not None:
            os.close(self._fd)  # the mappings hold the file themselves
            self._fd = None

    @classmethod
    def for_size(cls, ram_size: int) -> GuestMemory:
        return cls(layout.ram_regions(ram_size))

    @classmethod
    def for_config(cls, config: MemoryConfig, sysfs: Path = HUGEPAGES_SYSFS,
                   meminfo: Path = MEMINFO) -> GuestMemory:
        """Guest RAM as `--memory` describes it; huge pages are checked against the host's pool first."""
        hugepage_size = None
        if config.hugepages:
            hugepage_size = resolve_hugepage_size(config.size, config.hugepage_size, sysfs, meminfo)
            check_hugepage_pool(config.size, hugepage_size, sysfs, meminfo)
        backing = Backing(shared=config.shared or config.hugepages, hugepage_size=hugepage_size,
                          prefault=config.prefault, thp=config.thp, mergeable=config.mergeable)
        return cls(layout.ram_regions(config.size), backing)

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


def _file_offsets(sizes: list[int], page_size: int) -> list[int]:
    """Where each region starts in the RAM file (page-aligned, as mmap needs), then the file's size."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + -(-size // page_size) * page_size)
    return offsets


def _memfd(size: int, hugepage_size: int | None) -> int:
    flags = MemfdFlag.CLOEXEC
    if hugepage_size is not None:
        flags |= MemfdFlag.HUGETLB | MemfdFlag.huge(hugepage_size)
    try:
        fd = os.memfd_create(MEMFD_NAME, int(flags))
    except OSError as exc:
        raise GuestMemoryError(f"cannot create the guest RAM file (memfd_create): {exc.strerror}") from exc
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise GuestMemoryError(f"cannot size the guest RAM file to {size >> 20} MiB: {exc.strerror}") from exc
    return fd


def _mmap(fd: int, length: int, flags: MapFlag, offset: int, size: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, length, flags=int(flags), prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    except OSError as exc:
        raise GuestMemoryError(f"cannot map {size >> 20} MiB of guest RAM: {exc.strerror}") from exc


def _populate(mapping: mmap.mmap, address: int, start: int, size: int) -> None:
    """Fault in every page of a region now, writable (prefault=on)."""
    try:
        # Unlike MAP_POPULATE, this reports failure (ENOMEM, or EFAULT for a hugetlb pool run dry).
        mapping.madvise(Madvice.POPULATE_WRITE, start, size)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise GuestMemoryError(f"cannot prefault {size >> 20} MiB of guest RAM: {exc.strerror}") from exc
        # Kernels before 5.14: write every page ourselves (the RAM is still all zeros).
        ctypes.memset(address, 0, size)
