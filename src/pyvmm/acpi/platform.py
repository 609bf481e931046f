"""What the ACPI tables describe: the VM's CPUs, PCI segments and legacy devices (plain data)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pyvmm import layout

MAX_SEGMENT_ID = 0xFF  # host bridge names are PCxx with two hex digits


class AcpiPlatformError(ValueError):
    """An inconsistent platform description."""


@dataclass(frozen=True)
class AcpiPciSegment:
    """One PCI segment: its ECAM window (bus 0 only) and its inclusive 32- and 64-bit MMIO windows."""

    id: int
    ecam_base: int
    mmio32: tuple[int, int]
    mmio64: tuple[int, int]

    def __post_init__(self) -> None:
        if not 0 <= self.id <= MAX_SEGMENT_ID:
            raise AcpiPlatformError(f"PCI segment id {self.id} is outside 0..{MAX_SEGMENT_ID}")
        if self.ecam_base % layout.PCI_MMCONFIG_SIZE_PER_SEGMENT or not 0 < self.ecam_base < 1 << 32:
            raise AcpiPlatformError(f"segment {self.id}: ECAM base {self.ecam_base:#x} is not a 1 MiB "
                                    "aligned 32-bit address")
        for what, (start, end), limit in (("mmio32", self.mmio32, 1 << 32), ("mmio64", self.mmio64, 1 << 64)):
            if not 0 <= start <= end < limit:
                raise AcpiPlatformError(f"segment {self.id}: bad {what} window [{start:#x}, {end:#x}]")


@dataclass(frozen=True)
class AcpiPciHotplug:
    """Where the PCI hot-plug registers and the Generic Event Device are, and the GED's interrupt
    (docs/hotplug.md)."""

    registers: int  # PCIU, PCID, B0EJ, PSEG: layout.PCI_HOTPLUG_SIZE bytes
    ged: int  # the GED's event register: layout.GED_SIZE bytes
    ged_irq: int = layout.GED_IRQ

    def __post_init__(self) -> None:
        for what, address in (("registers", self.registers), ("GED", self.ged)):
            if not 0 < address < 1 << 64:
                raise AcpiPlatformError(f"PCI hot-plug {what} address {address:#x} is not a guest address")
        if not 0 <= self.ged_irq < layout.IOAPIC_NUM_PINS:
            raise AcpiPlatformError(f"GED IRQ {self.ged_irq} is not an IOAPIC pin")


@dataclass(frozen=True)
class AcpiPlatform:
    num_vcpus: int
    segments: Sequence[AcpiPciSegment]
    serial: bool = True
    pci_intx_irqs: tuple[int, ...] = layout.PCI_INTX_IRQS
    # With an RTC at 0x70 the FADT says it is there (as cloud-hypervisor's does) and the DSDT describes it
    # (PNP0B00, see dsdt.cmos_rtc); without, the FADT says it is absent and Linux skips the probe.
    cmos_rtc: bool = False
    apic_ids: tuple[int, ...] = field(default=())  # empty: vCPU i has APIC id i
    pci_hotplug: AcpiPciHotplug | None = None  # slots, notify and eject methods, GED (docs/hotplug.md)

    def __post_init__(self) -> None:
        if self.num_vcpus < 1:
            raise AcpiPlatformError(f"need at least one vCPU, got {self.num_vcpus}")
        if self.apic_ids and len(self.apic_ids) != self.num_vcpus:
            raise AcpiPlatformError(f"{len(self.apic_ids)} APIC ids given for {self.num_vcpus} vCPUs")
        if len(set(self.vcpu_apic_ids())) != self.num_vcpus:
            raise AcpiPlatformError("APIC ids must be unique")
        if any(not 0 <= a < 0xFFFF_FFFF for a in self.vcpu_apic_ids()):
            raise AcpiPlatformError("APIC ids must be below 0xFFFFFFFF")
        if not self.segments:
            raise AcpiPlatformError("need at least one PCI segment")
        ids = [s.id for s in self.segments]
        if len(set(ids)) != len(ids):
            raise AcpiPlatformError(f"duplicate PCI segment ids in {ids}")
        if self.pci_hotplug is not None and self.pci_hotplug.ged_irq in self.pci_intx_irqs:
            raise AcpiPlatformError(f"GED IRQ {self.pci_hotplug.ged_irq} is also a PCI INTx IRQ")
        if not self.pci_intx_irqs or any(not 0 <= i < layout.IOAPIC_NUM_PINS for i in self.pci_intx_irqs):
            raise AcpiPlatformError(f"PCI INTx IRQs {self.pci_intx_irqs} must be IOAPIC pins "
                                    f"0..{layout.IOAPIC_NUM_PINS - 1}")

    def vcpu_apic_ids(self) -> tuple[int, ...]:
        return self.apic_ids or tuple(range(self.num_vcpus))
