"""Which parts of a BAR may be mmapped into the guest, and the MSI-X table relocation
(docs/vfio.md#which-bar-parts-are-mapped, docs/vfio.md#msi-x-table-relocation). Pure logic.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.vfio.device import SparseArea


def align_down(value: int, align: int) -> int:
    return value - value % align


def align_up(value: int, align: int) -> int:
    return align_down(value + align - 1, align)


def next_power_of_two(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def mappable_areas(
    region_size: int,
    mmappable: bool,
    sparse: tuple[SparseArea, ...] | None,
    msix_mappable: bool,
    holes: list[tuple[int, int]],
    page_size: int,
    excluded: bool = False,
) -> list[SparseArea]:
    """Page-aligned areas of a BAR region to map into the guest; the rest of the BAR traps.

    `holes` are (offset, length) ranges that must trap (the physical MSI-X table and PBA living in this BAR,
    relocated for the guest or not); they are widened to whole pages, so table pages are never mapped. A
    region holding a hole is mapped only if the kernel said where (sparse areas) or that MSI-X pages may be
    mapped (MSI-X mappable).
    """
    if excluded or not mmappable or region_size <= 0:
        return []
    live_holes = [(off, n) for off, n in holes if n > 0 and off < region_size]
    if live_holes and sparse is None and not msix_mappable:
        return []
    if region_size < page_size:
        # A sub-page BAR can only be mapped whole, as one page (the kernel reserved the rest of it).
        if live_holes or (sparse is not None and not any(a.offset == 0 and a.size > 0 for a in sparse)):
            return []
        return [SparseArea(0, page_size)]
    base = list(sparse) if sparse is not None else [SparseArea(0, region_size)]
    blocked = sorted((align_down(off, page_size), align_up(off + n, page_size)) for off, n in live_holes)
    areas: list[SparseArea] = []
    for area in base:
        pieces = [(area.offset, min(area.offset + area.size, region_size))]
        for lo, hi in blocked:
            cut = []
            for start, end in pieces:
                if hi <= start or lo >= end:
                    cut.append((start, end))
                    continue
                if start < lo:
                    cut.append((start, lo))
                if hi < end:
                    cut.append((hi, end))
            pieces = cut
        for start, end in pieces:
            start, end = align_up(start, page_size), align_down(end, page_size)
            if end > start:
                areas.append(SparseArea(start, end - start))
    # Overlapping sparse areas become one mapping: two would be two KVM slots over the same guest pages.
    merged: list[SparseArea] = []
    for area in sorted(areas, key=lambda a: a.offset):
        last = merged[-1] if merged else None
        if last is not None and area.offset < last.offset + last.size:
            merged[-1] = SparseArea(last.offset, max(last.size, area.offset + area.size - last.offset))
        else:
            merged.append(area)
    return merged


@dataclass(frozen=True)
class MsixLayout:
    """Where the guest sees the MSI-X table and PBA, and how big the guest's BAR is."""

    bar_size: int  # guest-visible size of the table's BAR
    table_offset: int
    pba_offset: int


def relocate_msix(
    bar_size: int,
    is_64bit: bool,
    table_bir: int,
    table_offset: int,
    table_length: int,
    pba_bir: int,
    pba_offset: int,
    pba_length: int,
    page_size: int,
    force: bool = False,
) -> MsixLayout:
    """Move an MSI-X table that shares a page with other registers of a 64-bit BAR into a new upper half.

    The guest BAR doubles (at least) so the whole physical BAR can be mapped while the table, now in the
    upper half, traps. The PBA moves along only when it sits in the same BAR; sizes stay powers of two.
    `force` (x_msix_relocation=on) moves a page-aligned table of a 64-bit BAR the same way.
    """
    if not is_64bit or (table_offset % page_size == 0 and not force):
        return MsixLayout(bar_size, table_offset, pba_offset)
    msix_size = align_up(table_length + pba_length, page_size)
    new_size = next_power_of_two(max(2 * bar_size, 2 * msix_size))
    new_table = new_size // 2
    new_pba = new_table + (pba_offset - table_offset) if pba_bir == table_bir else pba_offset
    if pba_bir == table_bir and not 0 <= new_pba < new_size:
        return MsixLayout(bar_size, table_offset, pba_offset)
    return MsixLayout(new_size, new_table, new_pba)
