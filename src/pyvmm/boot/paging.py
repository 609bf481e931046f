"""Identity-mapped 4-level page tables for the 64-bit entry, and a walker to check them."""

from __future__ import annotations

import struct
from enum import IntFlag

from pyvmm import layout
from pyvmm.memory import GuestMemory

PAGE_SIZE = 0x1000
ENTRIES_PER_TABLE = 512
LARGE_PAGE_SIZE = 2 * layout.MiB
IDENTITY_MAP_SIZE = 4 * layout.GiB
PD_PAGES = IDENTITY_MAP_SIZE // (ENTRIES_PER_TABLE * LARGE_PAGE_SIZE)  # 4 page directories
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 of an entry


class PageFlag(IntFlag):
    PRESENT = 1 << 0
    WRITABLE = 1 << 1
    USER = 1 << 2
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    LARGE = 1 << 7  # PS: 2 MiB page in a PD entry, 1 GiB page in a PDPT entry
    NO_EXECUTE = 1 << 63


class PageWalkError(Exception):
    """A virtual address that the page tables do not map."""


TABLE_FLAGS = PageFlag.PRESENT | PageFlag.WRITABLE
LEAF_FLAGS = PageFlag.PRESENT | PageFlag.WRITABLE | PageFlag.LARGE


def identity_map_tables() -> dict[int, bytes]:
    """Guest address -> 4 KiB table page: PML4, one PDPT and four PDs mapping [0, 4 GiB) with 2 MiB pages."""
    table_flags, leaf_flags = int(TABLE_FLAGS), int(LEAF_FLAGS)  # plain ints: IntFlag arithmetic is slow
    pml4 = bytearray(PAGE_SIZE)
    struct.pack_into("<Q", pml4, 0, layout.PDPTE_START | table_flags)
    pdpt = bytearray(PAGE_SIZE)
    tables: dict[int, bytes] = {layout.PML4_START: bytes(pml4)}
    for i in range(PD_PAGES):
        pd_addr = layout.PDE_START + i * PAGE_SIZE
        struct.pack_into("<Q", pdpt, i * 8, pd_addr | table_flags)
        first = i * ENTRIES_PER_TABLE
        entries = [(first + j) * LARGE_PAGE_SIZE | leaf_flags for j in range(ENTRIES_PER_TABLE)]
        tables[pd_addr] = struct.pack(f"<{ENTRIES_PER_TABLE}Q", *entries)
    tables[layout.PDPTE_START] = bytes(pdpt)
    return tables


def write_identity_map(memory: GuestMemory) -> int:
    """Write the identity-map tables into guest RAM; returns the CR3 value (the PML4 address)."""
    for addr, page in identity_map_tables().items():
        memory.write(addr, page)
    return layout.PML4_START


def translate(memory: GuestMemory, cr3: int, vaddr: int) -> int:
    """Walk 4-level page tables rooted at `cr3` like the MMU does (no permission checks)."""
    if not (vaddr < 1 << 47 or (1 << 64) - (1 << 47) <= vaddr < 1 << 64):
        raise PageWalkError(f"{vaddr:#x} is not a canonical address")
    table = cr3 & ADDRESS_MASK
    # (shift of this level's index, size of a large page at this level or 0)
    for level, (shift, large) in enumerate(((39, 0), (30, 1 << 30), (21, LARGE_PAGE_SIZE), (12, 0))):
        index = (vaddr >> shift) & (ENTRIES_PER_TABLE - 1)
        entry = memory.read_u64(table + index * 8)
        if not entry & PageFlag.PRESENT:
            raise PageWalkError(f"{vaddr:#x} not mapped (level {4 - level} entry {index} not present)")
        if shift == 12:
            return (entry & ADDRESS_MASK) | (vaddr & (PAGE_SIZE - 1))
        if large and entry & PageFlag.LARGE:
            return (entry & ADDRESS_MASK & ~(large - 1)) | (vaddr & (large - 1))
        table = entry & ADDRESS_MASK
    raise AssertionError("unreachable")
