"""Boot vCPU state: GDT descriptors decoded back, identity page tables walked, registers and MSRs."""

from __future__ import annotations

import struct
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm import layout
from pyvmm.boot import BootVcpuState, Msr, Segment, boot_msrs, setup_boot_vcpu
from pyvmm.boot.cpu import read_gdt_segment
from pyvmm.boot.gdt import DescriptorError, decode_descriptor, encode_descriptor
from pyvmm.boot.paging import PageWalkError, identity_map_tables, translate
from pyvmm.memory import GuestMemory

GiB = layout.GiB


@pytest.fixture(scope="module")
def booted() -> tuple[GuestMemory, BootVcpuState]:
    memory = GuestMemory.for_size(64 * layout.MiB)
    return memory, setup_boot_vcpu(memory, 0x100200, 0x7000)


# --- GDT and segments ------------------------------------------------------------------------------


def test_gdt_has_boot_cs_and_ds_at_protocol_selectors(booted) -> None:
    memory, state = booted
    raw = memory.read(0x500, 32)
    entries = struct.unpack("<4Q", raw)
    assert entries[0] == 0  # null descriptor
    # Flat 64-bit code (G, L, P, S, type execute/read) and flat data (G, D/B, P, S, type read/write).
    code, data = entries[0x10 // 8], entries[0x18 // 8]
    assert code == 0x00AF_9B00_0000_FFFF
    assert data == 0x00CF_9300_0000_FFFF
    assert state.sregs.gdt.base == 0x500 and state.sregs.gdt.limit == 31
    assert 0x500 + state.sregs.gdt.limit < 0x520  # below the IDT


def test_segment_registers_match_the_gdt(booted) -> None:
    memory, state = booted
    s = state.sregs
    assert s.cs.selector == 0x10
    assert read_gdt_segment(memory, s.gdt, 0x10) == s.cs
    for seg in (s.ds, s.es, s.ss, s.fs, s.gs):
        assert seg.selector == 0x18
        assert read_gdt_segment(memory, s.gdt, 0x18) == seg


def test_code_segment_is_64bit(booted) -> None:
    _, state = booted
    cs = state.sregs.cs
    assert cs.l and not cs.db  # L=1 requires D=0
    assert cs.present and cs.s and cs.dpl == 0 and cs.type & 0x8  # code
    assert cs.base == 0 and cs.limit == 0xFFFF_FFFF and cs.g


def test_data_segment_is_writable_flat(booted) -> None:
    _, state = booted
    ds = state.sregs.ds
    assert not ds.type & 0x8 and ds.type & 0x2  # data, writable
    assert ds.db and ds.g and ds.limit == 0xFFFF_FFFF and not ds.l


def test_tr_and_ldt_are_usable_system_segments(booted) -> None:
    _, state = booted
    tr = state.sregs.tr
    assert tr.type == 11 and tr.present and not tr.s and not tr.unusable  # busy 64-bit TSS
    assert tr.limit >= 0x67 and tr.selector & 0x4 == 0
    ldt = state.sregs.ldt
    assert ldt.type == 2 and ldt.present and not ldt.s


def test_selector_beyond_gdt_limit(booted) -> None:
    memory, state = booted
    with pytest.raises(ValueError, match="beyond the GDT limit"):
        read_gdt_segment(memory, state.sregs.gdt, 0x20)


def test_idt_is_empty(booted) -> None:
    memory, state = booted
    idt = state.sregs.idt
    assert idt.base == 0x520
    assert memory.read(idt.base, idt.limit + 1) == bytes(idt.limit + 1)


segments = st.builds(
    Segment,
    base=st.integers(0, 0xFFFF_FFFF),
    limit=st.integers(0, 0xFFFFF),
    selector=st.integers(0, 0xFFFF),
    type=st.integers(0, 15),
    present=st.booleans(),
    dpl=st.integers(0, 3),
    db=st.booleans(),
    s=st.booleans(),
    l=st.booleans(),
    g=st.just(False),
    avl=st.booleans(),
)


@given(segments, st.booleans())
def test_descriptor_round_trip(seg: Segment, granular: bool) -> None:
    if granular:
        seg = Segment(**{**seg.__dict__, "g": True, "limit": seg.limit << 12 | 0xFFF})
    assert decode_descriptor(encode_descriptor(seg), seg.selector) == seg


def test_descriptor_field_positions() -> None:
    seg = Segment(0x12345678, 0xABCDE, 0, 0x9, True, 2, False, True, False, False, True)
    raw = encode_descriptor(seg)
    assert raw & 0xFFFF == 0xBCDE  # limit 15:0
    assert (raw >> 16) & 0xFFFFFF == 0x345678  # base 23:0
    assert (raw >> 56) == 0x12  # base 31:24
    assert (raw >> 48) & 0xF == 0xA  # limit 19:16
    assert (raw >> 40) & 0xFF == 0x80 | 2 << 5 | 0x10 | 0x9  # P, DPL, S, type
    assert (raw >> 52) & 0xF == 0x1  # AVL only


@pytest.mark.parametrize(
    "bad",
    [
        {"limit": 0x100000},
        {"g": True, "limit": 0x1000},
        {"base": 1 << 32},
        {"dpl": 4},
        {"type": 16},
    ],
)
def test_descriptor_errors(bad: dict) -> None:
    fields = dict(base=0, limit=0, selector=0, type=3, present=True, dpl=0, db=False, s=True, l=False)
    seg = Segment(**{**fields, "g": False, "avl": False, **bad})
    with pytest.raises(DescriptorError):
        encode_descriptor(seg)


# --- page tables -----------------------------------------------------------------------------------


@given(st.integers(0, 4 * GiB - 1))
def test_first_4gib_identity_mapped(vaddr: int) -> None:
    memory = _paged_memory()
    assert translate(memory, layout.PML4_START, vaddr) == vaddr


@pytest.mark.parametrize("vaddr", [4 * GiB, 512 * GiB, (1 << 64) - 4096])
def test_above_4gib_unmapped(vaddr: int) -> None:
    with pytest.raises(PageWalkError, match="not mapped"):
        translate(_paged_memory(), layout.PML4_START, vaddr)


def test_non_canonical_address() -> None:
    with pytest.raises(PageWalkError, match="not a canonical address"):
        translate(_paged_memory(), layout.PML4_START, 1 << 47)


def test_page_table_entries(booted) -> None:
    memory, state = booted
    assert state.sregs.cr3 == 0x9000
    assert memory.read_u64(0x9000) == 0xA000 | 0x3  # PML4[0] -> PDPT, present + writable
    assert memory.read_u64(0x9008) == 0
    for i in range(4):
        assert memory.read_u64(0xA000 + 8 * i) == (0xB000 + 0x1000 * i) | 0x3
    assert memory.read_u64(0xA000 + 8 * 4) == 0
    for i, j in [(0, 0), (0, 1), (1, 0), (3, 511)]:
        entry = memory.read_u64(0xB000 + 0x1000 * i + 8 * j)
        assert entry == ((i * 512 + j) << 21) | 0x83  # 2 MiB page, present + writable + PS


def test_tables_do_not_overlap_other_boot_data() -> None:
    pages = sorted(identity_map_tables())
    assert pages == [0x9000, 0xA000, 0xB000, 0xC000, 0xD000, 0xE000]
    others = [(0x500, 0x530), (0x7000, 0x8000), (0x8000, 0x8FF0), (0x20000, 0x30000)]
    for page in pages:
        for lo, hi in others:
            assert page + 0x1000 <= lo or page >= hi


@cache
def _paged_memory() -> GuestMemory:
    memory = GuestMemory.for_size(16 * layout.MiB)
    setup_boot_vcpu(memory, 0x100200, 0x7000)
    return memory


# --- registers, control registers, FPU and MSRs ----------------------------------------------------


def test_general_registers(booted) -> None:
    _, state = booted
    r = state.regs
    assert r.rip == 0x100200 and r.rsi == 0x7000
    assert r.rsp == r.rbp == 0x8FF0
    assert r.rflags == 0x2  # interrupts off
    assert r.rax == r.rdi == r.r15 == 0


def test_control_registers_enter_long_mode(booted) -> None:
    _, state = booted
    s = state.sregs
    assert s.cr0 & 1 and s.cr0 & (1 << 31)  # PE, PG
    assert s.cr0 & (1 << 4)  # ET
    assert not s.cr0 & (3 << 29)  # caches enabled (CD, NW clear)
    assert s.cr4 & (1 << 5)  # PAE
    assert s.efer & (1 << 8) and s.efer & (1 << 10)  # LME, LMA


def test_fpu_initial_state(booted) -> None:
    _, state = booted
    assert state.fpu.fcw == 0x37F and state.fpu.mxcsr == 0x1F80


def test_entry_outside_identity_map_is_refused() -> None:
    with pytest.raises(ValueError, match="identity-mapped first 4 GiB"):
        setup_boot_vcpu(GuestMemory.for_size(16 * layout.MiB), 4 * GiB + 0x200, 0x7000)


def test_boot_msrs() -> None:
    msrs = dict(boot_msrs())
    assert len(msrs) == len(boot_msrs())  # no duplicates
    for index in (0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102, 0x10):
        assert msrs[index] == 0
    assert msrs[0x1A0] & 1  # IA32_MISC_ENABLE fast strings
    assert msrs[0x2FF] == (1 << 11) | 6  # MTRRs on, default write-back
    assert Msr.LSTAR == 0xC0000082
