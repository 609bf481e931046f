"""DSDT content: one PCI host bridge per segment, ECAM reservation, COM1, the CMOS RTC, the S5 state and,
with `AcpiPlatform.pci_hotplug`, the objects of ACPI PCI hot-plug (slots, notify and eject methods, the
hot-plug registers and the Generic Event Device).

Follows cloud-hypervisor's description of segments (docs/pci.md#acpi-description) and of hot-plug
(docs/hotplug.md#acpi-objects).
"""

from __future__ import annotations

from pyvmm import layout
from pyvmm.acpi.aml import (
    Acquire,
    And,
    Arg,
    Buffer,
    Device,
    Field,
    FieldAccess,
    FieldUpdate,
    If,
    LEqual,
    Local,
    Method,
    MethodCall,
    Mutex,
    Name,
    NamedField,
    NamePath,
    Notify,
    OperationRegion,
    Package,
    RegionSpace,
    Release,
    Return,
    Scope,
    ShiftLeft,
    Store,
    Term,
    eisa_id,
    encode_all,
    to_uuid,
)
from pyvmm.acpi.platform import AcpiPciHotplug, AcpiPciSegment, AcpiPlatform
from pyvmm.acpi.resources import (
    IO,
    Cacheability,
    Interrupt,
    IRQNoFlags,
    Memory32Fixed,
    QWordMemory,
    ResourceDescriptor,
    ResourceTemplate,
    WordBusNumber,
    WordIO,
)
from pyvmm.devices.acpi_hotplug import AcpiNotification
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


# ---- PCI hot-plug (docs/hotplug.md#acpi-objects) ------------------------------------------------------

PHPR = "\\_SB_.PHPR"  # the hot-plug registers' device
NOTIFY_DEVICE_CHECK = 1  # ACPI notify values acpiphp acts on: a slot may have a new device ...
NOTIFY_EJECT_REQUEST = 3  # ... or is asked to eject its device
MUTEX_FOREVER = 0xFFFF


def slot_name(slot: int) -> str:
    return f"S{slot:03d}"


def _hotplug_slot(slot: int) -> Device:
    """One slot of a host bridge: its number, its address on bus 0, and an eject method (no _STA: the OS
    reads the vendor ID to see whether something is there)."""
    return Device(slot_name(slot), [
        Name("_SUN", slot),
        Name("_ADR", slot << 16),
        Method("_EJ0", 1, [MethodCall(f"{PHPR}.PCEJ", [NamePath("_SUN"), NamePath("_SEG")])],
               serialized=True),
    ])


def _hotplug_notify_methods() -> list[Term]:
    """DVNT(bitmap, code) notifies each slot whose bit is set; PCNT selects this segment and notifies the
    slots added (device check) and those to eject (eject request)."""
    dvnt: list[Term] = []
    for slot in range(SLOTS_PER_BUS):
        bit = 1 << slot
        dvnt += [And(Arg(0), bit, Local(0)),
                 If(LEqual(Local(0), bit), [Notify(NamePath(slot_name(slot)), Arg(1))])]
    return [
        Method("DVNT", 2, dvnt, serialized=True),
        Method("PCNT", 0, [
            Acquire(f"{PHPR}.BLCK", MUTEX_FOREVER),
            Store(NamePath("_SEG"), NamePath(f"{PHPR}.PSEG")),
            MethodCall("DVNT", [NamePath(f"{PHPR}.PCIU"), NOTIFY_DEVICE_CHECK]),
            MethodCall("DVNT", [NamePath(f"{PHPR}.PCID"), NOTIFY_EJECT_REQUEST]),
            Release(f"{PHPR}.BLCK"),
        ], serialized=True),
    ]


def hotplug_controller(hotplug: AcpiPciHotplug, segment_ids: list[int]) -> Device:
    """\\_SB_.PHPR: the PCIU/PCID/B0EJ/PSEG registers, PCEJ(slot, segment) that ejects, and PSCN that runs
    every segment's PCNT."""
    base = hotplug.registers
    return Device("PHPR", [
        Name("_HID", eisa_id("PNP0A06")),
        Name("_STA", 0x0B),
        Name("_UID", "PCI Hotplug Controller"),
        Mutex("BLCK", 0),
        Name("_CRS", ResourceTemplate([
            QWordMemory(base, base + layout.PCI_HOTPLUG_SIZE - 1, cacheability=Cacheability.NON_CACHEABLE),
        ])),
        OperationRegion("PCST", RegionSpace.SYSTEM_MEMORY, base, layout.PCI_HOTPLUG_SIZE),
        Field("PCST", [NamedField(n, 32) for n in ("PCIU", "PCID", "B0EJ", "PSEG")],
              access=FieldAccess.DWORD, update=FieldUpdate.WRITE_AS_ZEROS),
        Method("PCEJ", 2, [
            Acquire("BLCK", MUTEX_FOREVER),
            Store(Arg(1), NamePath("PSEG")),
            ShiftLeft(1, Arg(0), NamePath("B0EJ")),
            Release("BLCK"),
            Return(0),
        ], serialized=True),
        Method("PSCN", 0, [MethodCall(f"\\_SB_.{host_bridge_name(s)}.PCNT") for s in segment_ids],
               serialized=True),
    ])


def generic_event_devices(hotplug: AcpiPciHotplug) -> list[Device]:
    """GEC_ holds the event register and ESCN (read it, act on each event); GED_ (ACPI0013) calls ESCN on its
    interrupt; PWRB is the power button (PNP0C0C) it notifies. Only the PCI and power-button branches exist:
    pyvmm hot-plugs neither CPUs nor memory."""
    pci = int(AcpiNotification.PCI_DEVICES_CHANGED)
    button = int(AcpiNotification.POWER_BUTTON_CHANGED)
    return [
        Device("GEC_", [
            Name("_HID", eisa_id("PNP0A06")),
            Name("_UID", "Generic Event Controller"),
            Name("_CRS", ResourceTemplate([
                QWordMemory(hotplug.ged, hotplug.ged + layout.GED_SIZE - 1,
                            cacheability=Cacheability.NON_CACHEABLE),
            ])),
            OperationRegion("GDST", RegionSpace.SYSTEM_MEMORY, hotplug.ged, layout.GED_SIZE),
            Field("GDST", [NamedField("GDAT", 8)], access=FieldAccess.BYTE,
                  update=FieldUpdate.WRITE_AS_ZEROS),
            Method("ESCN", 0, [
                Store(NamePath("GDAT"), Local(0)),
                If(LEqual(And(Local(0), pci), pci), [MethodCall(f"{PHPR}.PSCN")]),
                # 0x80: the button was pressed (ACPI 6.5, 4.8.2.2.1.1); the guest's button driver acts on it
                If(LEqual(And(Local(0), button), button), [Notify(NamePath("\\_SB_.PWRB"), 0x80)]),
            ], serialized=True),
        ]),
        Device("GED_", [
            Name("_HID", "ACPI0013"),
            Name("_UID", 0),
            Name("_CRS", ResourceTemplate([Interrupt([hotplug.ged_irq], edge=True)])),
            Method("_EVT", 1, [MethodCall("\\_SB_.GEC_.ESCN")], serialized=True),
        ]),
        Device("PWRB", [Name("_HID", eisa_id("PNP0C0C")), Name("_UID", 0)]),
    ]


def pci_host_bridge(seg: AcpiPciSegment, irqs: tuple[int, ...], hotplug: bool = False) -> Device:
    slots: list[Term] = []
    if hotplug:
        slots += [_hotplug_slot(s) for s in range(SLOTS_PER_BUS)]
        slots += _hotplug_notify_methods()
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
        *slots,
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
    segments = sorted(platform.segments, key=lambda s: s.id)
    hotplug = platform.pci_hotplug
    devices: list[Term] = []
    if hotplug is not None:  # before the host bridges, whose methods use its registers and mutex
        devices.append(hotplug_controller(hotplug, [seg.id for seg in segments]))
    devices += [pci_host_bridge(seg, platform.pci_intx_irqs, hotplug is not None) for seg in segments]
    if hotplug is not None:
        devices += generic_event_devices(hotplug)
    devices.append(motherboard_resources(platform))
    if platform.serial:
        devices.append(com1())
    if platform.cmos_rtc:
        devices.append(cmos_rtc())
    return encode_all([Scope("\\_SB_", devices), sleep_state_s5()])
