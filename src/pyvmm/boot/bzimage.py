"""Linux bzImage parsing and direct kernel loading for the x86-64 64-bit boot protocol."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm import layout
from pyvmm.boot.bootparams import (
    BOOT_FLAG,
    DEFAULT_SETUP_SECTS,
    HEADER_END_2_06,
    HEADER_END_2_10,
    HEADER_MAGIC,
    JUMP_OPCODE,
    SECTOR_SIZE,
    SETUP_HEADER_LIMIT,
    Hdr,
    LoadFlags,
    ProtocolVersion,
    XLoadFlags,
    version_string,
)
from pyvmm.boot.zeropage import E820Entry, build_zero_page, validate_e820
from pyvmm.errors import UsageError
from pyvmm.memory import GuestMemory, GuestMemoryError

PAGE_SIZE = 0x1000
ENTRY_64_OFFSET = 0x200  # the 64-bit entry point, relative to the protected-mode load address
EBDA_POINTER_VALUE = layout.EBDA_START >> 4  # a real-mode segment, as the BIOS data area stores it


class KernelImageError(UsageError):
    """The kernel image (or the command line / initramfs given with it) cannot be booted."""


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage setup header a loader acts on; `raw` is the whole header as in the file."""

    version: int
    setup_sects: int  # effective value (0 in the file means 4)
    syssize: int  # protected-mode size in 16-byte units
    loadflags: LoadFlags
    xloadflags: XLoadFlags
    code32_start: int
    initrd_addr_max: int  # address of the last byte the initramfs may occupy
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int  # longest command line, not counting the NUL
    init_size: int  # 0 before protocol 2.10
    pref_address: int  # 0 before protocol 2.10
    kernel_version: str | None
    raw: bytes  # image bytes [0x1F1, header end)

    @property
    def version_str(self) -> str:
        return version_string(self.version)

    @property
    def setup_size(self) -> int:
        """Bytes of the real-mode part (boot sector + setup) that precede the protected-mode kernel."""
        return (self.setup_sects + 1) * SECTOR_SIZE

    @property
    def has_64bit_entry(self) -> bool:
        return self.version >= ProtocolVersion.XLOADFLAGS and XLoadFlags.KERNEL_64 in self.xloadflags


@dataclass(frozen=True)
class BzImage:
    header: SetupHeader
    kernel: memoryview  # the protected-mode part, loaded at the load address


@dataclass(frozen=True)
class BootInfo:
    """Where load_linux put things; entry_point and zero_page feed the boot vCPU's registers."""

    entry_point: int
    zero_page: int
    kernel_load_addr: int
    kernel_end: int  # end of the memory the kernel claims before it reads the E820 map
    cmdline_addr: int
    cmdline_size: int  # bytes written, including the NUL
    initramfs_addr: int  # 0 when there is none
    initramfs_size: int
    protocol_version: int
    kernel_version: str | None
    rsdp_in_zero_page: bool


def _u8(data: bytes | memoryview, off: int) -> int:
    return data[off]


def _u16(data: bytes | memoryview, off: int) -> int:
    return struct.unpack_from("<H", data, off)[0]


def _u32(data: bytes | memoryview, off: int) -> int:
    return struct.unpack_from("<I", data, off)[0]


def _u64(data: bytes | memoryview, off: int) -> int:
    return struct.unpack_from("<Q", data, off)[0]


def _kernel_version(data: bytes | memoryview, pointer: int, setup_size: int) -> str | None:
    # kernel_version points at a NUL-terminated string inside the setup code, offset by 0x200.
    if pointer == 0:
        return None
    start = pointer + 0x200
    if start >= min(len(data), setup_size):
        return None
    raw = bytes(data[start : min(start + 256, setup_size)])
    return raw.split(b"\0", 1)[0].decode("ascii", "replace") or None


def parse_setup_header(data: bytes | bytearray | memoryview) -> SetupHeader:
    """Parse and validate the setup header of a bzImage held in `data`."""
    view = memoryview(data).cast("B")
    if len(view) < Hdr.VERSION + 2:
        raise KernelImageError(f"not a Linux bzImage (file is only {len(view)} bytes)")
    if _u16(view, Hdr.BOOT_FLAG) != BOOT_FLAG:
        raise KernelImageError("not a Linux bzImage (no 0xAA55 boot flag at 0x1FE)")
    if bytes(view[Hdr.HEADER : Hdr.HEADER + 4]) != HEADER_MAGIC:
        raise KernelImageError("not a Linux bzImage (no 'HdrS' setup header magic)")
    version = _u16(view, Hdr.VERSION)
    if version < ProtocolVersion.MINIMUM:
        raise KernelImageError(
            f"boot protocol {version_string(version)} too old "
            f"(need {version_string(ProtocolVersion.MINIMUM)} or newer)"
        )
    if view[Hdr.JUMP] != JUMP_OPCODE:
        raise KernelImageError("not a Linux bzImage (no short jump at 0x200)")
    header_end = Hdr.HEADER + view[Hdr.JUMP + 1]
    needed = HEADER_END_2_10 if version >= ProtocolVersion.INIT_SIZE else HEADER_END_2_06
    if not needed <= header_end <= SETUP_HEADER_LIMIT:
        raise KernelImageError(
            f"corrupt setup header (ends at {header_end:#x}, protocol "
            f"{version_string(version)} needs {needed:#x}..{SETUP_HEADER_LIMIT:#x})"
        )
    setup_sects = view[Hdr.SETUP_SECTS] or DEFAULT_SETUP_SECTS
    setup_size = (setup_sects + 1) * SECTOR_SIZE
    if len(view) < max(setup_size, header_end):
        raise KernelImageError(f"truncated bzImage (setup needs {setup_size} bytes, file has {len(view)})")
    loadflags = LoadFlags(view[Hdr.LOADFLAGS])
    if LoadFlags.LOADED_HIGH not in loadflags:
        raise KernelImageError("zImage kernels (not loaded high) are not supported")
    has_init_size = version >= ProtocolVersion.INIT_SIZE
    return SetupHeader(
        version=version,
        setup_sects=setup_sects,
        syssize=_u32(view, Hdr.SYSSIZE),
        loadflags=loadflags,
        xloadflags=XLoadFlags(_u16(view, Hdr.XLOADFLAGS) if version >= ProtocolVersion.XLOADFLAGS else 0),
        code32_start=_u32(view, Hdr.CODE32_START),
        initrd_addr_max=_u32(view, Hdr.INITRD_ADDR_MAX),
        kernel_alignment=_u32(view, Hdr.KERNEL_ALIGNMENT),
        relocatable=bool(view[Hdr.RELOCATABLE_KERNEL]),
        cmdline_size=_u32(view, Hdr.CMDLINE_SIZE),
        init_size=_u32(view, Hdr.INIT_SIZE) if has_init_size else 0,
        pref_address=_u64(view, Hdr.PREF_ADDRESS) if has_init_size else 0,
        kernel_version=_kernel_version(view, _u16(view, Hdr.KERNEL_VERSION), setup_size),
        raw=bytes(view[Hdr.SETUP_SECTS : header_end]),
    )


def parse_bzimage(data: bytes | bytearray | memoryview) -> BzImage:
    """Parse a whole bzImage: its setup header and the protected-mode kernel that follows the setup."""
    header = parse_setup_header(data)
    view = memoryview(data).cast("B")
    kernel = view[header.setup_size :]
    if len(kernel) == 0:
        raise KernelImageError("truncated bzImage (no protected-mode kernel after the setup code)")
    # syssize is rounded up to 16 bytes, so a complete file is at most 15 bytes shorter.
    if len(kernel) + 15 < header.syssize * 16:
        raise KernelImageError(
            f"truncated bzImage (protected-mode kernel is {len(kernel)} bytes, "
            f"header says {header.syssize * 16})"
        )
    return BzImage(header, kernel)


def read_source(source: bytes | bytearray | memoryview | str | os.PathLike[str],
                what: str) -> bytes | memoryview:
    """A kernel or initramfs given as bytes or as a path; KernelImageError (one line) when unreadable."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).cast("B")
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise KernelImageError(f"cannot read {what} {os.fspath(source)}: {e.strerror}") from None


def _align_up(value: int, align: int) -> int:
    return value if align <= 1 else (value + align - 1) // align * align


def _load_address(header: SetupHeader) -> int:
    if header.relocatable:
        return layout.HIGH_RAM_START
    # A non-relocatable kernel only runs where it was linked.
    address = header.pref_address or header.code32_start
    if address < layout.HIGH_RAM_START:
        raise KernelImageError(
            f"non-relocatable kernel wants load address {address:#x}, below {layout.HIGH_RAM_START:#x}"
        )
    return address


def _kernel_end(header: SetupHeader, load_addr: int, kernel_len: int) -> int:
    """End of the range the kernel uses before it reads the memory map (decompression buffer included).

    A relocatable kernel decompresses at max(load address aligned up to kernel_alignment, pref_address)
    and needs init_size bytes from there.
    """
    runtime_start = load_addr
    if header.relocatable:
        runtime_start = max(_align_up(load_addr, header.kernel_alignment), header.pref_address)
    return max(load_addr + kernel_len, runtime_start + header.init_size)


def _ram_region_end(memory: GuestMemory, gpa: int) -> int:
    for region in memory.regions:
        if region.gpa <= gpa < region.gpa + region.size:
            return region.gpa + region.size
    raise KernelImageError(f"guest RAM does not cover the kernel load address {gpa:#x}")


def _encode_cmdline(cmdline: str, header: SetupHeader) -> bytes:
    data = cmdline.encode()
    if b"\0" in data:
        raise KernelImageError("kernel command line contains a NUL character")
    limit = min(header.cmdline_size + 1, layout.CMDLINE_MAX_SIZE)
    if len(data) + 1 > limit:
        raise KernelImageError(
            f"kernel command line too long ({len(data) + 1} bytes with its NUL, the limit is {limit})"
        )
    return data + b"\0"


def _initramfs_address(size: int, header: SetupHeader, region_end: int, kernel_end: int) -> int:
    """Top of the first RAM region (below 3 GiB and initrd_addr_max), page aligned, above the kernel."""
    top = min(region_end, layout.LOW_RAM_END, header.initrd_addr_max + 1)
    room = max(0, top - _align_up(kernel_end, PAGE_SIZE))
    if size > room:
        raise KernelImageError(
            f"initramfs too large ({size} bytes; {room} bytes fit between the kernel and {top:#x})"
        )
    return (top - size) // PAGE_SIZE * PAGE_SIZE


def load_linux(
    memory: GuestMemory,
    kernel: bytes | bytearray | memoryview | str | os.PathLike[str],
    cmdline: str,
    initramfs: bytes | bytearray | memoryview | str | os.PathLike[str] | None,
    e820: Sequence[E820Entry | tuple[int, int, int]],
    rsdp_addr: int | None = None,
) -> BootInfo:
    """Load a bzImage for the 64-bit boot protocol and write its zero page; returns where things went.

    `e820` is normally layout.e820_entries(ram_size). The EBDA pointer at layout.EBDA_POINTER is set to
    layout.EBDA_START so that kernels older than protocol 2.14 still find the RSDP by scanning the EBDA.
    Raises KernelImageError for a bad kernel, command line or initramfs, ZeroPageError for a bad E820 map.
    """
    image = parse_bzimage(read_source(kernel, "kernel"))
    header = image.header
    if not header.has_64bit_entry:
        raise KernelImageError(
            f"kernel has no 64-bit entry point (boot protocol {header.version_str}, XLF_KERNEL_64 not set)"
        )
    entries = validate_e820(e820)
    cmdline_bytes = _encode_cmdline(cmdline, header)

    load_addr = _load_address(header)
    kernel_end = _kernel_end(header, load_addr, len(image.kernel))
    region_end = _ram_region_end(memory, load_addr)
    if kernel_end > region_end:
        raise KernelImageError(
            f"not enough guest RAM for the kernel (it needs memory up to {kernel_end:#x}, "
            f"RAM ends at {region_end:#x})"
        )

    initramfs_addr = initramfs_size = 0
    if initramfs is not None:
        data = read_source(initramfs, "initramfs")
        if len(data) == 0:
            raise KernelImageError("initramfs is empty")
        initramfs_size = len(data)
        initramfs_addr = _initramfs_address(initramfs_size, header, region_end, kernel_end)
    rsdp_in_zero_page = rsdp_addr is not None and header.version >= ProtocolVersion.ACPI_RSDP

    zero_page = build_zero_page(
        header.raw,
        cmdline_addr=layout.CMDLINE_START,
        initramfs_addr=initramfs_addr,
        initramfs_size=initramfs_size,
        e820=entries,
        rsdp_addr=rsdp_addr if rsdp_in_zero_page else None,
    )
    try:
        memory.write(load_addr, image.kernel)
        if initramfs is not None:
            memory.write(initramfs_addr, data)
        memory.write(layout.CMDLINE_START, cmdline_bytes)
        memory.write(layout.ZERO_PAGE_START, zero_page)
        memory.write_u16(layout.EBDA_POINTER, EBDA_POINTER_VALUE)
    except GuestMemoryError as e:
        raise KernelImageError(f"cannot place the kernel in guest RAM: {e}") from None

    return BootInfo(
        entry_point=load_addr + ENTRY_64_OFFSET,
        zero_page=layout.ZERO_PAGE_START,
        kernel_load_addr=load_addr,
        kernel_end=kernel_end,
        cmdline_addr=layout.CMDLINE_START,
        cmdline_size=len(cmdline_bytes),
        initramfs_addr=initramfs_addr,
        initramfs_size=initramfs_size,
        protocol_version=header.version,
        kernel_version=header.kernel_version,
        rsdp_in_zero_page=rsdp_in_zero_page,
    )
