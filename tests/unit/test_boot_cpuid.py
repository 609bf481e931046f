"""Per-vCPU CPUID adjustments, checked against the Intel/AMD leaf definitions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.boot import CpuidEntry, CpuidError, CpuTopology, adjust_cpuid, guest_phys_bits, host_phys_bits

SIG = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def vendor_regs(name: bytes) -> tuple[int, int, int]:
    """(ebx, ecx, edx) for a 12-byte vendor string (stored in EBX, EDX, ECX order)."""
    ebx, edx, ecx = (int.from_bytes(name[i : i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def host_leaves(vendor: bytes = b"GenuineIntel", phys_eax: int | None = 0x3027) -> list[CpuidEntry]:
    """A trimmed KVM_GET_SUPPORTED_CPUID answer from a 2-socket, 8-thread host."""
    ebx, ecx, edx = vendor_regs(vendor)
    leaves = [
        CpuidEntry(0, 0, 0, 0x1F, ebx, ecx, edx),
        # leaf 1: EBX brand 0x02, CLFLUSH 8 (64 bytes), host count 16 and APIC id 0x21;
        # ECX x2APIC (21) and TSC-deadline (24); EDX without HTT.
        CpuidEntry(1, 0, 0, 0x000906EA, 0x21_10_08_02, (1 << 21) | (1 << 24) | 1, 0x0F8BFBFF),
        # leaf 4: L1d, L1i, L2, L3 and the terminating null entry
        CpuidEntry(4, 0, SIG, 0x1C00_4121, 0x01C0003F, 0x3F, 0),
        CpuidEntry(4, 1, SIG, 0x1C00_4122, 0x01C0003F, 0x3F, 0),
        CpuidEntry(4, 2, SIG, 0x1C00_4143, 0x00C0003F, 0x3FF, 0),
        CpuidEntry(4, 3, SIG, 0x1C03_C163, 0x02C0003F, 0x3FFF, 6),
        CpuidEntry(4, 4, SIG, 0, 0, 0, 0),
        CpuidEntry(0xB, 0, SIG, 1, 2, 0x100, 0x21),
        CpuidEntry(0xB, 1, SIG, 4, 8, 0x201, 0x21),
        CpuidEntry(0xB, 2, SIG, 0, 0, 2, 0x21),
        CpuidEntry(0x1F, 0, SIG, 1, 2, 0x100, 0x21),
        CpuidEntry(0x1F, 1, SIG, 4, 8, 0x201, 0x21),
        CpuidEntry(0x1F, 2, SIG, 0, 0, 2, 0x21),
        CpuidEntry(0x4000_0000, 0, 0, 0x4000_0001, 0x4B4D564B, 0x564B4D56, 0x4D),
        CpuidEntry(0x8000_0000, 0, 0, 0x8000_0008, 0, 0, 0),
    ]
    if phys_eax is not None:
        leaves.append(CpuidEntry(0x8000_0008, 0, 0, phys_eax, 0x100D000, 0, 0))
    return leaves


def leaf(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    matches = [e for e in entries if e.function == function and e.index == index]
    assert len(matches) == 1, (hex(function), index, matches)
    return matches[0]


def subleaves(entries: list[CpuidEntry], function: int) -> list[CpuidEntry]:
    return sorted((e for e in entries if e.function == function), key=lambda e: e.index)


# --- leaf 1 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpu_id", [0, 1, 5])
def test_leaf1_apic_id_and_count(vcpu_id: int) -> None:
    e = leaf(adjust_cpuid(host_leaves(), vcpu_id, 6, 39), 1)
    assert e.ebx >> 24 == vcpu_id
    assert (e.ebx >> 16) & 0xFF == 6
    assert e.ebx & 0xFFFF == 0x0802  # CLFLUSH size and brand index untouched
    assert e.edx & (1 << 28)  # HTT: the count field is valid
    assert e.ecx & (1 << 31)  # running under a hypervisor
    assert e.ecx & (1 << 21) and e.ecx & (1 << 24)  # x2APIC and TSC-deadline kept
    assert e.eax == 0x000906EA


def test_leaf1_single_vcpu_clears_htt() -> None:
    supported = host_leaves()
    supported[1] = CpuidEntry(1, 0, 0, 0x906EA, 0x21_10_08_02, 0, 0x0F8BFBFF | (1 << 28))
    e = leaf(adjust_cpuid(supported, 0, 1, 39), 1)
    assert not e.edx & (1 << 28)
    assert (e.ebx >> 16) & 0xFF == 1 and e.ebx >> 24 == 0


def test_leaf1_feature_bits_kvm_did_not_report_stay_off() -> None:
    supported = host_leaves()
    supported[1] = CpuidEntry(1, 0, 0, 0x906EA, 0, 0, 0)
    e = leaf(adjust_cpuid(supported, 0, 2, 39), 1)
    assert e.ecx == 1 << 31  # only the hypervisor bit is added


def test_leaf1_offers_the_tsc_deadline_timer_only_when_asked() -> None:
    supported = host_leaves()
    supported[1] = CpuidEntry(1, 0, 0, 0x906EA, 0, 0, 0)
    assert leaf(adjust_cpuid(supported, 0, 1, 39, tsc_deadline=True), 1).ecx == (1 << 31) | (1 << 24)
    assert not leaf(adjust_cpuid(supported, 0, 1, 39), 1).ecx & (1 << 24)


# --- leaves 0xB and 0x1F ---------------------------------------------------------------------------


@pytest.mark.parametrize("vcpu_id", [0, 3, 6])
def test_leaf_0xb_default_topology(vcpu_id: int) -> None:
    subs = subleaves(adjust_cpuid(host_leaves(), vcpu_id, 7, 39), 0xB)
    assert [s.index for s in subs] == [0, 1, 2]
    smt, core, end = subs
    assert all(s.edx == vcpu_id and s.flags & SIG for s in subs)  # x2APIC id in EDX
    assert (smt.ecx >> 8) & 0xFF == 1 and smt.ecx & 0xFF == 0
    assert smt.eax & 0x1F == 0 and smt.ebx & 0xFFFF == 1  # one thread per core
    assert (core.ecx >> 8) & 0xFF == 2 and core.ecx & 0xFF == 1
    assert core.ebx & 0xFFFF == 7  # all vCPUs in one package
    assert (1 << (core.eax & 0x1F)) >= 7 > (1 << (core.eax & 0x1F)) // 2  # narrowest shift
    assert (end.ecx >> 8) & 0xFF == 0 and end.ecx & 0xFF == 2 and end.eax == end.ebx == 0


def test_leaf_0x1f_with_dies() -> None:
    topo = CpuTopology(threads_per_core=2, cores_per_die=3, dies_per_package=2, packages=1)
    entries = adjust_cpuid(host_leaves(), 11, 12, 39, topology=topo)
    subs = subleaves(entries, 0x1F)
    assert [(s.ecx >> 8) & 0xFF for s in subs] == [1, 2, 5, 0]  # SMT, core, die, end
    assert [s.eax & 0x1F for s in subs[:3]] == [1, 3, 4]
    assert [s.ebx & 0xFFFF for s in subs[:3]] == [2, 6, 12]
    assert all(s.edx == 11 for s in subs)
    # Leaf 0xB has no die level: its core level shifts straight to the package id.
    b = subleaves(entries, 0xB)
    assert [(s.ecx >> 8) & 0xFF for s in b] == [1, 2, 0]
    assert b[1].eax & 0x1F == 4 and b[1].ebx == 12


def test_topology_leaves_not_invented() -> None:
    supported = [e for e in host_leaves() if e.function not in (0xB, 0x1F)]
    entries = adjust_cpuid(supported, 0, 4, 39)
    assert not subleaves(entries, 0xB) and not subleaves(entries, 0x1F)


@given(
    threads=st.integers(1, 2),
    cores=st.integers(1, 16),
    dies=st.integers(1, 3),
    packages=st.integers(1, 3),
    data=st.data(),
)
def test_apic_id_decomposes_by_topology_shifts(
    threads: int, cores: int, dies: int, packages: int, data: st.DataObject
) -> None:
    topo = CpuTopology(threads, cores, dies, packages)
    vcpu_id = data.draw(st.integers(0, topo.total - 1))
    entries = adjust_cpuid(host_leaves(), vcpu_id, topo.total, 40, topology=topo)
    smt, core, *_ = subleaves(entries, 0xB)
    # Each level's field must be wide enough for its count, and the shifts must nest.
    assert (1 << (smt.eax & 0x1F)) >= threads
    assert (1 << ((core.eax & 0x1F) - (smt.eax & 0x1F))) >= cores * dies
    assert core.ebx == threads * cores * dies
    assert leaf(entries, 1).ebx >> 24 == vcpu_id & 0xFF


# --- leaf 4 ----------------------------------------------------------------------------------------


def test_leaf4_cores_and_sharing() -> None:
    entries = adjust_cpuid(host_leaves(), 2, 6, 39)
    caches = subleaves(entries, 4)
    for c in caches[:4]:
        assert c.eax >> 26 == 5  # cores per package - 1
        assert c.eax & 0x3FFF == {0: 0x121, 1: 0x122, 2: 0x143, 3: 0x163}[c.index]  # type/level kept
        assert c.ebx == host_leaves()[2 + c.index].ebx  # geometry untouched
    sharing = [(c.eax >> 14) & 0xFFF for c in caches[:4]]
    assert sharing == [0, 0, 0, 5]  # L1/L2 private to a core (one thread), L3 shared by all six
    assert caches[4].eax == 0  # the terminator stays a terminator


def test_leaf4_sharing_with_two_threads_per_core() -> None:
    topo = CpuTopology(threads_per_core=2, cores_per_die=4)
    caches = subleaves(adjust_cpuid(host_leaves(), 0, 8, 39, topology=topo), 4)
    assert [c.eax >> 26 for c in caches[:4]] == [3, 3, 3, 3]
    assert [(c.eax >> 14) & 0xFFF for c in caches[:4]] == [1, 1, 1, 7]


# --- physical address bits -------------------------------------------------------------------------


def test_leaf_0x80000008_phys_bits() -> None:
    e = leaf(adjust_cpuid(host_leaves(phys_eax=0x3027), 0, 2, 39), 0x8000_0008)
    assert e.eax & 0xFF == 39
    assert (e.eax >> 16) & 0xFF == 39
    assert (e.eax >> 8) & 0xFF == 0x30  # linear address bits untouched
    assert e.ebx == 0x100D000


def test_phys_bits_rule() -> None:
    assert guest_phys_bits(0x3030, 46) == 46  # 48-bit host capped at 46
    assert guest_phys_bits(0x3027, 46) == 39  # 39-bit host
    assert guest_phys_bits(0x3027) == 39
    assert guest_phys_bits(None, 46) == 36  # leaf absent
    assert guest_phys_bits(None, 32) == 32
    assert guest_phys_bits(0x3034, 52) == 52


def test_host_phys_bits_from_supported_cpuid() -> None:
    assert host_phys_bits(host_leaves(phys_eax=0x302E)) == 46
    assert host_phys_bits(host_leaves(phys_eax=None)) is None
    bits = guest_phys_bits(leaf(host_leaves(phys_eax=0x3034), 0x8000_0008).eax, 46)
    assert leaf(adjust_cpuid(host_leaves(), 0, 1, bits), 0x8000_0008).eax & 0xFF == 46


@pytest.mark.parametrize("bad", [0, 65])
def test_phys_bits_out_of_range(bad: int) -> None:
    with pytest.raises(CpuidError, match="between 1 and 64"):
        guest_phys_bits(0x3027, bad)
    with pytest.raises(CpuidError, match="between 1 and 64"):
        adjust_cpuid(host_leaves(), 0, 1, bad)


# --- AMD -------------------------------------------------------------------------------------------


def test_amd_extended_topology() -> None:
    supported = [*host_leaves(vendor=b"AuthenticAMD"), CpuidEntry(0x8000_001E, 0, 0, 7, 0x0101, 0x300, 0)]
    entries = adjust_cpuid(supported, 5, 8, 40, topology=CpuTopology(threads_per_core=2, cores_per_die=4))
    ext = leaf(entries, 0x8000_001E)
    assert ext.eax == 5  # extended APIC id
    assert ext.ebx & 0xFF == 2 and (ext.ebx >> 8) & 0xFF == 1  # core 2, 2 threads per core
    size = leaf(entries, 0x8000_0008)
    assert size.ecx & 0xFF == 7 and (size.ecx >> 12) & 0xF == 3  # 8 threads, 3 APIC id bits


def test_intel_leaves_untouched_by_amd_rules() -> None:
    supported = [*host_leaves(), CpuidEntry(0x8000_001E, 0, 0, 7, 0x0101, 0x300, 0)]
    entries = adjust_cpuid(supported, 5, 8, 40)
    assert leaf(entries, 0x8000_001E) == supported[-1]
    assert leaf(entries, 0x8000_0008).ecx == 0


# --- general ---------------------------------------------------------------------------------------


def test_other_leaves_pass_through_and_input_is_not_modified() -> None:
    supported = host_leaves()
    before = list(supported)
    entries = adjust_cpuid(supported, 1, 2, 39)
    assert supported == before
    for function in (0, 0x4000_0000, 0x8000_0000):
        assert leaf(entries, function) == leaf(supported, function)
    assert len(entries) == len(supported)


def test_vcpus_differ_only_in_apic_ids() -> None:
    a = adjust_cpuid(host_leaves(), 0, 4, 39)
    b = adjust_cpuid(host_leaves(), 3, 4, 39)
    diff = [(x.function, x.index) for x, y in zip(a, b, strict=True) if x != y]
    assert diff == [(1, 0), (0xB, 0), (0xB, 1), (0xB, 2), (0x1F, 0), (0x1F, 1), (0x1F, 2)]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((4, 4, 39), {}, "vcpu_id=4 is not below num_vcpus=4"),
        ((-1, 4, 39), {}, "vcpu_id=-1"),
        ((0, 0, 39), {}, "num_vcpus=0 must be at least 1"),
        ((0, 4, 39), {"topology": CpuTopology(2, 1, 1, 1)}, "topology has 2 vCPUs but num_vcpus is 4"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(CpuidError, match=message):
        adjust_cpuid(host_leaves(), *args, **kwargs)


def test_zero_topology_part() -> None:
    with pytest.raises(CpuidError, match="no part of the CPU topology can be zero"):
        CpuTopology(1, 0, 1, 1)
