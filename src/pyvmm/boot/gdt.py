"""x86 segment descriptors: the plain `Segment` (kvm_segment's fields) and its 8-byte GDT encoding."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

DESCRIPTOR_SIZE = 8
MAX_BYTE_LIMIT = 0xFFFFF  # 20-bit limit field
PAGE_GRANULE = 0xFFF


class SegmentType(IntEnum):
    """Values of the 4-bit type field used here (code/data when s=1, system when s=0)."""

    DATA_READ_WRITE_ACCESSED = 0x3
    CODE_EXEC_READ_ACCESSED = 0xB
    SYSTEM_LDT = 0x2
    SYSTEM_TSS_BUSY = 0xB  # 64-bit TSS in long mode


class DescriptorError(ValueError):
    """A segment that cannot be encoded as a descriptor."""


@dataclass(frozen=True)
class Segment:
    """A segment register's hidden state, field for field as in `struct kvm_segment`.

    `limit` is the byte limit as KVM takes it: with g=True it is the descriptor limit scaled to 4 KiB
    pages with the low 12 bits set (0xFFFFF -> 0xFFFFFFFF).
    """

    base: int
    limit: int
    selector: int
    type: int
    present: bool
    dpl: int
    db: bool
    s: bool
    l: bool  # noqa: E741 (the name KVM uses)
    g: bool
    avl: bool
    unusable: bool = False


def encode_descriptor(seg: Segment) -> int:
    """The 64-bit GDT descriptor for `seg` (its selector and `unusable` are not part of it)."""
    if not 0 <= seg.base <= 0xFFFF_FFFF:
        raise DescriptorError(f"segment base {seg.base:#x} does not fit a descriptor")
    if seg.g:
        if seg.limit & PAGE_GRANULE != PAGE_GRANULE or not 0 <= seg.limit >> 12 <= MAX_BYTE_LIMIT:
            raise DescriptorError(f"limit {seg.limit:#x} is not expressible in 4 KiB granules")
        raw_limit = seg.limit >> 12
    else:
        if not 0 <= seg.limit <= MAX_BYTE_LIMIT:
            raise DescriptorError(f"byte-granular limit {seg.limit:#x} exceeds {MAX_BYTE_LIMIT:#x}")
        raw_limit = seg.limit
    if not 0 <= seg.type <= 0xF or not 0 <= seg.dpl <= 3:
        raise DescriptorError(f"bad segment type {seg.type} or dpl {seg.dpl}")
    return (
        (raw_limit & 0xFFFF)
        | (seg.base & 0xFF_FFFF) << 16
        | seg.type << 40
        | int(seg.s) << 44
        | seg.dpl << 45
        | int(seg.present) << 47
        | (raw_limit >> 16) << 48
        | int(seg.avl) << 52
        | int(seg.l) << 53
        | int(seg.db) << 54
        | int(seg.g) << 55
        | (seg.base >> 24) << 56
    )


def decode_descriptor(raw: int, selector: int) -> Segment:
    """The hidden segment state the CPU loads from descriptor `raw` through `selector`."""
    raw_limit = (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16
    g = bool(raw >> 55 & 1)
    return Segment(
        base=((raw >> 16) & 0xFF_FFFF) | ((raw >> 56) & 0xFF) << 24,
        limit=(raw_limit << 12 | PAGE_GRANULE) if g else raw_limit,
        selector=selector,
        type=(raw >> 40) & 0xF,
        present=bool(raw >> 47 & 1),
        dpl=(raw >> 45) & 3,
        db=bool(raw >> 54 & 1),
        s=bool(raw >> 44 & 1),
        l=bool(raw >> 53 & 1),
        g=g,
        avl=bool(raw >> 52 & 1),
    )
