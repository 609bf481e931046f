"""Binary layout of Linux's x86 `struct boot_params` (the "zero page") and its embedded setup header.

Offsets are from the start of the zero page; the setup header sits at the same offsets in a bzImage file
(its first 512-byte sector is laid out like the start of the zero page).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

ZERO_PAGE_SIZE = 4096
SECTOR_SIZE = 512

BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
JUMP_OPCODE = 0xEB  # the 2-byte short jump at 0x200 whose displacement gives the header length
DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4 (historical)

TYPE_OF_LOADER_UNDEFINED = 0xFF
VID_MODE_NORMAL = 0xFFFF
# heap_end_ptr counts from the start of the real-mode code minus 0x200; the whole 64 KiB segment.
HEAP_END_PTR = 0xFE00

E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY_SIZE = 20  # u64 address, u64 size, u32 type (packed)


class BootParam(IntEnum):
    """Offsets of the `struct boot_params` fields the loader writes (outside the setup header)."""

    ACPI_RSDP_ADDR = 0x070  # u64, boot protocol 2.14+
    EXT_RAMDISK_IMAGE = 0x0C0  # u32, high half of ramdisk_image
    EXT_RAMDISK_SIZE = 0x0C4  # u32
    EXT_CMD_LINE_PTR = 0x0C8  # u32
    E820_ENTRIES = 0x1E8  # u8
    SENTINEL = 0x1EF  # u8; must stay 0 or the kernel wipes fields it thinks are stale
    SETUP_HEADER = 0x1F1
    E820_TABLE = 0x2D0


class Hdr(IntEnum):
    """Offsets of setup-header fields (same in the image file and in the zero page)."""

    SETUP_SECTS = 0x1F1  # u8
    ROOT_FLAGS = 0x1F2  # u16
    SYSSIZE = 0x1F4  # u32, protected-mode size in 16-byte paragraphs
    RAM_SIZE = 0x1F8  # u16
    VID_MODE = 0x1FA  # u16
    ROOT_DEV = 0x1FC  # u16
    BOOT_FLAG = 0x1FE  # u16
    JUMP = 0x200  # u16
    HEADER = 0x202  # "HdrS"
    VERSION = 0x206  # u16
    REALMODE_SWTCH = 0x208  # u32
    START_SYS_SEG = 0x20C  # u16
    KERNEL_VERSION = 0x20E  # u16, pointer to a string, minus 0x200
    TYPE_OF_LOADER = 0x210  # u8
    LOADFLAGS = 0x211  # u8
    SETUP_MOVE_SIZE = 0x212  # u16
    CODE32_START = 0x214  # u32
    RAMDISK_IMAGE = 0x218  # u32
    RAMDISK_SIZE = 0x21C  # u32
    BOOTSECT_KLUDGE = 0x220  # u32
    HEAP_END_PTR = 0x224  # u16
    EXT_LOADER_VER = 0x226  # u8
    EXT_LOADER_TYPE = 0x227  # u8
    CMD_LINE_PTR = 0x228  # u32
    INITRD_ADDR_MAX = 0x22C  # u32
    KERNEL_ALIGNMENT = 0x230  # u32
    RELOCATABLE_KERNEL = 0x234  # u8
    MIN_ALIGNMENT = 0x235  # u8
    XLOADFLAGS = 0x236  # u16
    CMDLINE_SIZE = 0x238  # u32
    HARDWARE_SUBARCH = 0x23C  # u32
    HARDWARE_SUBARCH_DATA = 0x240  # u64
    PAYLOAD_OFFSET = 0x248  # u32
    PAYLOAD_LENGTH = 0x24C  # u32
    SETUP_DATA = 0x250  # u64
    PREF_ADDRESS = 0x258  # u64
    INIT_SIZE = 0x260  # u32
    HANDOVER_OFFSET = 0x264  # u32
    KERNEL_INFO_OFFSET = 0x268  # u32


# The setup header may not run past the zero page's next field (edd_mbr_sig_buffer).
SETUP_HEADER_LIMIT = 0x290
# Smallest header end that holds the fields of protocol 2.06 (up to cmdline_size) and 2.10 (init_size).
HEADER_END_2_06 = Hdr.CMDLINE_SIZE + 4
HEADER_END_2_10 = Hdr.INIT_SIZE + 4


class LoadFlags(IntFlag):
    LOADED_HIGH = 0x01  # protected-mode code at 0x100000 (bzImage)
    KASLR_FLAG = 0x02  # set by the kernel itself
    QUIET_FLAG = 0x20
    KEEP_SEGMENTS = 0x40  # 32-bit entry only
    CAN_USE_HEAP = 0x80  # heap_end_ptr is valid


class XLoadFlags(IntFlag):
    KERNEL_64 = 0x01  # legacy 64-bit entry point at load address + 0x200
    CAN_BE_LOADED_ABOVE_4G = 0x02
    EFI_HANDOVER_32 = 0x04
    EFI_HANDOVER_64 = 0x08
    EFI_KEXEC = 0x10
    FIVE_LEVEL = 0x20
    FIVE_LEVEL_ENABLED = 0x40


class ProtocolVersion(IntEnum):
    MINIMUM = 0x0206  # cmdline_size exists
    INIT_SIZE = 0x020A  # pref_address and init_size exist
    XLOADFLAGS = 0x020C  # xloadflags (and so XLF_KERNEL_64) exist
    ACPI_RSDP = 0x020E  # acpi_rsdp_addr is honoured


def version_string(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"
