"""ACPI resource descriptors (ACPI 6.5 §6.4) and ResourceTemplate, the Buffer that carries them in _CRS.

Descriptors are plain dataclasses with `to_bytes()`; ResourceTemplate is an AML term (`to_aml()`).
Address-space descriptors default to fixed minimum and maximum, positive decode and ResourceConsumer
(the ASL default usage); bridges describing their windows pass `producer=True`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Protocol

from pyvmm.acpi.aml import AmlError, Buffer


class ResourceDescriptor(Protocol):
    def to_bytes(self) -> bytes: ...


class SmallTag(IntEnum):
    IRQ = 0x04
    IO = 0x08
    END = 0x0F


class LargeTag(IntEnum):
    MEMORY32_FIXED = 0x86
    DWORD_ADDRESS = 0x87
    WORD_ADDRESS = 0x88
    EXTENDED_IRQ = 0x89
    QWORD_ADDRESS = 0x8A


class AddressSpaceType(IntEnum):
    MEMORY = 0
    IO = 1
    BUS_NUMBER = 2


class Cacheability(IntEnum):
    NON_CACHEABLE = 0
    CACHEABLE = 1
    WRITE_COMBINING = 2
    PREFETCHABLE = 3


class IsaRanges(IntEnum):
    NON_ISA_ONLY = 1
    ISA_ONLY = 2
    ENTIRE_RANGE = 3


class _GeneralFlags(IntFlag):
    CONSUMER = 1 << 0
    SUBTRACTIVE_DECODE = 1 << 1
    MIN_FIXED = 1 << 2
    MAX_FIXED = 1 << 3


class _ExtIrqFlags(IntFlag):
    CONSUMER = 1 << 0
    EDGE = 1 << 1
    ACTIVE_LOW = 1 << 2
    SHARED = 1 << 3
    WAKE_CAPABLE = 1 << 4


def _small(tag: SmallTag, body: bytes) -> bytes:
    return bytes([(tag << 3) | len(body)]) + body


def _large(tag: LargeTag, body: bytes) -> bytes:
    return struct.pack("<BH", tag, len(body)) + body


def _check_range(what: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise AmlError(f"{what} {value:#x} does not fit in {bits} bits")


@dataclass(frozen=True)
class IO:
    """I/O port range (small descriptor); `decode16` selects 16-bit decode (Decode16)."""

    minimum: int
    maximum: int
    alignment: int
    length: int
    decode16: bool = True

    def to_bytes(self) -> bytes:
        for what, v, bits in (("IO minimum", self.minimum, 16), ("IO maximum", self.maximum, 16),
                              ("IO alignment", self.alignment, 8), ("IO length", self.length, 8)):
            _check_range(what, v, bits)
        body = struct.pack("<BHHBB", int(self.decode16), self.minimum, self.maximum, self.alignment,
                           self.length)
        return _small(SmallTag.IO, body)


@dataclass(frozen=True)
class IRQNoFlags:
    """Legacy IRQ list (edge-triggered, active-high, exclusive) for ISA IRQs 0-15."""

    irqs: Sequence[int]

    def to_bytes(self) -> bytes:
        mask = 0
        for irq in self.irqs:
            if not 0 <= irq <= 15:
                raise AmlError(f"IRQNoFlags only describes IRQs 0-15, not {irq}")
            mask |= 1 << irq
        return _small(SmallTag.IRQ, struct.pack("<H", mask))


@dataclass(frozen=True)
class Memory32Fixed:
    base: int
    length: int
    read_write: bool = True

    def to_bytes(self) -> bytes:
        _check_range("Memory32Fixed base", self.base, 32)
        _check_range("Memory32Fixed length", self.length, 32)
        return _large(LargeTag.MEMORY32_FIXED, struct.pack("<BII", int(self.read_write), self.base,
                                                           self.length))


@dataclass(frozen=True)
class Interrupt:
    """Extended interrupt descriptor (ASL `Interrupt`): GSIs with trigger mode and polarity."""

    irqs: Sequence[int]
    edge: bool = False
    active_low: bool = False
    shared: bool = False
    wake_capable: bool = False
    consumer: bool = True

    def to_bytes(self) -> bytes:
        if not 1 <= len(self.irqs) <= 255:
            raise AmlError(f"Interrupt descriptor needs 1..255 interrupts, got {len(self.irqs)}")
        for irq in self.irqs:
            _check_range("interrupt number", irq, 32)
        flags = _ExtIrqFlags(0)
        for on, flag in ((self.consumer, _ExtIrqFlags.CONSUMER), (self.edge, _ExtIrqFlags.EDGE),
                         (self.active_low, _ExtIrqFlags.ACTIVE_LOW), (self.shared, _ExtIrqFlags.SHARED),
                         (self.wake_capable, _ExtIrqFlags.WAKE_CAPABLE)):
            if on:
                flags |= flag
        body = struct.pack("<BB", flags, len(self.irqs)) + b"".join(struct.pack("<I", i) for i in self.irqs)
        return _large(LargeTag.EXTENDED_IRQ, body)


@dataclass(frozen=True)
class _AddressSpace:
    """Word/DWord/QWord address space descriptor; `length` defaults to maximum - minimum + 1."""

    minimum: int
    maximum: int
    producer: bool = False
    min_fixed: bool = True
    max_fixed: bool = True
    subtractive_decode: bool = False
    granularity: int = 0
    translation: int = 0
    length: int | None = None

    _tag = LargeTag.WORD_ADDRESS
    _bits = 16
    _type = AddressSpaceType.MEMORY

    def _type_flags(self) -> int:
        return 0

    def to_bytes(self) -> bytes:
        name = type(self).__name__
        if self.maximum < self.minimum:
            raise AmlError(f"{name}: maximum {self.maximum:#x} is below minimum {self.minimum:#x}")
        length = self.maximum - self.minimum + 1 if self.length is None else self.length
        values = (self.granularity, self.minimum, self.maximum, self.translation, length)
        for what, v in zip(("granularity", "minimum", "maximum", "translation", "length"), values,
                           strict=True):
            _check_range(f"{name} {what}", v, self._bits)
        general = _GeneralFlags(0)
        for on, flag in ((not self.producer, _GeneralFlags.CONSUMER),
                         (self.subtractive_decode, _GeneralFlags.SUBTRACTIVE_DECODE),
                         (self.min_fixed, _GeneralFlags.MIN_FIXED),
                         (self.max_fixed, _GeneralFlags.MAX_FIXED)):
            if on:
                general |= flag
        fmt = {16: "H", 32: "I", 64: "Q"}[self._bits]
        body = struct.pack("<BBB", self._type, general, self._type_flags())
        body += struct.pack("<" + fmt * 5, *values)
        return _large(self._tag, body)


@dataclass(frozen=True)
class WordBusNumber(_AddressSpace):
    _tag = LargeTag.WORD_ADDRESS
    _bits = 16
    _type = AddressSpaceType.BUS_NUMBER


@dataclass(frozen=True)
class WordIO(_AddressSpace):
    isa_ranges: IsaRanges = IsaRanges.ENTIRE_RANGE

    _tag = LargeTag.WORD_ADDRESS
    _bits = 16
    _type = AddressSpaceType.IO

    def _type_flags(self) -> int:
        return int(self.isa_ranges)


@dataclass(frozen=True)
class _MemoryAddressSpace(_AddressSpace):
    cacheability: Cacheability = Cacheability.NON_CACHEABLE
    read_write: bool = True

    _type = AddressSpaceType.MEMORY

    def _type_flags(self) -> int:
        return int(self.read_write) | (self.cacheability << 1)


@dataclass(frozen=True)
class DWordMemory(_MemoryAddressSpace):
    _tag = LargeTag.DWORD_ADDRESS
    _bits = 32


@dataclass(frozen=True)
class QWordMemory(_MemoryAddressSpace):
    _tag = LargeTag.QWORD_ADDRESS
    _bits = 64


END_TAG = _small(SmallTag.END, b"\x00")  # checksum 0: "treat as valid" (what iasl emits)


@dataclass(frozen=True)
class ResourceTemplate:
    """ASL ResourceTemplate: a Buffer holding the descriptors followed by an EndTag."""

    descriptors: Sequence[ResourceDescriptor]

    def to_bytes(self) -> bytes:
        return b"".join(d.to_bytes() for d in self.descriptors) + END_TAG

    def to_aml(self) -> bytes:
        return Buffer(self.to_bytes()).to_aml()
