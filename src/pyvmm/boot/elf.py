"""ELF64 `vmlinux` parsing for the PVH entry: the loadable segments and the Xen PVH entry note.

Only the headers are read here (ctypes layouts named as in <elf.h>); the segment bytes are copied straight
from the file into guest RAM by pyvmm.boot.pvh. See docs/boot.md#the-elf-vmlinux.
"""

from __future__ import annotations

import ctypes
import io
import itertools
import os
from dataclasses import dataclass
from enum import IntEnum

from pyvmm.boot.bzimage import KernelImageError

ELF_MAGIC = b"\x7fELF"
XEN_NOTE_OWNER = b"Xen"
NOTE_ALIGN = 4
MAX_PHNUM = 64  # a vmlinux has a handful; more is a corrupt or hostile file


class ElfIdent(IntEnum):
    """Indexes into e_ident."""

    CLASS = 4
    DATA = 5
    VERSION = 6


class ElfClass(IntEnum):
    ELFCLASS32 = 1
    ELFCLASS64 = 2


class ElfData(IntEnum):
    ELFDATA2LSB = 1
    ELFDATA2MSB = 2


class ElfMachine(IntEnum):
    EM_X86_64 = 62


class ProgramType(IntEnum):
    PT_NULL = 0
    PT_LOAD = 1
    PT_NOTE = 4


class XenElfNote(IntEnum):
    """Note types of <xen/elfnote.h> that pyvmm reads."""

    XEN_ELFNOTE_PHYS32_ENTRY = 18  # 32-bit physical address of the PVH entry point


class Elf64_Ehdr(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("e_ident", ctypes.c_uint8 * 16),
        ("e_type", ctypes.c_uint16),
        ("e_machine", ctypes.c_uint16),
        ("e_version", ctypes.c_uint32),
        ("e_entry", ctypes.c_uint64),
        ("e_phoff", ctypes.c_uint64),
        ("e_shoff", ctypes.c_uint64),
        ("e_flags", ctypes.c_uint32),
        ("e_ehsize", ctypes.c_uint16),
        ("e_phentsize", ctypes.c_uint16),
        ("e_phnum", ctypes.c_uint16),
        ("e_shentsize", ctypes.c_uint16),
        ("e_shnum", ctypes.c_uint16),
        ("e_shstrndx", ctypes.c_uint16),
    ]


class Elf64_Phdr(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("p_type", ctypes.c_uint32),
        ("p_flags", ctypes.c_uint32),
        ("p_offset", ctypes.c_uint64),
        ("p_vaddr", ctypes.c_uint64),
        ("p_paddr", ctypes.c_uint64),
        ("p_filesz", ctypes.c_uint64),
        ("p_memsz", ctypes.c_uint64),
        ("p_align", ctypes.c_uint64),
    ]


class Elf64_Nhdr(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("n_namesz", ctypes.c_uint32),
        ("n_descsz", ctypes.c_uint32),
        ("n_type", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class LoadSegment:
    """A PT_LOAD segment: `filesz` bytes from `offset` in the file go to guest-physical `paddr`, and the
    rest of `memsz` is zeroed."""

    offset: int
    paddr: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfKernel:
    pvh_entry: int  # XEN_ELFNOTE_PHYS32_ENTRY
    segments: tuple[LoadSegment, ...]


class ImageFile:
    """Random access to a kernel image, from a file or from bytes (tests), bounds-checked."""

    def __init__(self, source: memoryview | io.BufferedReader, size: int) -> None:
        self._source = source
        self.size = size

    @classmethod
    def of_bytes(cls, data: bytes | bytearray | memoryview) -> ImageFile:
        view = memoryview(data).cast("B")
        return cls(view, len(view))

    def read(self, offset: int, length: int, what: str) -> bytes:
        self._check(offset, length, what)
        if isinstance(self._source, memoryview):
            return bytes(self._source[offset : offset + length])
        self._source.seek(offset)
        data = self._source.read(length)
        if len(data) != length:
            raise KernelImageError(f"truncated ELF file ({what} at {offset:#x} cannot be read)")
        return data

    def read_into(self, offset: int, target: memoryview, what: str) -> None:
        self._check(offset, len(target), what)
        if isinstance(self._source, memoryview):
            target[:] = self._source[offset : offset + len(target)]
            return
        self._source.seek(offset)
        done = 0
        while done < len(target):
            n = self._source.readinto(target[done:])
            if not n:
                raise KernelImageError(f"truncated ELF file ({what} at {offset:#x} cannot be read)")
            done += n

    def _check(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise KernelImageError(
                f"truncated ELF file ({what} at {offset:#x}+{length:#x} is past its end, {self.size:#x})"
            )


def open_image(path: str | os.PathLike[str]) -> tuple[io.BufferedReader, int]:
    """The open file and its size, or a one-line KernelImageError."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        return f, os.fstat(f.fileno()).st_size
    except OSError as e:
        raise KernelImageError(f"cannot read kernel {os.fspath(path)}: {e.strerror}") from None


def _align(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _pvh_entry(image: ImageFile, note: Elf64_Phdr) -> int | None:
    data = image.read(note.p_offset, note.p_filesz, "a PT_NOTE segment")
    offset = 0
    header_size = ctypes.sizeof(Elf64_Nhdr)
    while offset + header_size <= len(data):
        nhdr = Elf64_Nhdr.from_buffer_copy(data, offset)
        name_start = offset + header_size
        desc_start = name_start + _align(nhdr.n_namesz, NOTE_ALIGN)
        desc_end = desc_start + nhdr.n_descsz
        if desc_end > len(data):
            raise KernelImageError("corrupt ELF note (runs past its PT_NOTE segment)")
        name = data[name_start : name_start + nhdr.n_namesz].rstrip(b"\0")
        if name == XEN_NOTE_OWNER and nhdr.n_type == XenElfNote.XEN_ELFNOTE_PHYS32_ENTRY:
            if nhdr.n_descsz not in (4, 8):
                raise KernelImageError(f"corrupt PVH entry note ({nhdr.n_descsz} bytes, expected 4 or 8)")
            return int.from_bytes(data[desc_start:desc_end], "little")
        offset = desc_start + _align(nhdr.n_descsz, NOTE_ALIGN)
    return None


def parse_elf_kernel(image: ImageFile) -> ElfKernel:
    """Check an x86-64 ELF vmlinux and find its PT_LOAD segments and PVH entry (headers only)."""
    ident = image.read(0, min(image.size, 16), "the ELF identification")
    if ident[:4] != ELF_MAGIC:
        raise KernelImageError("not an ELF file (no \\x7fELF magic)")
    if len(ident) < 16:
        raise KernelImageError(f"truncated ELF file (only {image.size} bytes)")
    if ident[ElfIdent.CLASS] == ElfClass.ELFCLASS32:
        raise KernelImageError("32-bit ELF kernels are not supported (an x86-64 ELF64 vmlinux is needed)")
    if ident[ElfIdent.CLASS] != ElfClass.ELFCLASS64 or ident[ElfIdent.DATA] != ElfData.ELFDATA2LSB:
        raise KernelImageError("not a little-endian ELF64 file")
    ehdr = Elf64_Ehdr.from_buffer_copy(image.read(0, ctypes.sizeof(Elf64_Ehdr), "the ELF header"))
    if ehdr.e_machine != ElfMachine.EM_X86_64:
        raise KernelImageError(f"ELF file is not for x86-64 (e_machine {ehdr.e_machine})")
    if ehdr.e_phentsize != ctypes.sizeof(Elf64_Phdr) or not 0 < ehdr.e_phnum <= MAX_PHNUM:
        raise KernelImageError(
            f"corrupt ELF program header table ({ehdr.e_phnum} entries of {ehdr.e_phentsize} bytes)"
        )
    table = image.read(ehdr.e_phoff, ehdr.e_phnum * ehdr.e_phentsize, "the program header table")
    phdrs = [Elf64_Phdr.from_buffer_copy(table, i * ehdr.e_phentsize) for i in range(ehdr.e_phnum)]

    segments = []
    entry = None
    for ph in phdrs:
        if ph.p_type == ProgramType.PT_LOAD and ph.p_memsz:
            if ph.p_filesz > ph.p_memsz:
                raise KernelImageError(f"corrupt ELF segment at {ph.p_paddr:#x} (file size > memory size)")
            if ph.p_offset + ph.p_filesz > image.size:
                raise KernelImageError(
                    f"truncated ELF file (the segment for {ph.p_paddr:#x} needs bytes up to "
                    f"{ph.p_offset + ph.p_filesz:#x}, the file has {image.size:#x})"
                )
            segments.append(LoadSegment(ph.p_offset, ph.p_paddr, ph.p_filesz, ph.p_memsz))
        elif ph.p_type == ProgramType.PT_NOTE and entry is None:
            entry = _pvh_entry(image, ph)
    if entry is None:
        raise KernelImageError(
            "ELF kernel has no PVH entry point (no Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY; needs CONFIG_PVH=y)"
        )
    if not segments:
        raise KernelImageError("ELF kernel has no loadable segment")
    if entry >= 1 << 32:
        raise KernelImageError(f"PVH entry point {entry:#x} is not a 32-bit address")
    segments.sort(key=lambda s: s.paddr)
    for before, after in itertools.pairwise(segments):
        if after.paddr < before.end:
            raise KernelImageError(f"ELF segments overlap at {after.paddr:#x}")
    if not any(s.paddr <= entry < s.paddr + s.filesz for s in segments):
        raise KernelImageError(f"PVH entry point {entry:#x} is not inside a loaded segment")
    return ElfKernel(pvh_entry=entry, segments=tuple(segments))
