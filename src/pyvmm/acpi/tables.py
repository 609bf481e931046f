"""ACPI tables (ACPI 6.5 §5.2) for a HW-reduced x86 platform, laid out contiguously from the RSDP.

`build_acpi_tables(platform)` returns the bytes to write at layout.RSDP_POINTER: RSDP, DSDT, FADT, MADT,
MCFG, XSDT, in that order (each table only points at earlier ones), each 16-byte aligned.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from pyvmm import layout
from pyvmm.acpi.dsdt import dsdt_body
from pyvmm.acpi.platform import AcpiPciSegment, AcpiPlatform
from pyvmm.devices.acpi_pm import REGISTER_WIDTH_BITS, RESET_VALUE, PmRegister, register_port
from pyvmm.devices.cmos import CmosReg

OEM_ID = b"PYVMM "
OEM_REVISION = 1
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR = b"PYVMM"
HEADER_SIZE = 36
TABLE_ALIGN = 16
TABLES_END = layout.HIGH_RAM_START  # the tables must stay in the EBDA/BIOS area below 1 MiB


class AcpiTableError(ValueError):
    """The tables do not fit where they must go."""


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with that byte included) sum to zero mod 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (checksum filled in) followed by `body`."""
    table_id = b"PYVM" + signature
    header = struct.pack("<4sIBB6s8sI4sI", signature, HEADER_SIZE + len(body), revision, 0, OEM_ID,
                         table_id, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def rsdp(xsdt_address: int) -> bytes:
    """RSDP revision 2: no RSDT (all tables are reached through the XSDT)."""
    head = struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, 0)
    head = head[:8] + bytes([checksum(head)]) + head[9:]  # first checksum covers the ACPI 1.0 part
    full = bytearray(head + struct.pack("<IQB3x", 36, xsdt_address, 0))
    full[32] = checksum(full)
    return bytes(full)


def xsdt(addresses: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addresses))


class AddressSpace(IntEnum):
    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1


class AccessSize(IntEnum):
    UNDEFINED = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4


@dataclass(frozen=True)
class GenericAddress:
    """ACPI Generic Address Structure (12 bytes)."""

    space: AddressSpace
    bit_width: int
    bit_offset: int
    access_size: AccessSize
    address: int

    def to_bytes(self) -> bytes:
        return struct.pack("<BBBBQ", self.space, self.bit_width, self.bit_offset, self.access_size,
                           self.address)


NULL_GAS = bytes(12)


def pm_register_gas(register: PmRegister) -> GenericAddress:
    return GenericAddress(AddressSpace.SYSTEM_IO, REGISTER_WIDTH_BITS, 0, AccessSize.BYTE,
                          register_port(register))


class FadtFlags(IntFlag):
    PWR_BUTTON = 1 << 4  # no fixed-feature power button
    SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
    RESET_REG_SUP = 1 << 10
    HW_REDUCED_ACPI = 1 << 20


class IapcBootArch(IntFlag):
    LEGACY_DEVICES = 1 << 0
    I8042 = 1 << 1
    VGA_NOT_PRESENT = 1 << 2
    MSI_NOT_SUPPORTED = 1 << 3
    PCIE_ASPM_CONTROLS = 1 << 4
    CMOS_RTC_NOT_PRESENT = 1 << 5


FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_SIZE = 276


def fadt(dsdt_address: int, platform: AcpiPlatform) -> bytes:
    """FADT revision 6 for a HW-reduced platform: sleep and reset registers only, no fixed hardware."""
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into("<" + fmt, body, offset - HEADER_SIZE, *values)

    boot_arch = IapcBootArch.VGA_NOT_PRESENT  # no i8042 either (bit clear)
    if not platform.cmos_rtc:
        boot_arch |= IapcBootArch.CMOS_RTC_NOT_PRESENT
    else:
        # Where the century is: without it Linux assumes 19xx/20xx from the two-digit year only.
        put(108, "B", CmosReg.CENTURY)
    flags = FadtFlags.HW_REDUCED_ACPI | FadtFlags.RESET_REG_SUP | FadtFlags.PWR_BUTTON | FadtFlags.SLP_BUTTON
    put(109, "H", boot_arch)
    put(112, "I", flags)
    put(116, "12s", pm_register_gas(PmRegister.RESET).to_bytes())
    put(128, "B", RESET_VALUE)
    put(131, "B", FADT_MINOR_REVISION)
    put(140, "Q", dsdt_address)  # X_DSDT; the 32-bit DSDT field stays 0
    put(244, "12s", pm_register_gas(PmRegister.SLEEP_CONTROL).to_bytes())
    put(256, "12s", pm_register_gas(PmRegister.SLEEP_STATUS).to_bytes())
    put(268, "8s", HYPERVISOR_VENDOR.ljust(8, b"\0"))
    return sdt(b"FACP", FADT_REVISION, bytes(body))


class MadtEntry(IntEnum):
    LOCAL_APIC = 0
    IO_APIC = 1
    INTERRUPT_SOURCE_OVERRIDE = 2
    LOCAL_X2APIC = 9


class MadtFlags(IntFlag):
    PCAT_COMPAT = 1 << 0  # an 8259 pair exists (KVM's in-kernel PIC)


LOCAL_APIC_ENABLED = 1 << 0
ISA_BUS = 0
PIT_IRQ = 0
PIT_GSI = 2  # the in-kernel PIT drives IOAPIC pin 2
MPS_INTI_CONFORMS = 0  # polarity and trigger mode of the bus (ISA: edge, active high)
MADT_REVISION = 5
IOAPIC_ID = 0
XAPIC_MAX_ID = 0xFE  # 0xFF is the broadcast id: higher ids need x2APIC entries


def madt(platform: AcpiPlatform) -> bytes:
    body = struct.pack("<II", layout.APIC_START, MadtFlags.PCAT_COMPAT)
    for uid, apic_id in enumerate(platform.vcpu_apic_ids()):
        if apic_id <= XAPIC_MAX_ID and uid <= 0xFF:
            body += struct.pack("<BBBBI", MadtEntry.LOCAL_APIC, 8, uid, apic_id, LOCAL_APIC_ENABLED)
        else:
            body += struct.pack("<BBHIII", MadtEntry.LOCAL_X2APIC, 16, 0, apic_id, LOCAL_APIC_ENABLED, uid)
    body += struct.pack("<BBBBII", MadtEntry.IO_APIC, 12, IOAPIC_ID, 0, layout.IOAPIC_START, 0)
    body += struct.pack("<BBBBIH", MadtEntry.INTERRUPT_SOURCE_OVERRIDE, 10, ISA_BUS, PIT_IRQ, PIT_GSI,
                        MPS_INTI_CONFORMS)
    return sdt(b"APIC", MADT_REVISION, body)


def mcfg(segments: list[AcpiPciSegment]) -> bytes:
    body = bytes(8)  # reserved
    for seg in segments:
        body += struct.pack("<QHBB4x", seg.ecam_base, seg.id, 0, 0)  # one bus (0) per segment
    return sdt(b"MCFG", 1, body)


def dsdt(platform: AcpiPlatform) -> bytes:
    return sdt(b"DSDT", 2, dsdt_body(platform))  # revision 2: 64-bit AML integers


@dataclass(frozen=True)
class AcpiTables:
    """All tables as one blob to be written at `address`; `rsdp_address` goes to the zero page."""

    address: int
    data: bytes
    rsdp_address: int
    table_addresses: dict[str, int]


def build_acpi_tables(platform: AcpiPlatform, base: int = layout.RSDP_POINTER) -> AcpiTables:
    segments = sorted(platform.segments, key=lambda s: s.id)
    blob = bytearray()
    addresses: dict[str, int] = {}

    def place(name: str, table: bytes) -> int:
        blob.extend(bytes(-len(blob) % TABLE_ALIGN))
        addresses[name] = base + len(blob)
        blob.extend(table)
        return addresses[name]

    # The RSDP's XSDT address is only known at the end; reserve its 36 bytes now, fill them in last.
    place("RSDP", bytes(36))
    dsdt_at = place("DSDT", dsdt(platform))
    fadt_at = place("FACP", fadt(dsdt_at, platform))
    madt_at = place("APIC", madt(platform))
    mcfg_at = place("MCFG", mcfg(segments))
    xsdt_at = place("XSDT", xsdt([fadt_at, madt_at, mcfg_at]))
    blob[0:36] = rsdp(xsdt_at)
    if base + len(blob) > TABLES_END:
        raise AcpiTableError(f"ACPI tables ({len(blob)} bytes at {base:#x}) run past {TABLES_END:#x}")
    return AcpiTables(base, bytes(blob), base, addresses)
