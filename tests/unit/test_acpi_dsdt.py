"""DSDT semantics: ACPICA's acpiexec loads the built DSDT and evaluates the objects a guest OS uses."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm import layout
from pyvmm.acpi.dsdt import host_bridge_name
from pyvmm.acpi.platform import AcpiPciSegment, AcpiPlatform
from pyvmm.acpi.tables import dsdt
from pyvmm.devices.acpi_pm import SLP_TYP_S5

ACPIEXEC = shutil.which("acpiexec")
pytestmark = pytest.mark.skipif(ACPIEXEC is None, reason="acpiexec (acpica-tools) is not installed")

PCI_DSM_UUID_BYTES = "(D0 37 C9 E5 53 35 7A 4D 91 17 EA 4D 19 C3 43 4D)"
PNP0A08, PNP0A03, PNP0C02, PNP0501 = 0x080AD041, 0x030AD041, 0x020CD041, 0x0105D041
PNP0B00 = 0x000BD041

SEGMENTS = [
    AcpiPciSegment(0, layout.ecam_base(0), (0xC000_0000, 0xD3FF_FFFF), (0x1_0000_0000, 0x1FFF_FFFF_FFFF)),
    AcpiPciSegment(1, layout.ecam_base(1), (0xD400_0000, 0xE7FF_FFFF), (0x2000_0000_0000, 0x3FFF_FFEE_FFFF)),
]


def evaluate(table: bytes, exprs: list[str], tmp_path: Path) -> list[str]:
    """Evaluate each expression with acpiexec; one output block per expression."""
    path = tmp_path / "dsdt.dat"
    path.write_bytes(table)
    batch = ";".join(f"evaluate {e}" for e in exprs)
    proc = subprocess.run([ACPIEXEC, "-b", batch, str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    out = proc.stdout + proc.stderr
    assert "ACPI Error" not in out, out
    blocks = out.split("\nEvaluating ")[1:]
    assert len(blocks) == len(exprs), out
    return blocks


def integers(block: str) -> list[int]:
    assert "failed" not in block, block
    return [int(v, 16) for v in re.findall(r"\[Integer\] = ([0-9A-F]+)", block)]


def buffer(block: str) -> bytes:
    assert "[Buffer]" in block, block
    data = b""
    for line in block.splitlines():
        m = re.search(r"\b[0-9A-F]{4}: ((?:[0-9A-F]{2} )+)", line)
        if m:
            data += bytes.fromhex(m.group(1))
    return data


def resources(buf: bytes) -> list[tuple[int, bytes]]:
    """(tag, body) of each descriptor up to the end tag; large tags keep bit 7."""
    out, i = [], 0
    while True:
        b = buf[i]
        if b & 0x80:
            (length,) = struct.unpack_from("<H", buf, i + 1)
            out.append((b, buf[i + 3 : i + 3 + length]))
            i += 3 + length
        else:
            tag, length = b >> 3, b & 7
            if tag == 0x0F:
                assert i + 2 == len(buf)
                return out
            out.append((tag, buf[i + 1 : i + 1 + length]))
            i += 1 + length


def windows(crs: bytes) -> list[tuple[str, int, int]]:
    """The _CRS as (kind, first, last) in a form independent of the descriptor encoding."""
    result = []
    for tag, body in resources(crs):
        if tag in (0x88, 0x87, 0x8A):
            fmt = {0x88: "H", 0x87: "I", 0x8A: "Q"}[tag]
            rtype = body[0]
            _gran, lo, hi, tra, length = struct.unpack_from("<" + fmt * 5, body, 3)
            assert length == hi - lo + 1 and tra == 0
            result.append((["mem", "io", "bus"][rtype], lo, hi))
        elif tag == 0x86:
            _, base, length = struct.unpack("<BII", body)
            result.append(("mem", base, base + length - 1))
        elif tag == 0x08:
            _, lo, hi, _, length = struct.unpack("<BHHBB", body)
            assert lo == hi
            result.append(("io", lo, lo + length - 1))
        elif tag == 0x04:
            (mask,) = struct.unpack("<H", body[:2])
            result.extend(("irq", i, i) for i in range(16) if mask >> i & 1)
        else:
            raise AssertionError(f"unexpected descriptor {tag:#x}")
    return result


DSM = "\\_SB.PC01._DSM"
DSM_CALLS = [
    f"{DSM} {PCI_DSM_UUID_BYTES} 1 0 [0]",
    f"{DSM} {PCI_DSM_UUID_BYTES} 1 5 [0]",
    f"{DSM} {PCI_DSM_UUID_BYTES} 1 7 [0]",
    f"{DSM} (00 11 22 33 44 55 66 77 88 99 AA BB CC DD EE FF) 1 5 [0]",
]
IDENTITY = ("_HID", "_CID", "_ADR", "_SEG", "_UID", "_CCA")
DEFAULT_EXPRS = [
    *(f"\\_SB.PC0{seg}.{n}" for seg in (0, 1) for n in IDENTITY),
    *DSM_CALLS,
    *(f"\\_SB.PC0{seg}.{n}" for seg in (0, 1) for n in ("_PRT", "_CRS")),
    *(f"\\_SB.{dev}.{n}" for dev in ("MBRD", "COM1") for n in ("_HID", "_UID", "_CRS")),
    "\\_S5_",
]


@pytest.fixture(scope="module")
def ev(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The default platform's DSDT, every object of interest evaluated in one acpiexec run."""
    table = dsdt(AcpiPlatform(num_vcpus=2, segments=SEGMENTS))
    return dict(zip(DEFAULT_EXPRS, evaluate(table, DEFAULT_EXPRS, tmp_path_factory.mktemp("dsdt")),
                    strict=True))


@pytest.mark.parametrize("seg", [0, 1])
def test_host_bridge_identity(ev: dict[str, str], seg: int) -> None:
    dev = f"\\_SB.{host_bridge_name(seg)}"
    assert [integers(ev[f"{dev}.{n}"])[0] for n in IDENTITY] == [PNP0A08, PNP0A03, 0, seg, seg, 1]


def test_pci_dsm(ev: dict[str, str]) -> None:
    query, preserve, other, wrong_uuid = (ev[c] for c in DSM_CALLS)
    assert buffer(query) == b"\x21"  # functions 0 and 5
    assert integers(preserve) == [0]  # keep the VMM's BAR assignment
    assert buffer(other) == b"\x00"
    assert buffer(wrong_uuid) == b"\x00"


@pytest.mark.parametrize("seg", [0, 1])
def test_prt(ev: dict[str, str], seg: int) -> None:
    block = ev[f"\\_SB.PC0{seg}._PRT"]
    assert "Contains 32 Elements" in block
    values = integers(block)
    entries = [tuple(values[i : i + 4]) for i in range(0, len(values), 4)]
    assert entries == [((s << 16) | 0xFFFF, 0, 0, layout.PCI_INTX_IRQS[s % 8]) for s in range(32)]


def test_host_bridge_crs(ev: dict[str, str]) -> None:
    assert windows(buffer(ev["\\_SB.PC00._CRS"])) == [
        ("bus", 0, 0),
        ("io", 0xCF8, 0xCFF),
        ("mem", 0xE800_0000, 0xE80F_FFFF),
        ("mem", 0xC000_0000, 0xD3FF_FFFF),
        ("mem", 0x1_0000_0000, 0x1FFF_FFFF_FFFF),
        ("io", 0, 0xCF7),
        ("io", 0xD00, 0xFFFF),
    ]
    assert windows(buffer(ev["\\_SB.PC01._CRS"])) == [
        ("bus", 0, 0),
        ("mem", 0xE810_0000, 0xE81F_FFFF),
        ("mem", 0xD400_0000, 0xE7FF_FFFF),
        ("mem", 0x2000_0000_0000, 0x3FFF_FFEE_FFFF),
    ]


def test_host_bridge_windows_are_producers(ev: dict[str, str]) -> None:
    for tag, body in resources(buffer(ev["\\_SB.PC00._CRS"])):
        if tag in (0x88, 0x8A):
            assert body[1] & 1 == 0  # ResourceProducer
            assert body[1] & 0x0C == 0x0C  # fixed minimum and maximum


def test_motherboard_reserves_ecam_and_pm_ports(ev: dict[str, str]) -> None:
    assert integers(ev["\\_SB.MBRD._HID"]) == [PNP0C02]
    assert integers(ev["\\_SB.MBRD._UID"]) == [0]
    assert windows(buffer(ev["\\_SB.MBRD._CRS"])) == [
        ("mem", 0xE800_0000, 0xE80F_FFFF),
        ("mem", 0xE810_0000, 0xE81F_FFFF),
        ("io", layout.ACPI_PM_PORT, layout.ACPI_PM_PORT + layout.ACPI_PM_SIZE - 1),
    ]


def test_com1(ev: dict[str, str]) -> None:
    assert integers(ev["\\_SB.COM1._HID"]) == [PNP0501]
    assert integers(ev["\\_SB.COM1._UID"]) == [0]
    assert windows(buffer(ev["\\_SB.COM1._CRS"])) == [("io", 0x3F8, 0x3FF), ("irq", 4, 4)]


def test_s5_matches_pm_device(ev: dict[str, str]) -> None:
    assert integers(ev["\\_S5_"])[0] == SLP_TYP_S5


def test_no_com1_without_serial(tmp_path: Path) -> None:
    table = dsdt(AcpiPlatform(num_vcpus=1, segments=SEGMENTS[:1], serial=False))
    (block,) = evaluate(table, ["\\_SB.COM1._HID"], tmp_path)
    assert "AE_NOT_FOUND" in block


def test_cmos_rtc(tmp_path: Path) -> None:
    """A PNP0B00 device with the two ports and no interrupt (Linux then binds rtc_cmos without alarms)."""
    table = dsdt(AcpiPlatform(num_vcpus=1, segments=SEGMENTS[:1], cmos_rtc=True))
    hid, uid, crs = evaluate(table, [f"\\_SB.RTC_.{n}" for n in ("_HID", "_UID", "_CRS")], tmp_path)
    assert integers(hid) == [PNP0B00]
    assert integers(uid) == [0]
    assert windows(buffer(crs)) == [("io", layout.CMOS_PORT, layout.CMOS_PORT + 1)]


def test_no_rtc_without_cmos_rtc(tmp_path: Path) -> None:
    (block,) = evaluate(dsdt(AcpiPlatform(num_vcpus=1, segments=SEGMENTS[:1])), ["\\_SB.RTC_._HID"], tmp_path)
    assert "AE_NOT_FOUND" in block


def test_custom_intx_irqs(tmp_path: Path) -> None:
    table = dsdt(AcpiPlatform(num_vcpus=1, segments=SEGMENTS[:1], pci_intx_irqs=(10, 11)))
    (block,) = evaluate(table, ["\\_SB.PC00._PRT"], tmp_path)
    assert integers(block)[3::4] == [(10, 11)[s % 2] for s in range(32)]


def test_96_segments(tmp_path: Path) -> None:
    mb = 0x10_0000
    segs = [AcpiPciSegment(i, layout.ecam_base(i), (0xC000_0000 + i * mb, 0xC000_0000 + (i + 1) * mb - 1),
                           ((i + 1) << 36, ((i + 2) << 36) - 1)) for i in range(96)]
    table = dsdt(AcpiPlatform(num_vcpus=1, segments=segs))
    seg, uid, crs = evaluate(table, ["\\_SB.PC5F._SEG", "\\_SB.PC5F._UID", "\\_SB.MBRD._CRS"], tmp_path)
    assert integers(seg) == [95]
    assert integers(uid) == [95]
    assert [w for w in windows(buffer(crs)) if w[0] == "mem"] == [
        ("mem", layout.ecam_base(i), layout.ecam_base(i) + 0xFFFFF) for i in range(96)
    ]
