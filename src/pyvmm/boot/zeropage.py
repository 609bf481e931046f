"""Building the Linux zero page (`struct boot_params`) handed to the kernel in %rsi."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.boot.bootparams import (
    E820_ENTRY_SIZE,
    E820_MAX_ENTRIES_ZEROPAGE,
    HEAP_END_PTR,
    SETUP_HEADER_LIMIT,
    TYPE_OF_LOADER_UNDEFINED,
    VID_MODE_NORMAL,
    ZERO_PAGE_SIZE,
    BootParam,
    Hdr,
    LoadFlags,
)

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class ZeroPageError(ValueError):
    """Values that cannot be expressed in the zero page."""


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


def validate_e820(entries: Sequence[E820Entry | tuple[int, int, int]]) -> list[E820Entry]:
    """Check an E820 map (address, length, type) and return it as E820Entry values."""
    result = [e if isinstance(e, E820Entry) else E820Entry(*e) for e in entries]
    if len(result) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ZeroPageError(
            f"too many E820 entries ({len(result)}, the zero page holds {E820_MAX_ENTRIES_ZEROPAGE})"
        )
    for e in result:
        if e.addr < 0 or e.size <= 0 or e.addr + e.size > U64_MAX + 1 or not 0 < e.type <= U32_MAX:
            raise ZeroPageError(f"invalid E820 entry (addr={e.addr:#x}, size={e.size:#x}, type={e.type})")
    return result


def _put(page: bytearray, fmt: str, offset: int, value: int) -> None:
    struct.pack_into("<" + fmt, page, offset, value)


def build_zero_page(
    setup_header: bytes,
    *,
    cmdline_addr: int,
    initramfs_addr: int = 0,
    initramfs_size: int = 0,
    e820: Sequence[E820Entry | tuple[int, int, int]] = (),
    rsdp_addr: int | None = None,
) -> bytearray:
    """A 4 KiB zero page: the image's setup header (bytes from 0x1F1) plus what the loader fills in.

    Everything not listed stays zero, including the sentinel at 0x1EF (a nonzero sentinel makes the
    kernel discard fields it believes a careless loader left behind).
    """
    if not 0 < len(setup_header) <= SETUP_HEADER_LIMIT - Hdr.SETUP_SECTS:
        raise ZeroPageError(f"setup header of {len(setup_header)} bytes does not fit the zero page")
    for name, value in (("command line", cmdline_addr), ("initramfs", initramfs_addr)):
        if not 0 <= value <= U64_MAX:
            raise ZeroPageError(f"{name} address {value:#x} out of range")
    if not 0 <= initramfs_size <= U64_MAX:
        raise ZeroPageError(f"initramfs size {initramfs_size} out of range")
    entries = validate_e820(e820)

    page = bytearray(ZERO_PAGE_SIZE)
    page[Hdr.SETUP_SECTS : Hdr.SETUP_SECTS + len(setup_header)] = setup_header

    _put(page, "H", Hdr.VID_MODE, VID_MODE_NORMAL)
    page[Hdr.TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    page[Hdr.LOADFLAGS] |= LoadFlags.CAN_USE_HEAP  # keep LOADED_HIGH and whatever else the image set
    _put(page, "H", Hdr.HEAP_END_PTR, HEAP_END_PTR)
    _put(page, "I", Hdr.CMD_LINE_PTR, cmdline_addr & U32_MAX)
    _put(page, "I", BootParam.EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    _put(page, "I", Hdr.RAMDISK_IMAGE, initramfs_addr & U32_MAX)
    _put(page, "I", BootParam.EXT_RAMDISK_IMAGE, initramfs_addr >> 32)
    _put(page, "I", Hdr.RAMDISK_SIZE, initramfs_size & U32_MAX)
    _put(page, "I", BootParam.EXT_RAMDISK_SIZE, initramfs_size >> 32)
    if rsdp_addr is not None:
        if not 0 < rsdp_addr <= U64_MAX:
            raise ZeroPageError(f"RSDP address {rsdp_addr:#x} out of range")
        _put(page, "Q", BootParam.ACPI_RSDP_ADDR, rsdp_addr)

    page[BootParam.E820_ENTRIES] = len(entries)
    for i, e in enumerate(entries):
        struct.pack_into("<QQI", page, BootParam.E820_TABLE + i * E820_ENTRY_SIZE, e.addr, e.size, e.type)
    return page
