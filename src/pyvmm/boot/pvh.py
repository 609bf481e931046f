"""Loading an ELF vmlinux for the PVH entry: segments at their physical addresses, hvm_start_info.

The start-of-day structures are those of Xen's public arch-x86/hvm/start_info.h (version 1), written where
pyvmm.layout says; docs/boot.md#pvh-entry describes what pyvmm hands the kernel and in which state.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from pyvmm import layout
from pyvmm.boot.bzimage import KernelImageError, read_source
from pyvmm.boot.elf import ElfKernel, ImageFile, LoadSegment, parse_elf_kernel
from pyvmm.boot.zeropage import E820Entry, validate_e820
from pyvmm.memory import GuestMemory, GuestMemoryError

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1  # memmap_paddr/memmap_entries exist
PAGE_SIZE = 0x1000
# Linux copies at most COMMAND_LINE_SIZE (2048 on x86) bytes of the command line, NUL included.
PVH_CMDLINE_MAX = 2048


class HvmMemmapType(IntEnum):
    """hvm_memmap_table_entry.type: the E820 type numbers."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5
    DISABLED = 6
    PMEM = 7


class hvm_start_info(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("nr_modules", ctypes.c_uint32),
        ("modlist_paddr", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("rsdp_paddr", ctypes.c_uint64),
        ("memmap_paddr", ctypes.c_uint64),  # version 1 and later
        ("memmap_entries", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class hvm_modlist_entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("paddr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    ]


class hvm_memmap_table_entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


MEMMAP_ENTRY_SIZE = ctypes.sizeof(hvm_memmap_table_entry)
MAX_MEMMAP_ENTRIES = (layout.PVH_MEMMAP_END - layout.PVH_MEMMAP_START) // MEMMAP_ENTRY_SIZE


@dataclass(frozen=True)
class PvhBootInfo:
    """Where load_pvh put things; entry_point and start_info feed the boot vCPU (eip, ebx)."""

    entry_point: int
    start_info: int
    kernel_start: int
    kernel_end: int
    cmdline_addr: int
    initramfs_addr: int  # 0 when there is none
    initramfs_size: int


def build_start_info(*, cmdline_addr: int, rsdp_addr: int | None, initramfs_addr: int, initramfs_size: int,
                     e820: Sequence[E820Entry]) -> tuple[bytes, bytes, bytes]:
    """The hvm_start_info, its module list (empty or the initramfs) and its memory map, as bytes."""
    if len(e820) > MAX_MEMMAP_ENTRIES:
        raise KernelImageError(f"too many memory map entries ({len(e820)}, room for {MAX_MEMMAP_ENTRIES})")
    modules = b""
    if initramfs_size:
        modules = bytes(hvm_modlist_entry(paddr=initramfs_addr, size=initramfs_size))
    memmap = b"".join(bytes(hvm_memmap_table_entry(addr=e.addr, size=e.size, type=e.type)) for e in e820)
    info = hvm_start_info(
        magic=XEN_HVM_START_MAGIC_VALUE,
        version=HVM_START_INFO_VERSION,
        nr_modules=1 if modules else 0,
        modlist_paddr=layout.PVH_MODLIST_START if modules else 0,
        cmdline_paddr=cmdline_addr,
        rsdp_paddr=rsdp_addr or 0,
        memmap_paddr=layout.PVH_MEMMAP_START,
        memmap_entries=len(e820),
    )
    return bytes(info), modules, memmap


def _encode_cmdline(cmdline: str) -> bytes:
    data = cmdline.encode()
    if b"\0" in data:
        raise KernelImageError("kernel command line contains a NUL character")
    if len(data) + 1 > PVH_CMDLINE_MAX:
        raise KernelImageError(
            f"kernel command line too long ({len(data) + 1} bytes with its NUL, the limit is "
            f"{PVH_CMDLINE_MAX})"
        )
    return data + b"\0"


def check_segments(kernel: ElfKernel, ram: Sequence[tuple[int, int]]) -> None:
    """Every segment inside one RAM region (guest address, length) and clear of the loader's low memory
    (the boot structures and ACPI tables below 1 MiB)."""
    for seg in kernel.segments:
        if seg.paddr < layout.HIGH_RAM_START:
            raise KernelImageError(
                f"ELF segment at {seg.paddr:#x} overlaps the boot structures below {layout.HIGH_RAM_START:#x}"
            )
        if not any(gpa <= seg.paddr and seg.end <= gpa + size for gpa, size in ram):
            raise KernelImageError(
                f"ELF segment {seg.paddr:#x}-{seg.end - 1:#x} is outside guest RAM "
                f"({sum(size for _, size in ram) >> 20} MiB)"
            )


def _initramfs_address(memory: GuestMemory, size: int, segments: Sequence[LoadSegment]) -> int:
    """Top of the first RAM region (below 3 GiB), page aligned, above every kernel segment below it."""
    top = min(memory.regions[0].gpa + memory.regions[0].size, layout.LOW_RAM_END)
    floor = max([layout.HIGH_RAM_START, *(s.end for s in segments if s.paddr < top)])
    floor = (floor + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    if size > top - floor:
        raise KernelImageError(
            f"initramfs too large ({size} bytes; {max(0, top - floor)} bytes fit between the kernel "
            f"and {top:#x})"
        )
    return (top - size) // PAGE_SIZE * PAGE_SIZE


def load_pvh(
    memory: GuestMemory,
    image: ImageFile,
    cmdline: str,
    initramfs: bytes | bytearray | memoryview | str | os.PathLike[str] | None,
    e820: Sequence[E820Entry | tuple[int, int, int]],
    rsdp_addr: int | None = None,
) -> PvhBootInfo:
    """Load an ELF vmlinux for the PVH entry and write its hvm_start_info; returns where things went."""
    kernel = parse_elf_kernel(image)
    entries = validate_e820(e820)
    cmdline_bytes = _encode_cmdline(cmdline)
    check_segments(kernel, [(r.gpa, r.size) for r in memory.regions])

    initramfs_addr = initramfs_size = 0
    data: bytes | memoryview = b""
    if initramfs is not None:
        data = read_source(initramfs, "initramfs")
        if len(data) == 0:
            raise KernelImageError("initramfs is empty")
        initramfs_size = len(data)
        initramfs_addr = _initramfs_address(memory, initramfs_size, kernel.segments)
    info, modules, memmap = build_start_info(
        cmdline_addr=layout.CMDLINE_START, rsdp_addr=rsdp_addr, initramfs_addr=initramfs_addr,
        initramfs_size=initramfs_size, e820=entries,
    )
    try:
        for seg in kernel.segments:
            # Straight from the file into guest RAM: one copy of tens of MiB.
            image.read_into(seg.offset, memory.view(seg.paddr, seg.filesz), "an ELF segment")
            if seg.memsz > seg.filesz:
                memory.write(seg.paddr + seg.filesz, bytes(seg.memsz - seg.filesz))
        if initramfs_size:
            memory.write(initramfs_addr, data)
        memory.write(layout.CMDLINE_START, cmdline_bytes)
        memory.write(layout.PVH_START_INFO_START, info)
        memory.write(layout.PVH_MODLIST_START, modules)
        memory.write(layout.PVH_MEMMAP_START, memmap)
    except GuestMemoryError as e:
        raise KernelImageError(f"cannot place the kernel in guest RAM: {e}") from None
    return PvhBootInfo(
        entry_point=kernel.pvh_entry,
        start_info=layout.PVH_START_INFO_START,
        kernel_start=kernel.segments[0].paddr,
        kernel_end=max(s.end for s in kernel.segments),
        cmdline_addr=layout.CMDLINE_START,
        initramfs_addr=initramfs_addr,
        initramfs_size=initramfs_size,
    )
