"""AML encoder tests: hand-checked encodings, properties, and iasl (acpica-tools) as the oracle."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.acpi import aml
from pyvmm.acpi.aml import (
    Add,
    AmlError,
    Arg,
    Buffer,
    Device,
    Field,
    FieldAccess,
    FieldUpdate,
    If,
    Integer,
    LAnd,
    LEqual,
    LGreater,
    LGreaterEqual,
    LLess,
    LLessEqual,
    LNot,
    LNotEqual,
    Local,
    LOr,
    Method,
    MethodCall,
    Name,
    NamedField,
    NamePath,
    Notify,
    OperationRegion,
    Package,
    RegionSpace,
    ReservedField,
    Return,
    Scope,
    ShiftLeft,
    Store,
    String,
    Subtract,
    eisa_id,
    encode,
    name_string,
    pkg_length,
    to_uuid,
)
from pyvmm.acpi.resources import (
    IO,
    Cacheability,
    DWordMemory,
    Interrupt,
    IRQNoFlags,
    IsaRanges,
    Memory32Fixed,
    QWordMemory,
    ResourceTemplate,
    WordBusNumber,
    WordIO,
)

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
HEADER = 36


def iasl_body(asl: str, tmp_path: Path) -> bytes:
    """Compile `asl` as the body of an SSDT with iasl and return the AML after the table header."""
    src = tmp_path / "t.asl"
    src.write_text(f'DefinitionBlock ("", "SSDT", 2, "PYVMM", "TEST", 1)\n{{\n{asl}\n}}\n')
    # -on: keep name references as written (no path shortening), so both sides spell names alike.
    proc = subprocess.run([IASL, "-on", "-p", str(tmp_path / "out"), str(src)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (tmp_path / "out.aml").read_bytes()[HEADER:]


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(encoded value, bytes used) of a PkgLength."""
    lead = data[0]
    n = lead >> 6
    if n == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(n):
        value |= data[1 + i] << (4 + 8 * i)
    return value, n + 1


# --- hand-checked encodings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xFFFF_FFFF, b"\x0c\xff\xff\xff\xff"),
        (0x1_0000_0000, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
        ((1 << 64) - 2, b"\x0e" + b"\xfe" + b"\xff" * 7),
        ((1 << 64) - 1, b"\xff"),
    ],
)
def test_integer_smallest_encoding(value: int, expected: bytes) -> None:
    assert Integer(value).to_aml() == expected
    assert encode(value) == expected


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_integer_out_of_range(bad: int) -> None:
    with pytest.raises(AmlError, match="outside"):
        Integer(bad)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_integer_decodes_back(value: int) -> None:
    data = Integer(value).to_aml()
    op = data[0]
    if op in (0x00, 0x01, 0xFF):
        assert len(data) == 1
        assert {0x00: 0, 0x01: 1, 0xFF: (1 << 64) - 1}[op] == value
        return
    size = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
    assert len(data) == 1 + size
    assert int.from_bytes(data[1:], "little") == value
    # Smallest: the value would not fit in the next smaller size.
    smaller = {1: 0, 2: 1, 4: 2, 8: 4}[size]
    assert smaller == 0 or value >= 1 << (8 * smaller)


@given(st.integers(min_value=0, max_value=(1 << 28) - 5))
def test_pkg_length_counts_itself_and_is_minimal(content: int) -> None:
    data = pkg_length(content)
    value, used = decode_pkg_length(data)
    assert used == len(data)
    assert value == content + used
    if used > 1:
        # One byte fewer could not have held the total.
        assert content + used - 1 >= (1 << 6 if used == 2 else 1 << (4 + 8 * (used - 2)))
    if used > 1:
        assert data[0] & 0x30 == 0  # bits 5:4 of a multi-byte lead are reserved


def test_pkg_length_boundaries() -> None:
    assert pkg_length(62) == bytes([63])
    assert pkg_length(63) == bytes([0x40 | (65 & 0xF), 65 >> 4])
    assert len(pkg_length(0xFFF - 2)) == 2
    assert len(pkg_length(0xFFF - 1)) == 3
    with pytest.raises(AmlError, match="28-bit"):
        pkg_length(1 << 28)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("_HID", b"_HID"),
        ("A", b"A___"),
        ("\\", b"\\\x00"),
        ("\\_SB", b"\\_SB_"),
        ("\\_SB.PC00", b"\\\x2e_SB_PC00"),
        ("^FOO", b"^FOO_"),
        ("^^FOO.BAR", b"^^\x2eFOO_BAR_"),
        ("\\_SB_.PC00.S001", b"\\\x2f\x03_SB_PC00S001"),
    ],
)
def test_name_strings(path: str, expected: bytes) -> None:
    assert name_string(path) == expected


@pytest.mark.parametrize("bad", ["", "TOOLONG", "1ABC", "ab", "A.", "\\A..B", "A-B"])
def test_bad_names_rejected(bad: str) -> None:
    with pytest.raises(AmlError):
        name_string(bad)


def test_string_and_buffer() -> None:
    assert String("PNP").to_aml() == b"\x0dPNP\x00"
    assert Buffer(b"\x21").to_aml() == b"\x11\x03\x01\x21"
    with pytest.raises(AmlError, match="ASCII"):
        String("é")
    with pytest.raises(AmlError, match="NUL"):
        String("a\0b")


def test_to_uuid_is_mixed_endian() -> None:
    buf = to_uuid("E5C937D0-3553-4D7A-9117-EA4D19C3434D")
    assert buf.data == bytes.fromhex("d037c9e553357a4d9117ea4d19c3434d")
    with pytest.raises(AmlError, match="UUID"):
        to_uuid("not-a-uuid")


def test_eisa_id() -> None:
    assert eisa_id("PNP0A03").value == 0x030AD041
    assert eisa_id("PNP0A08").to_aml() == b"\x0c\x41\xd0\x0a\x08"
    with pytest.raises(AmlError, match="EISA"):
        eisa_id("pnp0a03")


def test_local_and_arg_ranges() -> None:
    assert Local(0).to_aml() == b"\x60"
    assert Local(7).to_aml() == b"\x67"
    assert Arg(6).to_aml() == b"\x6e"
    with pytest.raises(AmlError):
        Local(8)
    with pytest.raises(AmlError):
        Arg(7)


def test_method_flags() -> None:
    m = Method("_DSM", 4, [Return(0)], serialized=True)
    assert m.to_aml() == b"\x14\x08_DSM\x0c\xa4\x00"
    with pytest.raises(AmlError):
        Method("XXXX", 8)


def test_package_limit() -> None:
    with pytest.raises(AmlError, match="255"):
        Package([0] * 256).to_aml()


def test_resource_validation() -> None:
    with pytest.raises(AmlError, match="0-15"):
        IRQNoFlags([16]).to_bytes()
    with pytest.raises(AmlError, match="below minimum"):
        WordIO(0x100, 0xFF).to_bytes()
    with pytest.raises(AmlError, match="32 bits"):
        DWordMemory(0, 1 << 32).to_bytes()
    with pytest.raises(AmlError, match="16 bits"):
        IO(0x10000, 0x10000, 0, 1).to_bytes()


def test_acquire_and_release() -> None:
    # ExtOpPrefix 0x23 NameString Timeout(word); ExtOpPrefix 0x27 NameString (ACPI 6.5 §20.2.5.3)
    assert aml.Acquire("BLCK").to_aml() == b"\x5b\x23BLCK\xff\xff"
    assert aml.Acquire("\\_SB_.PHPR.BLCK", 5).to_aml() == b"\x5b\x23\x5c\x2f\x03_SB_PHPRBLCK\x05\x00"
    assert aml.Release("BLCK").to_aml() == b"\x5b\x27BLCK"
    with pytest.raises(AmlError, match="timeout"):
        aml.Acquire("BLCK", 0x10000).to_aml()


def test_unknown_term_type() -> None:
    with pytest.raises(AmlError, match="cannot encode"):
        encode(1.5)  # type: ignore[arg-type]


# --- iasl as the oracle ------------------------------------------------------------------------------

ORACLE_CASES: list[tuple[str, str, aml.Term]] = [
    ("ints", "Name (I000, 0)\nName (I001, 1)\nName (I002, 0x2A)\nName (I003, 0x1234)\n"
     "Name (I004, 0x12345678)\nName (I005, 0x123456789A)\nName (I006, 0xFFFFFFFFFFFFFFFF)",
     aml.Raw(b"".join(Name(f"I00{i}", v).to_aml() for i, v in
                      enumerate([0, 1, 0x2A, 0x1234, 0x12345678, 0x123456789A, (1 << 64) - 1])))),
    ("string", 'Name (S000, "hello")', Name("S000", "hello")),
    ("buffer", "Name (B000, Buffer () {0x21})", Name("B000", Buffer(b"\x21"))),
    *[(f"buffer{n}", "Name (B000, Buffer () {" + ", ".join(["0x01"] * n) + "})",
       Name("B000", Buffer(b"\x01" * n))) for n in (60, 61, 62, 300, 4090, 4091, 4092)],
    ("uuid", 'Name (U000, ToUUID ("E5C937D0-3553-4D7A-9117-EA4D19C3434D"))',
     Name("U000", to_uuid("E5C937D0-3553-4D7A-9117-EA4D19C3434D"))),
    ("eisaid", 'Name (E000, EISAID ("PNP0A08"))\nName (E001, EISAID ("PNP0000"))',
     aml.Raw(Name("E000", eisa_id("PNP0A08")).to_aml() + Name("E001", eisa_id("PNP0000")).to_aml())),
    ("package", 'Name (P000, Package () {0x0001FFFF, Zero, Zero, 0x05, "x", Package () {One}})',
     Name("P000", Package([0x1FFFF, 0, 0, 5, "x", Package([1])]))),
    ("root-names", "Name (\\_SB.X000, 1)\nScope (\\_SB) { Device (D000) { Name (_ADR, Zero) } }",
     aml.Raw(Name("\\_SB.X000", 1).to_aml()
             + Scope("\\_SB", [Device("D000", [Name("_ADR", 0)])]).to_aml())),
    ("parent-prefix",
     "Scope (\\_SB) { Device (D000) { Name (_ADR, Zero) Device (D001) { Name (_ADR, One) } } "
     "Scope (^_SB.D000.D001) { Name (W000, 2) } }",
     Scope("\\_SB", [Device("D000", [Name("_ADR", 0), Device("D001", [Name("_ADR", 1)])]),
                     Scope("^_SB.D000.D001", [Name("W000", 2)])])),
    ("dsm-method",
     "Method (_DSM, 4, NotSerialized) {\n"
     '  If (LEqual (Arg0, ToUUID ("E5C937D0-3553-4D7A-9117-EA4D19C3434D"))) {\n'
     "    If (LEqual (Arg2, Zero)) { Return (Buffer (One) {0x21}) }\n"
     "    If (LEqual (Arg2, 0x05)) { Return (Zero) }\n"
     "  }\n"
     "  Return (Buffer (One) {0x00})\n"
     "}",
     Method("_DSM", 4, [
         If(LEqual(Arg(0), to_uuid("E5C937D0-3553-4D7A-9117-EA4D19C3434D")), [
             If(LEqual(Arg(2), 0), [Return(Buffer(b"\x21"))]),
             If(LEqual(Arg(2), 5), [Return(0)]),
         ]),
         Return(Buffer(b"\x00")),
     ])),
    ("logic-and-store",
     "Method (M000, 2, Serialized) {\n"
     "  Store (Arg0, Local0)\n"
     "  Store (Add (Local0, Arg1), Local1)\n"
     "  Subtract (Local1, One, Local2)\n"
     "  ShiftLeft (One, Arg1, Local3)\n"
     "  If (LAnd (LNot (LEqual (Local0, 0x03)), LOr (LGreater (Local1, 2), LLess (Local2, 9)))) {\n"
     "    Return (One)\n"
     "  } Else {\n"
     "    If (LNotEqual (Local0, Local1)) { Return (0x02) }\n"
     "    If (LGreaterEqual (Local0, Local1)) { Return (0x03) }\n"
     "    If (LLessEqual (Local0, Local1)) { Return (0x04) }\n"
     "  }\n"
     "  Return (Local3)\n"
     "}",
     Method("M000", 2, [
         Store(Arg(0), Local(0)),
         Store(Add(Local(0), Arg(1)), Local(1)),
         Subtract(Local(1), 1, Local(2)),
         ShiftLeft(1, Arg(1), Local(3)),
         If(LAnd(LNot(LEqual(Local(0), 3)), LOr(LGreater(Local(1), 2), LLess(Local(2), 9))),
            [Return(1)],
            [If(LNotEqual(Local(0), Local(1)), [Return(2)]),
             If(LGreaterEqual(Local(0), Local(1)), [Return(3)]),
             If(LLessEqual(Local(0), Local(1)), [Return(4)])]),
         Return(Local(3)),
     ], serialized=True)),
    ("call-and-notify",
     "Device (D000) { Name (_HID, EISAID (\"PNP0A06\")) }\n"
     "Method (M001, 1, NotSerialized) { Return (Arg0) }\n"
     "Method (M002, 0, NotSerialized) { Notify (D000, 0x03) Return (M001 (0x07)) }",
     aml.Raw(Device("D000", [Name("_HID", eisa_id("PNP0A06"))]).to_aml()
             + Method("M001", 1, [Return(Arg(0))]).to_aml()
             + Method("M002", 0, [Notify(NamePath("D000"), 3), Return(MethodCall("M001", [7]))]).to_aml())),
    ("acquire-release",
     "Mutex (MTX1, 0x00)\n"
     "Method (M004, 0, Serialized) { Acquire (MTX1, 0xFFFF) Release (MTX1) Acquire (MTX1, 0x0A) }",
     aml.Raw(aml.Mutex("MTX1").to_aml()
             + Method("M004", 0, [aml.Acquire("MTX1"), aml.Release("MTX1"), aml.Acquire("MTX1", 10)],
                      serialized=True).to_aml())),
    ("mutex-and-arith",
     "Mutex (MTX0, 0x03)\n"
     "Method (M003, 1, Serialized) {\n"
     "  Store (Arg0, Local0)\n"
     "  Store (Arg0, Local1)\n"
     "  Increment (Local0)\n"
     "  Decrement (Local1)\n"
     "  And (Arg0, 0xFF00, Local2)\n"
     "  Or (Local2, 0x10000, Local3)\n"
     "  ShiftRight (Local3, 0x04, Local4)\n"
     "  Store (SizeOf (Arg0), Local5)\n"
     "  Store (Add (Local4, Local5), Local6)\n"
     "  Return (Local6)\n"
     "}",
     aml.Raw(aml.Mutex("MTX0", 3).to_aml() + Method("M003", 1, [
         Store(Arg(0), Local(0)),
         Store(Arg(0), Local(1)),
         aml.Increment(Local(0)),
         aml.Decrement(Local(1)),
         aml.And(Arg(0), 0xFF00, Local(2)),
         aml.Or(Local(2), 0x10000, Local(3)),
         aml.ShiftRight(Local(3), 4, Local(4)),
         Store(aml.SizeOf(Arg(0)), Local(5)),
         Store(Add(Local(4), Local(5)), Local(6)),
         Return(Local(6)),
     ], serialized=True).to_aml())),
    ("opregion-field",
     "OperationRegion (PMRG, SystemIO, 0x0600, 0x08)\n"
     "Field (PMRG, ByteAcc, NoLock, WriteAsZeros) { SLPC, 8, SLPS, 8, Offset (0x04), RST, 8 }\n"
     "OperationRegion (MREG, SystemMemory, 0xFED00000, 0x1000)\n"
     "Field (MREG, DWordAcc, Lock, Preserve) { , 3, BIT3, 1, , 60, BIG, 100 }",
     aml.Raw(OperationRegion("PMRG", RegionSpace.SYSTEM_IO, 0x600, 8).to_aml()
             + Field("PMRG", [NamedField("SLPC", 8), NamedField("SLPS", 8), ReservedField(16),
                              NamedField("RST", 8)], FieldAccess.BYTE,
                     update=FieldUpdate.WRITE_AS_ZEROS).to_aml()
             + OperationRegion("MREG", RegionSpace.SYSTEM_MEMORY, 0xFED00000, 0x1000).to_aml()
             + Field("MREG", [ReservedField(3), NamedField("BIT3", 1), ReservedField(60),
                              NamedField("BIG", 100)], FieldAccess.DWORD, lock=True).to_aml())),
    ("resources",
     "Name (R000, ResourceTemplate () {\n"
     "  WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0, 0, 1)\n"
     "  IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)\n"
     "  IO (Decode10, 0x0060, 0x0064, 0x04, 0x01)\n"
     "  Memory32Fixed (ReadWrite, 0xE8000000, 0x00100000)\n"
     "  Memory32Fixed (ReadOnly, 0xFED00000, 0x00000400)\n"
     "  QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,\n"
     "               0, 0xC0000000, 0xE7FFFFFF, 0, 0x28000000)\n"
     "  QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,\n"
     "               0, 0x100000000, 0x3FFFFFEEFFFF, 0, 0x3FFEFFEF0000)\n"
     "  DWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadOnly,\n"
     "               0, 0xC0000000, 0xC0FFFFFF, 0, 0x01000000)\n"
     "  DWordMemory (ResourceProducer, SubDecode, MinNotFixed, MaxNotFixed, WriteCombining, ReadWrite,\n"
     "               0x0FFF, 0xD0000000, 0xD0FFFFFF, 0, 0x01000000)\n"
     "  WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, 0, 0x0CF7, 0, 0x0CF8)\n"
     "  WordIO (ResourceConsumer, MinFixed, MaxFixed, PosDecode, ISAOnlyRanges,\n"
     "          0, 0x0D00, 0xFFFF, 0, 0xF300)\n"
     "  Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {4}\n"
     "  Interrupt (ResourceConsumer, Level, ActiveLow, Shared) {5, 33, 0x1000}\n"
     "  Interrupt (ResourceProducer, Level, ActiveHigh, ExclusiveAndWake) {9}\n"
     "  IRQNoFlags () {4}\n"
     "  IRQNoFlags () {3, 4, 15}\n"
     "})",
     Name("R000", ResourceTemplate([
         WordBusNumber(0, 0, producer=True),
         IO(0xCF8, 0xCF8, 1, 8),
         IO(0x60, 0x64, 4, 1, decode16=False),
         Memory32Fixed(0xE800_0000, 0x10_0000),
         Memory32Fixed(0xFED0_0000, 0x400, read_write=False),
         QWordMemory(0xC000_0000, 0xE7FF_FFFF, producer=True),
         QWordMemory(0x1_0000_0000, 0x3FFF_FFEE_FFFF, producer=True, cacheability=Cacheability.CACHEABLE),
         DWordMemory(0xC000_0000, 0xC0FF_FFFF, cacheability=Cacheability.PREFETCHABLE, read_write=False),
         DWordMemory(0xD000_0000, 0xD0FF_FFFF, producer=True, subtractive_decode=True, min_fixed=False,
                     max_fixed=False, granularity=0xFFF, cacheability=Cacheability.WRITE_COMBINING),
         WordIO(0, 0xCF7, producer=True),
         WordIO(0xD00, 0xFFFF, isa_ranges=IsaRanges.ISA_ONLY),
         Interrupt([4], edge=True),
         Interrupt([5, 33, 0x1000], active_low=True, shared=True),
         Interrupt([9], consumer=False, wake_capable=True),
         IRQNoFlags([4]),
         IRQNoFlags([3, 4, 15]),
     ]))),
]


@needs_iasl
@pytest.mark.parametrize(("asl", "term"), [c[1:] for c in ORACLE_CASES], ids=[c[0] for c in ORACLE_CASES])
def test_matches_iasl(asl: str, term: aml.Term, tmp_path: Path) -> None:
    assert encode(term).hex() == iasl_body(asl, tmp_path).hex()
