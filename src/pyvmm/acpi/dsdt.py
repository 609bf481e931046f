"""DSDT content: one PCI host bridge per segment, ECAM reservation, COM1, the CMOS RTC and the S5 state.

Follows cloud-hypervisor's description of segments (docs/pci.md#acpi-description) minus PCI hotplug.
"""

from __future__ import annotations

from pyvmm import layout
from pyvmm.acpi.aml import (
    Arg,
    Buffer,
    Device,
    If,
    LEqual,
    Method,
    Name,
    Package,
    Return,
    Scope,
    Term,
    eisa_id,
    encode_all,
    to_uuid,
)
from pyvmm.acpi.platform import AcpiPciSegment, AcpiPlatform
from pyvmm.acpi.resources import (
    IO,
    Cacheability,
    IRQNoFlags,
    Memory32Fixed,
    QWordMemory,
    ResourceDescriptor,
    ResourceTemplate,
    WordBusNumber,
    WordIO,
)
from pyvmm.devices.acpi_pm import SLP_TYP_S5

PCI_FIRMWARE_DSM_UUID = "E5C937D0-3553-4D7A-9117-EA4D19C3434D"
DSM_FN_QUERY = 0
DSM_FN_PRESERVE_BOOT_CONFIG = 5  # "ignore PCI boot configuration": answering 0 keeps our BAR layout
DSM_SUPPORTED = (1 << DSM_FN_QUERY) | (1 << DSM_FN_PRESERVE_BOOT_CONFIG)
SLOTS_PER_BUS = 32
ALL_FUNCTIONS = 0xFFFF  # _PRT address: any function of the slot
PCI_IO_HIGH_START = 0x0D00  # I/O window above the 0xCF8 ports, as on PC chipsets


def host_bridge_name(segment_id: int) -> str:
    return f"PC{segment_id:02X}"


def _pci_dsm() -> Method:
    return Method("_DSM", 4, [
        If(LEqual(Arg(0), to_uuid(PCI_FIRMWARE_DSM_UUID)), [
            If(LEqual(Arg(2), DSM_FN_QUERY), [Return(Buffer(bytes([DSM_SUPPORTED])))]),
            If(LEqual(Arg(2), DSM_FN_PRESERVE_BOOT_CONFIG), [Return(0)]),
        ]),
        Return(Buffer(b"\x00")),
    ])


def _host_bridge_resources(seg: AcpiPciSegment) -> ResourceTemplate:
    descriptors: list[ResourceDescriptor] = [WordBusNumber(0, 0, producer=True)]
    if seg.id == 0:
        # Only segment 0 answers the legacy 0xCF8 mechanism (and owns the legacy I/O space).
        descriptors.append(IO(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_PORT, 1,
                              layout.PCI_CONFIG_IO_SIZE))
    descriptors.append(Memory32Fixed(seg.ecam_base, layout.PCI_MMCONFIG_SIZE_PER_SEGMENT))
    for start, end in (seg.mmio32, seg.mmio64):
        descriptors.append(QWordMemory(start, end, producer=True, cacheability=Cacheability.NON_CACHEABLE))
    if seg.id == 0:
        descriptors.append(WordIO(0, layout.PCI_CONFIG_IO_PORT - 1, producer=True))
        descriptors.append(WordIO(PCI_IO_HIGH_START, 0xFFFF, producer=True))
    return ResourceTemplate(descriptors)


def _routing_table(irqs: tuple[int, ...]) -> Package:
    # INTA only: every guest device is function 0 of its own slot.
    return Package([Package([(slot << 16) | ALL_FUNCTIONS, 0, 0, irqs[slot % len(irqs)]])
                    for slot in range(SLOTS_PER_BUS)])


def pci_host_bridge(seg: AcpiPciSegment, irqs: tuple[int, ...]) -> Device:
    return Device(host_bridge_name(seg.id), [
        Name("_HID", eisa_id("PNP0A08")),
        Name("_CID", eisa_id("PNP0A03")),
        Name("_ADR", 0),
        Name("_SEG", seg.id),
        Name("_UID", seg.id),
        Name("_CCA", 1),
        _pci_dsm(),
        Name("_CRS", _host_bridge_resources(seg)),
        Name("_PRT", _routing_table(irqs)),
    ])


def motherboard_resources(platform: AcpiPlatform) -> Device:
    """PNP0C02 reserving every ECAM window (Linux trusts MCFG areas only when reserved) and the PM ports."""
    descriptors: list[ResourceDescriptor] = [
        Memory32Fixed(seg.ecam_base, layout.PCI_MMCONFIG_SIZE_PER_SEGMENT) for seg in platform.segments
    ]
    descriptors.append(IO(layout.ACPI_PM_PORT, layout.ACPI_PM_PORT, 1, layout.ACPI_PM_SIZE))
    return Device("MBRD", [
        Name("_HID", eisa_id("PNP0C02")),
        Name("_UID", 0),
        Name("_CRS", ResourceTemplate(descriptors)),
    ])


def com1() -> Device:
    return Device("COM1", [
        Name("_HID", eisa_id("PNP0501")),
        Name("_UID", 0),
        Name("_CRS", ResourceTemplate([
            IO(layout.SERIAL_COM1_PORT, layout.SERIAL_COM1_PORT, 0, 8),
            IRQNoFlags([layout.SERIAL_COM1_IRQ]),
        ])),
    ])


def cmos_rtc() -> Device:
    """The CMOS clock as an ACPI PNP device, with its ports and no interrupt.

    Without it Linux registers a fallback platform device with the ISA clock's IRQ 8, and on a HW-reduced
    platform (no legacy PIC: no IRQ numbers are preallocated) that IRQ does not exist, so rtc_cmos fails
    its probe with -EINVAL. Described here without an IRQ, Linux binds rtc_cmos without alarm support,
    which is what the device offers: it raises no interrupt, and IOAPIC pin 8 stays free for PCI INTx.
    """
    return Device("RTC_", [
        Name("_HID", eisa_id("PNP0B00")),
        Name("_UID", 0),
        Name("_CRS", ResourceTemplate([IO(layout.CMOS_PORT, layout.CMOS_PORT, 1, layout.CMOS_SIZE)])),
    ])


def sleep_state_s5() -> Name:
    # SLP_TYPa, SLP_TYPb, two reserved; a HW-reduced platform only uses SLP_TYPa.
    return Name("\\_S5_", Package([SLP_TYP_S5, 0, 0, 0]))


def dsdt_body(platform: AcpiPlatform) -> bytes:
    """The DSDT's AML (everything after the 36-byte table header)."""
    devices: list[Term] = [pci_host_bridge(seg, platform.pci_intx_irqs)
                           for seg in sorted(platform.segments, key=lambda s: s.id)]
    devices.append(motherboard_resources(platform))
    if platform.serial:
        devices.append(com1())
    if platform.cmos_rtc:
        devices.append(cmos_rtc())
    return encode_all([Scope("\\_SB_", devices), sleep_state_s5()])
