"""ACPI table builder: structure parsed independently, iasl's disassembler as a second opinion."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm import layout
from pyvmm.acpi.platform import AcpiPciSegment, AcpiPlatform, AcpiPlatformError
from pyvmm.acpi.tables import AcpiTableError, AcpiTables, build_acpi_tables
from pyvmm.devices.acpi_pm import RESET_VALUE, SLP_TYP_S5, AcpiPmDevice, PmRegister, SleepControl

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")


def segment(i: int, n: int = 1) -> AcpiPciSegment:
    size32 = 0x2800_0000 // n
    return AcpiPciSegment(
        id=i,
        ecam_base=layout.ecam_base(i),
        mmio32=(0xC000_0000 + i * size32, 0xC000_0000 + (i + 1) * size32 - 1),
        mmio64=((i + 1) << 40, ((i + 2) << 40) - 1),
    )


def platform(vcpus: int = 2, nseg: int = 2, **kw: object) -> AcpiPlatform:
    return AcpiPlatform(num_vcpus=vcpus, segments=[segment(i, nseg) for i in range(nseg)], **kw)  # type: ignore[arg-type]


def table_at(t: AcpiTables, address: int) -> bytes:
    off = address - t.address
    length = struct.unpack_from("<I", t.data, off + 4)[0]
    return t.data[off : off + length]


def find(t: AcpiTables, signature: bytes) -> bytes:
    """Walk RSDP -> XSDT (-> FADT -> DSDT) like an OS would, and return the table with `signature`."""
    rsdp = t.data[t.rsdp_address - t.address :][:36]
    xsdt = table_at(t, struct.unpack_from("<Q", rsdp, 24)[0])
    if signature == b"XSDT":
        return xsdt
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = table_at(t, addr)
        if table[:4] == signature:
            return table
        if table[:4] == b"FACP" and signature == b"DSDT":
            return table_at(t, struct.unpack_from("<Q", table, 140)[0])
    raise AssertionError(f"{signature!r} not reachable from the RSDP")


def parse_gas(data: bytes, offset: int) -> tuple[int, int, int, int, int]:
    return struct.unpack_from("<BBBBQ", data, offset)


@pytest.fixture(scope="module")
def tables() -> AcpiTables:
    return build_acpi_tables(platform())


def test_rsdp(tables: AcpiTables) -> None:
    assert tables.address == layout.RSDP_POINTER
    assert tables.rsdp_address == layout.RSDP_POINTER
    rsdp = tables.data[:36]
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0
    assert sum(rsdp) % 256 == 0
    assert rsdp[9:15] == b"PYVMM "
    assert rsdp[15] == 2  # revision
    assert struct.unpack_from("<II", rsdp, 16) == (0, 36)  # no RSDT, length
    xsdt = table_at(tables, struct.unpack_from("<Q", rsdp, 24)[0])
    assert xsdt[:4] == b"XSDT"


def test_every_table_header(tables: AcpiTables) -> None:
    for sig in (b"XSDT", b"FACP", b"APIC", b"MCFG", b"DSDT"):
        table = find(tables, sig)
        assert sum(table) % 256 == 0, sig
        assert table[10:16] == b"PYVMM ", sig
        assert struct.unpack_from("<I", table, 4)[0] == len(table)
    assert len(find(tables, b"XSDT")) == 36 + 3 * 8


def test_blob_layout(tables: AcpiTables) -> None:
    # Contiguous from the RSDP, each table inside the blob and 16-byte aligned, no overlaps.
    spans = []
    for name, addr in tables.table_addresses.items():
        assert addr % 16 == 0
        length = 36 if name == "RSDP" else len(table_at(tables, addr))
        spans.append((addr, addr + length))
    spans.sort()
    assert spans[0][0] == tables.address
    assert spans[-1][1] == tables.address + len(tables.data)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start < end + 16


def test_fadt(tables: AcpiTables) -> None:
    fadt = find(tables, b"FACP")
    assert len(fadt) == 276
    assert fadt[8] == 6  # revision
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20)  # HW_REDUCED_ACPI
    assert flags & (1 << 10)  # RESET_REG_SUP
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & (1 << 5)  # no CMOS RTC by default
    assert not boot_arch & (1 << 1)  # no i8042
    assert struct.unpack_from("<II", fadt, 36) == (0, 0)  # no FACS, no 32-bit DSDT
    assert fadt[268:276] == b"PYVMM\0\0\0"
    for offset in (244, 256, 116):
        space, width, bit_offset, access, address = parse_gas(fadt, offset)
        assert (space, width, bit_offset, access) == (1, 8, 0, 1)  # byte-wide system I/O
        assert layout.ACPI_PM_PORT <= address < layout.ACPI_PM_PORT + layout.ACPI_PM_SIZE
    assert parse_gas(fadt, 244)[4] != parse_gas(fadt, 116)[4]
    assert fadt[128] == RESET_VALUE


def test_fadt_with_rtc() -> None:
    fadt = find(build_acpi_tables(platform(cmos_rtc=True)), b"FACP")
    assert not struct.unpack_from("<H", fadt, 109)[0] & (1 << 5)
    assert fadt[108] == 0x32  # CENTURY: the CMOS byte with the century, as Linux's mc146818 code reads it
    assert find(build_acpi_tables(platform()), b"FACP")[108] == 0  # no RTC, no century byte


def test_fadt_registers_drive_the_pm_device(tables: AcpiTables) -> None:
    """What a guest reads in the FADT, written to the PM device, powers off and resets."""
    fadt = find(tables, b"FACP")
    events: list[str] = []
    dev = AcpiPmDevice(lambda: events.append("off"), lambda: events.append("reset"))
    sleep_ctl = parse_gas(fadt, 244)[4] - layout.ACPI_PM_PORT
    dev.write(sleep_ctl, 1, (SLP_TYP_S5 << 2) | SleepControl.SLP_EN)
    assert events == ["off"]
    dev.write(parse_gas(fadt, 116)[4] - layout.ACPI_PM_PORT, 1, fadt[128])
    assert events == ["off", "reset"]
    assert parse_gas(fadt, 116)[4] == layout.ACPI_PM_PORT + PmRegister.RESET


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, off = [], 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        assert length >= 2
        entries.append((kind, madt[off : off + length]))
        off += length
    assert off == len(madt)
    return entries


def test_madt(tables: AcpiTables) -> None:
    madt = find(tables, b"APIC")
    assert struct.unpack_from("<II", madt, 36) == (layout.APIC_START, 1)  # PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic, flags) for _, _, uid, apic, flags in lapics] == [(0, 0, 1), (1, 1, 1)]
    ioapics = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapics == [(1, 12, 0, 0, layout.IOAPIC_START, 0)]
    overrides = [struct.unpack("<BBBBIH", e) for k, e in entries if k == 2]
    assert overrides == [(2, 10, 0, 0, 2, 0)]


def test_madt_x2apic_for_large_ids() -> None:
    madt = find(build_acpi_tables(platform(vcpus=300)), b"APIC")
    entries = madt_entries(madt)
    xapic = [struct.unpack("<BBBBI", e)[3] for k, e in entries if k == 0]
    x2apic = [struct.unpack("<BBHIII", e) for k, e in entries if k == 9]
    assert xapic == list(range(255))
    assert [(apic, uid) for _, _, _, apic, _, uid in x2apic] == [(i, i) for i in range(255, 300)]


def test_madt_explicit_apic_ids() -> None:
    madt = find(build_acpi_tables(platform(vcpus=2, apic_ids=(0, 2))), b"APIC")
    assert [struct.unpack("<BBBBI", e)[3] for k, e in madt_entries(madt) if k == 0] == [0, 2]


def test_mcfg() -> None:
    t = build_acpi_tables(platform(nseg=3))
    mcfg = find(t, b"MCFG")
    assert len(mcfg) == 44 + 3 * 16
    entries = [struct.unpack_from("<QHBBI", mcfg, 44 + 16 * i) for i in range(3)]
    assert entries == [(layout.ecam_base(i), i, 0, 0, 0) for i in range(3)]


def test_many_segments_fit_below_1mib() -> None:
    t = build_acpi_tables(platform(vcpus=8, nseg=96))
    assert t.address + len(t.data) <= layout.HIGH_RAM_START
    assert len(find(t, b"MCFG")) == 44 + 96 * 16


def test_tables_must_fit() -> None:
    with pytest.raises(AcpiTableError, match="run past"):
        build_acpi_tables(platform(), base=layout.HIGH_RAM_START - 256)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_vcpus": 0, "segments": [segment(0)]}, "vCPU"),
        ({"num_vcpus": 1, "segments": []}, "segment"),
        ({"num_vcpus": 1, "segments": [segment(0), segment(0)]}, "duplicate"),
        ({"num_vcpus": 2, "segments": [segment(0)], "apic_ids": (1, 1)}, "unique"),
        ({"num_vcpus": 2, "segments": [segment(0)], "apic_ids": (1,)}, "APIC ids given"),
        ({"num_vcpus": 1, "segments": [segment(0)], "pci_intx_irqs": ()}, "INTx"),
        ({"num_vcpus": 1, "segments": [segment(0)], "pci_intx_irqs": (24,)}, "INTx"),
    ],
)
def test_platform_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(AcpiPlatformError, match=message):
        AcpiPlatform(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"id": 256}, "segment id"),
        ({"ecam_base": layout.ecam_base(0) + 4096}, "ECAM"),
        ({"mmio32": (0xD000_0000, 0xC000_0000)}, "mmio32"),
        ({"mmio32": (0xC000_0000, 0x1_0000_0000)}, "mmio32"),
        ({"mmio64": (1 << 40, 1 << 64)}, "mmio64"),
    ],
)
def test_segment_validation(kwargs: dict, message: str) -> None:
    args = {"id": 0, "ecam_base": layout.ecam_base(0), "mmio32": (0xC000_0000, 0xE7FF_FFFF),
            "mmio64": (1 << 32, (1 << 46) - 1)}
    args.update(kwargs)
    with pytest.raises(AcpiPlatformError, match=message):
        AcpiPciSegment(**args)


@needs_iasl
@pytest.mark.parametrize(
    ("signature", "expect"),
    [
        (b"FACP", ["Hardware Reduced (V5) : 1", "Reset Register Supported (V2) : 1",
                   "Value to cause reset : 01"]),
        (b"APIC", ["PC-AT Compatibility : 1", "[I/O APIC]", "[Interrupt Source Override]"]),
        (b"MCFG", ["Base Address : 00000000E8000000", "Base Address : 00000000E8100000"]),
        (b"XSDT", ["ACPI Table Address 0 :", "ACPI Table Address 2 :"]),
        (b"DSDT", ["Device (PC00)", "Device (PC01)", "Device (MBRD)", "Device (COM1)",
                   "Name (\\_S5, Package (0x04)"]),
    ],
)
def test_iasl_disassembles_cleanly(tables: AcpiTables, signature: bytes, expect: list[str],
                                   tmp_path: Path) -> None:
    path = tmp_path / "table.dat"
    path.write_bytes(find(tables, signature))
    proc = subprocess.run([IASL, "-d", str(path)], capture_output=True, text=True, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Warning" not in output and "Error" not in output, output
    dsl = " ".join((tmp_path / "table.dsl").read_text().split())
    for text in expect:
        assert " ".join(text.split()) in dsl, text


@needs_iasl
@pytest.mark.parametrize("serial", [True, False])
def test_dsdt_round_trips_through_iasl(serial: bool, tmp_path: Path) -> None:
    """Disassembling our DSDT and compiling the ASL again with iasl gives back exactly our AML."""
    table = find(build_acpi_tables(platform(nseg=3, serial=serial)), b"DSDT")
    (tmp_path / "dsdt.dat").write_bytes(table)
    for args in (["-d", "dsdt.dat"], ["-on", "-p", "again", "dsdt.dsl"]):
        proc = subprocess.run([IASL, *args], cwd=tmp_path, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "again.aml").read_bytes()[36:].hex() == table[36:].hex()
