"""Pure logic of pyvmm.vfio: capability walks and patches, mmappable areas, MSI-X relocation, the region-info
capability chain parser, the container's error texts."""

from __future__ import annotations

import ctypes
import struct

from pyvmm.vfio import capabilities as caps
from pyvmm.vfio.areas import mappable_areas, relocate_msix
from pyvmm.vfio.bindings import vfio_region_info
from pyvmm.vfio.device import SparseArea, parse_region_caps

PAGE = 4096


def reader(config: bytearray):
    def read(offset: int, size: int) -> int:
        if offset + size > len(config):
            return (1 << (8 * size)) - 1
        return int.from_bytes(config[offset : offset + size], "little")

    return read


def with_caps(chain: list[tuple[int, int, int]], size: int = 4096) -> bytearray:
    c = bytearray(size)
    c[0x06] = 0x10
    c[0x34] = chain[0][0] if chain else 0
    for offset, cap_id, nxt in chain:
        c[offset], c[offset + 1] = cap_id, nxt
    return c


def test_standard_walk_follows_the_list_and_masks_pointers() -> None:
    c = with_caps([(0x40, 0x11, 0x61), (0x60, 0x01, 0x80), (0x80, 0x10, 0)])
    assert caps.walk_standard(reader(c)) == [(0x40, 0x11), (0x60, 0x01), (0x80, 0x10)]


def test_standard_walk_stops_on_loops_and_all_ones() -> None:
    looped = with_caps([(0x40, 0x05, 0x60), (0x60, 0x01, 0x40)])
    assert caps.walk_standard(reader(looped)) == [(0x40, 0x05), (0x60, 0x01)]
    self_loop = with_caps([(0x40, 0x05, 0x40)])
    assert caps.walk_standard(reader(self_loop)) == [(0x40, 0x05)]
    ones = bytearray(b"\xff" * 256)
    assert caps.walk_standard(reader(ones)) == []
    no_list = with_caps([(0x40, 0x05, 0)])
    no_list[0x06] = 0
    assert caps.walk_standard(reader(no_list)) == []


def test_extended_walk_stops_on_loops_and_needs_pcie() -> None:
    c = with_caps([(0x40, 0x10, 0)])
    struct.pack_into("<I", c, 0x100, (0x140 << 20) | 0x10001)
    struct.pack_into("<I", c, 0x140, (0x100 << 20) | 0x1000E)  # back to the first: a loop
    scan = caps.scan(reader(c), 4096)
    assert scan.extended == [(0x100, 0x0001), (0x140, 0x000E)]
    assert caps.hidden_ext_cap_patches(scan) == [caps.ConfigPatch(0x140, 0xFFFF, 0)]
    conventional = with_caps([(0x40, 0x05, 0)])
    struct.pack_into("<I", conventional, 0x100, 0x10010)
    assert caps.scan(reader(conventional), 4096).extended == []
    assert caps.walk_extended(reader(c), 256) == []


def test_gpudirect_clique_capability_bytes() -> None:
    c = with_caps([(0x60, 0x01, 0x68), (0x68, 0x10, 0)])
    scan = caps.scan(reader(c), 4096)
    patches: dict[int, list[caps.ConfigPatch]] = {}
    for p in caps.gpudirect_clique_patches(scan, 5):
        patches.setdefault(p.offset, []).append(p)
    image = bytearray(c)
    for dword in range(0, 256, 4):
        value = caps.apply_patches(patches, dword, int.from_bytes(c[dword : dword + 4], "little"))
        image[dword : dword + 4] = value.to_bytes(4, "little")
    assert image[0x69] == 0xD4
    assert bytes(image[0xD4:0xDC]) == bytes([0x09, 0x00, 0x08, 0x50, 0x32, 0x50, 0x28, 0x00])
    assert caps.walk_standard(reader(image))[-1] == (0xD4, 0x09)


def test_mappable_areas() -> None:
    # No MSI-X: the whole BAR.
    assert mappable_areas(0x4000, True, None, False, [], PAGE) == [SparseArea(0, 0x4000)]
    # Table 0x2000+0x410 and PBA at 0x3000: whole pages around both trap.
    holes = [(0x2000, 0x410), (0x3000, 8)]
    assert mappable_areas(0x8000, True, None, True, holes, PAGE) == [
        SparseArea(0, 0x2000),
        SparseArea(0x4000, 0x4000),
    ]
    # An unaligned table takes its partly covered pages with it (the CH rounding quirk fixed).
    assert mappable_areas(0x4000, True, None, True, [(0x1F00, 0x200)], PAGE) == [
        SparseArea(0, 0x1000),
        SparseArea(0x3000, 0x1000),
    ]
    # Without MSI-X mappable or sparse areas, a BAR holding the table traps entirely.
    assert mappable_areas(0x4000, True, None, False, holes, PAGE) == []
    # Sparse areas from the kernel are used, still minus the table pages.
    sparse = (SparseArea(0, 0x3000), SparseArea(0x5000, 0x1000))
    assert mappable_areas(0x8000, True, sparse, False, holes, PAGE) == [
        SparseArea(0, 0x2000),
        SparseArea(0x5000, 0x1000),
    ]
    # A sub-page BAR is mapped as one page; excluded or non-mmappable BARs never.
    assert mappable_areas(0x100, True, None, False, [], PAGE) == [SparseArea(0, PAGE)]
    assert mappable_areas(0x100, True, None, False, [(0x80, 0x10)], PAGE) == []
    assert mappable_areas(0x4000, True, None, False, [], PAGE, excluded=True) == []
    assert mappable_areas(0x4000, False, None, False, [], PAGE) == []


def test_msix_relocation() -> None:
    # Page-aligned table or 32-bit BAR: nothing moves.
    assert relocate_msix(0x4000, True, 0, 0x2000, 0x400, 0, 0x3000, 8, PAGE).bar_size == 0x4000
    assert relocate_msix(0x4000, False, 0, 0x2100, 0x400, 0, 0x3000, 8, PAGE).table_offset == 0x2100
    # Unaligned table in a 64-bit BAR: the BAR doubles, table in the upper half, same-BAR PBA follows.
    moved = relocate_msix(0x4000, True, 0, 0x2100, 0x400, 0, 0x2500, 8, PAGE)
    assert (moved.bar_size, moved.table_offset, moved.pba_offset) == (0x8000, 0x4000, 0x4400)
    # x_msix_relocation=on: a page-aligned table of a 64-bit BAR moves too; a 32-bit BAR still does not.
    forced = relocate_msix(0x4000, True, 0, 0x2000, 0x400, 0, 0x3000, 8, PAGE, force=True)
    assert (forced.bar_size, forced.table_offset, forced.pba_offset) == (0x8000, 0x4000, 0x5000)
    assert relocate_msix(0x4000, False, 0, 0x2000, 0x400, 0, 0x3000, 8, PAGE, force=True).bar_size == 0x4000
    # A PBA in another BAR stays; sizes are powers of two.
    other = relocate_msix(0x2000, True, 0, 0x100, 0x3000 - 0x100, 2, 0x0, 8, PAGE)
    assert other.pba_offset == 0 and other.bar_size & (other.bar_size - 1) == 0


def test_region_capability_chain_parser() -> None:
    base = ctypes.sizeof(vfio_region_info)
    buf = bytearray(base + 16 + 32 + 8 + 16)
    sparse_at, msix_at, type_at = base, base + 48, base + 56
    struct.pack_into("<HHIII", buf, sparse_at, 1, 1, msix_at, 2, 0)
    struct.pack_into("<QQQQ", buf, sparse_at + 16, 0, 0x1000, 0x3000, 0x1000)
    struct.pack_into("<HHI", buf, msix_at, 3, 1, type_at)
    struct.pack_into("<HHIII", buf, type_at, 2, 1, 0, 0x8000_10DE, 1)
    sparse, msix, region_type = parse_region_caps(bytes(buf), sparse_at)
    assert sparse == (SparseArea(0, 0x1000), SparseArea(0x3000, 0x1000))
    assert msix and region_type == (0x8000_10DE, 1)
    # A chain that points back at itself ends.
    struct.pack_into("<HHI", buf, msix_at, 3, 1, msix_at)
    assert parse_region_caps(bytes(buf), msix_at) == (None, True, None)
