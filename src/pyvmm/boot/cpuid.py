"""Per-vCPU CPUID: KVM's supported leaves adjusted for APIC ids, topology and physical address width.

The APIC id of a vCPU is its vCPU id (as KVM's in-kernel LAPIC and the MADT assume). `num_vcpus` is the
maximum vCPU count, so every vCPU, booted or not yet, sees the same topology.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag

from pyvmm import layout

DEFAULT_HOST_PHYS_BITS = 36  # what an x86-64 CPU without leaf 0x80000008 implies


class CpuidFlag(IntFlag):
    """`struct kvm_cpuid_entry2` flags."""

    SIGNIFICANT_INDEX = 1 << 0
    STATEFUL_FUNC = 1 << 1
    STATE_READ_NEXT = 1 << 2


class Leaf(IntEnum):
    VENDOR = 0x0
    FEATURES = 0x1
    CACHE_PARAMS = 0x4
    EXT_TOPOLOGY = 0xB
    V2_EXT_TOPOLOGY = 0x1F
    ADDRESS_SIZES = 0x8000_0008
    AMD_EXT_APIC_ID = 0x8000_001E


class TopologyLevel(IntEnum):
    """Level types in leaf 0xB/0x1F ECX[15:8]."""

    INVALID = 0
    SMT = 1
    CORE = 2
    DIE = 5


HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
TSC_DEADLINE_BIT = 1 << 24  # leaf 1 ECX
HTT_BIT = 1 << 28  # leaf 1 EDX
AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")


class CpuidError(ValueError):
    """Arguments that do not describe a valid vCPU."""


@dataclass(frozen=True)
class CpuidEntry:
    """One `struct kvm_cpuid_entry2` (padding left out)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class CpuTopology:
    """cloud-hypervisor's topology=t:c:d:p; the product is the maximum vCPU count."""

    threads_per_core: int = 1
    cores_per_die: int = 1
    dies_per_package: int = 1
    packages: int = 1

    def __post_init__(self) -> None:
        parts = (self.threads_per_core, self.cores_per_die, self.dies_per_package, self.packages)
        if min(parts) < 1:
            raise CpuidError("no part of the CPU topology can be zero")

    @classmethod
    def single_package(cls, num_vcpus: int) -> CpuTopology:
        """One thread per core, all vCPUs as cores of one package."""
        return cls(cores_per_die=num_vcpus)

    @property
    def threads_per_die(self) -> int:
        return self.threads_per_core * self.cores_per_die

    @property
    def threads_per_package(self) -> int:
        return self.threads_per_die * self.dies_per_package

    @property
    def cores_per_package(self) -> int:
        return self.cores_per_die * self.dies_per_package

    @property
    def total(self) -> int:
        return self.threads_per_package * self.packages

    # APIC id bit widths: a vCPU's id decomposes as [package | die | core | thread].
    @property
    def thread_shift(self) -> int:
        return (self.threads_per_core - 1).bit_length()

    @property
    def core_shift(self) -> int:
        return self.thread_shift + (self.cores_per_die - 1).bit_length()

    @property
    def package_shift(self) -> int:
        return self.core_shift + (self.dies_per_package - 1).bit_length()


def host_phys_bits(supported: Sequence[CpuidEntry]) -> int | None:
    """The host's physical address width as KVM_GET_SUPPORTED_CPUID reports it (leaf 0x80000008)."""
    for entry in supported:
        if entry.function == Leaf.ADDRESS_SIZES:
            return entry.eax & 0xFF or None
    return None


def guest_phys_bits(host_leaf_eax: int | None, max_phys_bits: int = layout.DEFAULT_MAX_PHYS_BITS) -> int:
    """min(host leaf 0x80000008 EAX[7:0], max_phys_bits); a host without the leaf counts as 36 bits."""
    if not 1 <= max_phys_bits <= 64:
        raise CpuidError(f"max_phys_bits={max_phys_bits} must be between 1 and 64")
    host = (host_leaf_eax & 0xFF if host_leaf_eax is not None else 0) or DEFAULT_HOST_PHYS_BITS
    return min(host, max_phys_bits)


def _set_bits(value: int, low: int, width: int, field: int) -> int:
    mask = ((1 << width) - 1) << low
    return (value & ~mask) | ((min(field, (1 << width) - 1) << low) & mask)


def _vendor(supported: Sequence[CpuidEntry]) -> bytes:
    for e in supported:
        if e.function == Leaf.VENDOR:
            return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx))
    return b""


def _topology_leaf(function: int, apic_id: int, topo: CpuTopology) -> list[CpuidEntry]:
    # (type, shift to the next level's id, logical processors at this level)
    levels = [(TopologyLevel.SMT, topo.thread_shift, topo.threads_per_core)]
    if function == Leaf.V2_EXT_TOPOLOGY and topo.dies_per_package > 1:
        levels.append((TopologyLevel.CORE, topo.core_shift, topo.threads_per_die))
        levels.append((TopologyLevel.DIE, topo.package_shift, topo.threads_per_package))
    else:
        # Without a die level, the core level's shift reaches the package id.
        levels.append((TopologyLevel.CORE, topo.package_shift, topo.threads_per_package))
    entries = [
        CpuidEntry(
            function, i, CpuidFlag.SIGNIFICANT_INDEX, shift, min(count, 0xFFFF), level_type << 8 | i, apic_id
        )
        for i, (level_type, shift, count) in enumerate(levels)
    ]
    n = len(levels)  # the terminating subleaf: type INVALID, level number kept
    entries.append(CpuidEntry(function, n, CpuidFlag.SIGNIFICANT_INDEX, 0, 0, n, apic_id))
    return entries


def _adjust_leaf(e: CpuidEntry, apic_id: int, topo: CpuTopology, phys_bits: int, amd: bool) -> CpuidEntry:
    if e.function == Leaf.FEATURES:
        ebx = _set_bits(e.ebx, 24, 8, apic_id & 0xFF)
        ebx = _set_bits(ebx, 16, 8, topo.threads_per_package)
        edx = e.edx | HTT_BIT if topo.threads_per_package > 1 else e.edx & ~HTT_BIT
        # x2APIC (ECX[21]) stays as KVM reports it; TSC-deadline (ECX[24]) is adjust_cpuid's to add.
        return replace(e, ebx=ebx, ecx=e.ecx | HYPERVISOR_BIT, edx=edx)
    if e.function == Leaf.CACHE_PARAMS and e.eax & 0x1F:  # cache type 0 ends the list
        level = (e.eax >> 5) & 0x7
        sharing = topo.threads_per_core if level <= 2 else topo.threads_per_package
        eax = _set_bits(e.eax, 26, 6, topo.cores_per_package - 1)
        return replace(e, eax=_set_bits(eax, 14, 12, sharing - 1))
    if e.function == Leaf.ADDRESS_SIZES:
        eax = _set_bits(_set_bits(e.eax, 0, 8, phys_bits), 16, 8, phys_bits)
        ecx = e.ecx
        if amd:  # NC (logical processors - 1) and ApicIdCoreIdSize
            ecx = _set_bits(_set_bits(ecx, 0, 8, topo.threads_per_package - 1), 12, 4, topo.package_shift)
        return replace(e, eax=eax, ecx=ecx)
    if e.function == Leaf.AMD_EXT_APIC_ID and amd:
        core_id = (apic_id >> topo.thread_shift) & 0xFF
        return replace(e, eax=apic_id, ebx=(topo.threads_per_core - 1) << 8 | core_id, ecx=0)
    return e


def adjust_cpuid(
    supported: Sequence[CpuidEntry],
    vcpu_id: int,
    num_vcpus: int,
    phys_bits: int,
    topology: CpuTopology | None = None,
    tsc_deadline: bool = False,
) -> list[CpuidEntry]:
    """The CPUID table for one vCPU, from KVM_GET_SUPPORTED_CPUID's entries.

    Leaf 1: initial APIC id, logical count, HTT and the hypervisor bit. Leaves 0xB/0x1F (when KVM lists
    them) are rebuilt for the topology with this vCPU's x2APIC id in EDX. Leaf 4: cores per package and
    cache sharing. Leaf 0x80000008: EAX[7:0] and EAX[23:16] = phys_bits. Other leaves pass through.
    `tsc_deadline` (KVM_CAP_TSC_DEADLINE_TIMER): KVM emulates the TSC-deadline timer but never lists it in
    its supported CPUID, leaving it to userspace to offer.
    """
    if num_vcpus < 1:
        raise CpuidError(f"num_vcpus={num_vcpus} must be at least 1")
    topo = topology if topology is not None else CpuTopology.single_package(num_vcpus)
    if topo.total != num_vcpus:
        raise CpuidError(f"CPU topology has {topo.total} vCPUs but num_vcpus is {num_vcpus}")
    if not 0 <= vcpu_id < num_vcpus:
        raise CpuidError(f"vcpu_id={vcpu_id} is not below num_vcpus={num_vcpus}")
    if not 1 <= phys_bits <= 64:
        raise CpuidError(f"phys_bits={phys_bits} must be between 1 and 64")

    amd = _vendor(supported) in AMD_VENDORS
    result: list[CpuidEntry] = []
    rebuilt: set[int] = set()
    for e in supported:
        if e.function in (Leaf.EXT_TOPOLOGY, Leaf.V2_EXT_TOPOLOGY):
            if e.function not in rebuilt:
                rebuilt.add(e.function)
                result.extend(_topology_leaf(e.function, vcpu_id, topo))
            continue
        adjusted = _adjust_leaf(e, vcpu_id, topo, phys_bits, amd)
        if tsc_deadline and e.function == Leaf.FEATURES:
            adjusted = replace(adjusted, ecx=adjusted.ecx | TSC_DEADLINE_BIT)
        result.append(adjusted)
    return result
