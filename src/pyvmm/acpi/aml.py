"""An encoder for ACPI Machine Language (ACPI 6.5 §20), just enough to describe a VM's platform.

Every AML object is a value with `to_aml() -> bytes`. Python ints and strs may be used wherever a term is
expected: an int becomes an Integer (smallest encoding) and a str a String. Names are given in ASL spelling
("\\_SB_.PC00", "^FOO", "_HID"); short segments are padded with '_'.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Protocol, runtime_checkable


class AmlError(ValueError):
    """A value that cannot be encoded in AML."""


@runtime_checkable
class AmlTerm(Protocol):
    def to_aml(self) -> bytes: ...


Term = AmlTerm | int | str


class Op(IntEnum):
    """AML opcodes (single byte; extended ones follow EXT_PREFIX)."""

    ZERO = 0x00
    ONE = 0x01
    NAME = 0x08
    BYTE_PREFIX = 0x0A
    WORD_PREFIX = 0x0B
    DWORD_PREFIX = 0x0C
    STRING_PREFIX = 0x0D
    QWORD_PREFIX = 0x0E
    SCOPE = 0x10
    BUFFER = 0x11
    PACKAGE = 0x12
    METHOD = 0x14
    DUAL_NAME_PREFIX = 0x2E
    MULTI_NAME_PREFIX = 0x2F
    EXT_PREFIX = 0x5B
    ROOT_CHAR = 0x5C
    PARENT_PREFIX = 0x5E
    LOCAL0 = 0x60
    ARG0 = 0x68
    STORE = 0x70
    ADD = 0x72
    SUBTRACT = 0x74
    INCREMENT = 0x75
    DECREMENT = 0x76
    SHIFT_LEFT = 0x79
    SHIFT_RIGHT = 0x7A
    AND = 0x7B
    OR = 0x7D
    NOTIFY = 0x86
    SIZE_OF = 0x87
    LAND = 0x90
    LOR = 0x91
    LNOT = 0x92
    LEQUAL = 0x93
    LGREATER = 0x94
    LLESS = 0x95
    IF = 0xA0
    ELSE = 0xA1
    RETURN = 0xA4
    ONES = 0xFF


class ExtOp(IntEnum):
    """Second byte of the extended opcodes (after Op.EXT_PREFIX)."""

    MUTEX = 0x01
    ACQUIRE = 0x23
    RELEASE = 0x27
    OP_REGION = 0x80
    FIELD = 0x81
    DEVICE = 0x82


_ONES = (1 << 64) - 1


def encode(term: Term) -> bytes:
    """The AML bytes of a term; ints become Integers and strs Strings."""
    if isinstance(term, bool):
        return Integer(int(term)).to_aml()
    if isinstance(term, int):
        return Integer(term).to_aml()
    if isinstance(term, str):
        return String(term).to_aml()
    if isinstance(term, AmlTerm):
        return term.to_aml()
    raise AmlError(f"cannot encode {type(term).__name__} as AML")


def encode_all(terms: Sequence[Term]) -> bytes:
    return b"".join(encode(t) for t in terms)


def pkg_length(content_length: int) -> bytes:
    """PkgLength for `content_length` bytes following it; the encoded length counts its own bytes too."""
    if content_length < 0:
        raise AmlError(f"negative package length {content_length}")
    if content_length + 1 < 1 << 6:
        return bytes([content_length + 1])
    for nbytes in (2, 3, 4):
        total = content_length + nbytes
        # Multi-byte form: 4 bits in the lead byte, 8 bits in each following byte.
        if total < 1 << (4 + 8 * (nbytes - 1)):
            lead = ((nbytes - 1) << 6) | (total & 0x0F)
            rest = (total >> 4).to_bytes(nbytes - 1, "little")
            return bytes([lead]) + rest
    raise AmlError(f"package length {content_length} exceeds the 28-bit PkgLength limit")


def _package(opcode: bytes, content: bytes) -> bytes:
    return opcode + pkg_length(len(content)) + content


# --- names -----------------------------------------------------------------------------------------------

_SEG_RE = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


def name_seg(seg: str) -> bytes:
    """A 4-byte NameSeg; shorter names are padded with '_'."""
    if not _SEG_RE.fullmatch(seg):
        raise AmlError(f"invalid ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""A NameString: optional root '\' or parent '^' prefixes, then dot-separated segments."""
    rest = path
    prefix = b""
    if rest.startswith("\\"):
        prefix = bytes([Op.ROOT_CHAR])
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            prefix += bytes([Op.PARENT_PREFIX])
            rest = rest[1:]
    segs = rest.split(".") if rest else []
    if not segs and not prefix:
        raise AmlError("empty ACPI name")
    encoded = b"".join(name_seg(s) for s in segs)
    if not segs:
        return prefix + bytes([Op.ZERO])  # NullName
    if len(segs) == 1:
        return prefix + encoded
    if len(segs) == 2:
        return prefix + bytes([Op.DUAL_NAME_PREFIX]) + encoded
    if len(segs) > 255:
        raise AmlError(f"ACPI name {path!r} has more than 255 segments")
    return prefix + bytes([Op.MULTI_NAME_PREFIX, len(segs)]) + encoded


@dataclass(frozen=True)
class NamePath:
    """A reference to a named object (evaluates to it)."""

    path: str

    def to_aml(self) -> bytes:
        return name_string(self.path)


# --- data objects ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Integer:
    """An integer constant in its smallest encoding (Zero/One/Ones or a Byte..QWord prefix)."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value <= _ONES:
            raise AmlError(f"integer {self.value} is outside 0..2^64-1")

    def to_aml(self) -> bytes:
        v = self.value
        if v == 0:
            return bytes([Op.ZERO])
        if v == 1:
            return bytes([Op.ONE])
        if v == _ONES:
            return bytes([Op.ONES])
        for limit, prefix, size in (
            (0xFF, Op.BYTE_PREFIX, 1),
            (0xFFFF, Op.WORD_PREFIX, 2),
            (0xFFFF_FFFF, Op.DWORD_PREFIX, 4),
        ):
            if v <= limit:
                return bytes([prefix]) + v.to_bytes(size, "little")
        return bytes([Op.QWORD_PREFIX]) + v.to_bytes(8, "little")


ZERO = Integer(0)
ONE = Integer(1)
ONES = Integer(_ONES)


@dataclass(frozen=True)
class String:
    """A null-terminated ASCII string constant."""

    value: str

    def __post_init__(self) -> None:
        if not self.value.isascii() or "\0" in self.value:
            raise AmlError(f"AML strings are ASCII without NUL: {self.value!r}")

    def to_aml(self) -> bytes:
        return bytes([Op.STRING_PREFIX]) + self.value.encode("ascii") + b"\0"


@dataclass(frozen=True)
class Buffer:
    data: bytes

    def to_aml(self) -> bytes:
        return _package(bytes([Op.BUFFER]), Integer(len(self.data)).to_aml() + bytes(self.data))


@dataclass(frozen=True)
class Package:
    elements: Sequence[Term]

    def to_aml(self) -> bytes:
        if len(self.elements) > 255:
            raise AmlError(f"package of {len(self.elements)} elements needs VarPackage (max 255)")
        body = bytes([len(self.elements)]) + encode_all(self.elements)
        return _package(bytes([Op.PACKAGE]), body)


def to_uuid(text: str) -> Buffer:
    """ASL ToUUID: the GUID's first three fields little-endian, the last two in byte order."""
    try:
        value = uuid.UUID(text)
    except ValueError:
        raise AmlError(f"invalid UUID {text!r}") from None
    return Buffer(value.bytes_le)


_EISA_RE = re.compile(r"[A-Z]{3}[0-9A-F]{4}")


def eisa_id(text: str) -> Integer:
    """ASL EISAID: three letters (5 bits each) and four hex digits, stored as a big-endian dword."""
    if not _EISA_RE.fullmatch(text):
        raise AmlError(f"invalid EISA id {text!r} (expected e.g. PNP0A03)")
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(text[3:], 16)
    return Integer(int.from_bytes(value.to_bytes(4, "big"), "little"))


# --- local variables and arguments -----------------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    index: int

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 7:
            raise AmlError(f"Local{self.index} does not exist (Local0..Local7)")

    def to_aml(self) -> bytes:
        return bytes([Op.LOCAL0 + self.index])


@dataclass(frozen=True)
class Arg:
    index: int

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 6:
            raise AmlError(f"Arg{self.index} does not exist (Arg0..Arg6)")

    def to_aml(self) -> bytes:
        return bytes([Op.ARG0 + self.index])


# --- namespace modifiers and named objects ---------------------------------------------------------------


@dataclass(frozen=True)
class Name:
    name: str
    value: Term

    def to_aml(self) -> bytes:
        return bytes([Op.NAME]) + name_string(self.name) + encode(self.value)


@dataclass(frozen=True)
class Scope:
    name: str
    children: Sequence[Term] = ()

    def to_aml(self) -> bytes:
        return _package(bytes([Op.SCOPE]), name_string(self.name) + encode_all(self.children))


@dataclass(frozen=True)
class Device:
    name: str
    children: Sequence[Term] = ()

    def to_aml(self) -> bytes:
        opcode = bytes([Op.EXT_PREFIX, ExtOp.DEVICE])
        return _package(opcode, name_string(self.name) + encode_all(self.children))


@dataclass(frozen=True)
class Method:
    name: str
    arg_count: int
    body: Sequence[Term] = ()
    serialized: bool = False
    sync_level: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.arg_count <= 7:
            raise AmlError(f"method {self.name} takes 0..7 arguments, not {self.arg_count}")
        if not 0 <= self.sync_level <= 15:
            raise AmlError(f"method {self.name} sync level must be 0..15")

    def to_aml(self) -> bytes:
        flags = self.arg_count | (int(self.serialized) << 3) | (self.sync_level << 4)
        return _package(bytes([Op.METHOD]), name_string(self.name) + bytes([flags]) + encode_all(self.body))


@dataclass(frozen=True)
class Mutex:
    name: str
    sync_level: int = 0

    def to_aml(self) -> bytes:
        if not 0 <= self.sync_level <= 15:
            raise AmlError(f"mutex {self.name} sync level must be 0..15")
        return bytes([Op.EXT_PREFIX, ExtOp.MUTEX]) + name_string(self.name) + bytes([self.sync_level])


class RegionSpace(IntEnum):
    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1
    PCI_CONFIG = 2


@dataclass(frozen=True)
class OperationRegion:
    name: str
    space: RegionSpace
    offset: Term
    length: Term

    def to_aml(self) -> bytes:
        head = bytes([Op.EXT_PREFIX, ExtOp.OP_REGION]) + name_string(self.name) + bytes([self.space])
        return head + encode(self.offset) + encode(self.length)


class FieldAccess(IntEnum):
    ANY = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4
    BUFFER = 5


class FieldUpdate(IntEnum):
    PRESERVE = 0
    WRITE_AS_ONES = 1
    WRITE_AS_ZEROS = 2


@dataclass(frozen=True)
class NamedField:
    name: str
    bits: int

    def to_aml(self) -> bytes:
        return name_seg(self.name) + pkg_length_raw(self.bits)


@dataclass(frozen=True)
class ReservedField:
    """Skipped bits (ASL `Offset(...)` or an unnamed `, n` entry)."""

    bits: int

    def to_aml(self) -> bytes:
        return bytes([0x00]) + pkg_length_raw(self.bits)


def pkg_length_raw(value: int) -> bytes:
    """A PkgLength used as a plain number (field widths): it does not count its own bytes."""
    if value < 1 << 6:
        return bytes([value])
    for nbytes in (2, 3, 4):
        if value < 1 << (4 + 8 * (nbytes - 1)):
            return bytes([((nbytes - 1) << 6) | (value & 0x0F)]) + (value >> 4).to_bytes(nbytes - 1, "little")
    raise AmlError(f"field width {value} exceeds the 28-bit PkgLength limit")


@dataclass(frozen=True)
class Field:
    region: str
    fields: Sequence[NamedField | ReservedField]
    access: FieldAccess = FieldAccess.BYTE
    lock: bool = False
    update: FieldUpdate = FieldUpdate.PRESERVE

    def to_aml(self) -> bytes:
        flags = self.access | (int(self.lock) << 4) | (self.update << 5)
        body = name_string(self.region) + bytes([flags]) + b"".join(f.to_aml() for f in self.fields)
        return _package(bytes([Op.EXT_PREFIX, ExtOp.FIELD]), body)


# --- statements and expressions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Return:
    value: Term

    def to_aml(self) -> bytes:
        return bytes([Op.RETURN]) + encode(self.value)


@dataclass(frozen=True)
class If:
    predicate: Term
    body: Sequence[Term]
    else_body: Sequence[Term] | None = None

    def to_aml(self) -> bytes:
        out = _package(bytes([Op.IF]), encode(self.predicate) + encode_all(self.body))
        if self.else_body is not None:
            out += _package(bytes([Op.ELSE]), encode_all(self.else_body))
        return out


@dataclass(frozen=True)
class Store:
    value: Term
    target: Term

    def to_aml(self) -> bytes:
        return bytes([Op.STORE]) + encode(self.value) + encode(self.target)


@dataclass(frozen=True)
class _Binary:
    """A two-operand logical operator (no target)."""

    left: Term
    right: Term
    opcode: ClassVar[bytes] = b""

    def to_aml(self) -> bytes:
        return self.opcode + encode(self.left) + encode(self.right)


class LEqual(_Binary):
    opcode = bytes([Op.LEQUAL])


class LGreater(_Binary):
    opcode = bytes([Op.LGREATER])


class LLess(_Binary):
    opcode = bytes([Op.LLESS])


class LAnd(_Binary):
    opcode = bytes([Op.LAND])


class LOr(_Binary):
    opcode = bytes([Op.LOR])


# The "not" comparisons are LNot applied to the opposite comparison (that is how AML spells them).
class LNotEqual(_Binary):
    opcode = bytes([Op.LNOT, Op.LEQUAL])


class LGreaterEqual(_Binary):
    opcode = bytes([Op.LNOT, Op.LLESS])


class LLessEqual(_Binary):
    opcode = bytes([Op.LNOT, Op.LGREATER])


@dataclass(frozen=True)
class LNot:
    operand: Term

    def to_aml(self) -> bytes:
        return bytes([Op.LNOT]) + encode(self.operand)


def _target(target: Term | None) -> bytes:
    return bytes([Op.ZERO]) if target is None else encode(target)  # NullName: result discarded


@dataclass(frozen=True)
class _Arith:
    """A two-operand operator with an optional target."""

    left: Term
    right: Term
    target: Term | None = None
    opcode: ClassVar[int] = 0

    def to_aml(self) -> bytes:
        return bytes([self.opcode]) + encode(self.left) + encode(self.right) + _target(self.target)


class Add(_Arith):
    opcode = Op.ADD


class Subtract(_Arith):
    opcode = Op.SUBTRACT


class And(_Arith):
    opcode = Op.AND


class Or(_Arith):
    opcode = Op.OR


class ShiftLeft(_Arith):
    opcode = Op.SHIFT_LEFT


class ShiftRight(_Arith):
    opcode = Op.SHIFT_RIGHT


@dataclass(frozen=True)
class Increment:
    target: Term

    def to_aml(self) -> bytes:
        return bytes([Op.INCREMENT]) + encode(self.target)


@dataclass(frozen=True)
class Decrement:
    target: Term

    def to_aml(self) -> bytes:
        return bytes([Op.DECREMENT]) + encode(self.target)


@dataclass(frozen=True)
class SizeOf:
    operand: Term

    def to_aml(self) -> bytes:
        return bytes([Op.SIZE_OF]) + encode(self.operand)


@dataclass(frozen=True)
class Acquire:
    """Acquire(mutex, timeout in ms); 0xFFFF waits forever. Evaluates to true when it timed out."""

    mutex: str
    timeout: int = 0xFFFF

    def to_aml(self) -> bytes:
        if not 0 <= self.timeout <= 0xFFFF:
            raise AmlError(f"Acquire timeout {self.timeout} is outside 0..0xFFFF")
        return (bytes([Op.EXT_PREFIX, ExtOp.ACQUIRE]) + name_string(self.mutex)
                + self.timeout.to_bytes(2, "little"))


@dataclass(frozen=True)
class Release:
    mutex: str

    def to_aml(self) -> bytes:
        return bytes([Op.EXT_PREFIX, ExtOp.RELEASE]) + name_string(self.mutex)


@dataclass(frozen=True)
class Notify:
    target: Term
    value: Term

    def to_aml(self) -> bytes:
        return bytes([Op.NOTIFY]) + encode(self.target) + encode(self.value)


@dataclass(frozen=True)
class MethodCall:
    name: str
    args: Sequence[Term] = ()

    def to_aml(self) -> bytes:
        if len(self.args) > 7:
            raise AmlError(f"call of {self.name} with {len(self.args)} arguments (max 7)")
        return name_string(self.name) + encode_all(self.args)


class Raw:
    """Pre-encoded AML bytes (e.g. a table body built elsewhere)."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def to_aml(self) -> bytes:
        return self.data

