"""bzImage parsing, load_linux placement and the zero page, checked against the boot protocol's offsets.

Offsets below are written as the literal numbers of the Linux x86 boot protocol document on purpose, so
that a wrong constant in pyvmm.boot.bootparams cannot hide itself.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pyvmm import layout
from pyvmm.boot import (
    KernelImageError,
    LoadFlags,
    XLoadFlags,
    ZeroPageError,
    load_linux,
    parse_bzimage,
    parse_setup_header,
)
from pyvmm.memory import GuestMemory

MiB = layout.MiB
RAM = 128 * MiB


def make_bzimage(
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    payload: bytes = b"",
    payload_size: int = 0x3000,
    loadflags: int = 0x01,
    xloadflags: int = 0x01 | 0x02,
    relocatable: int = 1,
    kernel_alignment: int = 0x200000,
    initrd_addr_max: int = 0x7FFF_FFFF,
    cmdline_size: int = 2047,
    pref_address: int = 0x1000000,
    init_size: int = 0x800000,
    code32_start: int = 0x100000,
    header_end: int = 0x26C,
    boot_flag: int = 0xAA55,
    magic: bytes = b"HdrS",
    kernel_version: str | None = "6.1.0-test (builder@lab) #1 SMP",
    syssize: int | None = None,
) -> bytes:
    """A minimal bzImage: boot sector + setup sectors with a valid header, then a protected-mode part."""
    setup_size = ((setup_sects or 4) + 1) * 512
    image = bytearray(setup_size)
    image[0x1F1] = setup_sects
    struct.pack_into("<H", image, 0x1FE, boot_flag)
    image[0x200] = 0xEB
    image[0x201] = header_end - 0x202
    image[0x202:0x206] = magic
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<I", image, 0x214, code32_start)
    image[0x211] = loadflags
    struct.pack_into("<I", image, 0x22C, initrd_addr_max)
    struct.pack_into("<I", image, 0x230, kernel_alignment)
    image[0x234] = relocatable
    image[0x235] = 21
    struct.pack_into("<H", image, 0x236, xloadflags)
    struct.pack_into("<I", image, 0x238, cmdline_size)
    struct.pack_into("<Q", image, 0x258, pref_address)
    struct.pack_into("<I", image, 0x260, init_size)
    if kernel_version is not None:
        # The string lives in the setup code; the header holds its offset minus 0x200.
        struct.pack_into("<H", image, 0x20E, 0x400 - 0x200)
        text = kernel_version.encode() + b"\0"
        image[0x400 : 0x400 + len(text)] = text
    # Put a recognisable byte in the boot sector area that must not reach the zero page.
    image[0x10] = 0x5A
    pm = payload or bytes((i * 7 + 3) & 0xFF for i in range(payload_size))
    struct.pack_into("<I", image, 0x1F4, syssize if syssize is not None else (len(pm) + 15) // 16)
    return bytes(image) + pm


def e820() -> list[tuple[int, int, int]]:
    return layout.e820_entries(RAM)


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory.for_size(RAM)


def u16(b: bytes, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0]


def u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


# --- parsing ---------------------------------------------------------------------------------------


def test_parse_reads_header_fields() -> None:
    hdr = parse_setup_header(make_bzimage(setup_sects=6))
    assert hdr.version == 0x020F and hdr.version_str == "2.15"
    assert hdr.setup_sects == 6 and hdr.setup_size == 7 * 512
    assert hdr.loadflags == LoadFlags.LOADED_HIGH
    assert XLoadFlags.KERNEL_64 in hdr.xloadflags and hdr.has_64bit_entry
    assert hdr.relocatable
    assert hdr.kernel_alignment == 0x200000
    assert hdr.initrd_addr_max == 0x7FFF_FFFF
    assert hdr.cmdline_size == 2047
    assert hdr.init_size == 0x800000
    assert hdr.pref_address == 0x1000000
    assert hdr.kernel_version == "6.1.0-test (builder@lab) #1 SMP"
    assert len(hdr.raw) == 0x26C - 0x1F1


def test_setup_sects_zero_means_four() -> None:
    image = parse_bzimage(make_bzimage(setup_sects=0, payload=b"\x90" * 64))
    assert image.header.setup_sects == 4
    assert bytes(image.kernel) == b"\x90" * 64


def test_protected_mode_part_starts_after_setup() -> None:
    payload = bytes(range(256)) * 4
    image = parse_bzimage(make_bzimage(setup_sects=3, payload=payload))
    assert bytes(image.kernel) == payload


def test_old_protocol_without_xloadflags_has_no_64bit_entry() -> None:
    hdr = parse_setup_header(make_bzimage(version=0x020A, xloadflags=0x01))
    assert hdr.version_str == "2.10"
    assert not hdr.has_64bit_entry
    hdr = parse_setup_header(make_bzimage(xloadflags=0x02))
    assert not hdr.has_64bit_entry


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\0" * 0x100, "not a Linux bzImage (file is only 256 bytes)"),
        (make_bzimage(boot_flag=0x1234), "not a Linux bzImage (no 0xAA55 boot flag"),
        (make_bzimage(magic=b"ELF!"), "not a Linux bzImage (no 'HdrS'"),
        (make_bzimage(version=0x0205), "boot protocol 2.05 too old (need 2.06 or newer)"),
        (make_bzimage(version=0x0204), "boot protocol 2.04 too old"),
        (make_bzimage(header_end=0x230), "corrupt setup header (ends at 0x230"),
        (make_bzimage(version=0x020A, header_end=0x240), "corrupt setup header"),
        (make_bzimage(header_end=0x2A0), "corrupt setup header"),
        (make_bzimage(loadflags=0), "zImage kernels (not loaded high) are not supported"),
        (make_bzimage()[: 3 * 512], "truncated bzImage (setup needs 2560 bytes, file has 1536)"),
        (make_bzimage()[: 5 * 512], "truncated bzImage (no protected-mode kernel"),
        (make_bzimage(payload=b"x" * 100, syssize=100), "truncated bzImage (protected-mode kernel is 100"),
    ],
)
def test_parse_errors(image: bytes, message: str) -> None:
    with pytest.raises(KernelImageError) as exc:
        parse_bzimage(image)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_jump_is_rejected() -> None:
    image = bytearray(make_bzimage())
    image[0x200] = 0x90
    with pytest.raises(KernelImageError, match="no short jump"):
        parse_setup_header(image)


def test_syssize_rounding_is_tolerated() -> None:
    # syssize counts 16-byte units rounded up, so up to 15 bytes may be missing from the file.
    image = parse_bzimage(make_bzimage(payload=b"k" * 100, syssize=7))
    assert len(image.kernel) == 100


# --- load_linux: placement -------------------------------------------------------------------------


def test_kernel_loaded_at_1mib_with_64bit_entry(memory: GuestMemory) -> None:
    data = make_bzimage(payload_size=0x5000)
    info = load_linux(memory, data, "console=ttyS0", None, e820())
    assert info.kernel_load_addr == 0x100000
    assert info.entry_point == 0x100200
    assert info.zero_page == 0x7000
    assert memory.read(0x100000, 0x5000) == data[5 * 512 :]
    # max(align_up(1 MiB, 2 MiB), pref_address 16 MiB) + init_size 8 MiB
    assert info.kernel_end == 0x1800000
    assert info.protocol_version == 0x020F
    assert info.kernel_version.startswith("6.1.0-test")


def test_non_relocatable_kernel_goes_to_pref_address(memory: GuestMemory) -> None:
    data = make_bzimage(relocatable=0, pref_address=0x200000, init_size=0x100000)
    info = load_linux(memory, data, "", None, e820())
    assert info.kernel_load_addr == 0x200000
    assert info.entry_point == 0x200200
    assert memory.read(0x200000, 16) == data[5 * 512 : 5 * 512 + 16]


def test_non_relocatable_kernel_below_1mib_is_refused(memory: GuestMemory) -> None:
    data = make_bzimage(relocatable=0, pref_address=0x80000)
    with pytest.raises(KernelImageError, match="non-relocatable kernel wants load address 0x80000"):
        load_linux(memory, data, "", None, e820())


def test_kernel_without_64bit_entry_is_refused(memory: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match=r"no 64-bit entry point \(boot protocol 2.10"):
        load_linux(memory, make_bzimage(version=0x020A), "", None, e820())
    with pytest.raises(KernelImageError, match="XLF_KERNEL_64 not set"):
        load_linux(memory, make_bzimage(xloadflags=0x02), "", None, e820())


def test_not_enough_ram_for_init_size() -> None:
    small = GuestMemory.for_size(16 * MiB)
    with pytest.raises(KernelImageError, match=r"not enough guest RAM for the kernel .*0x1800000.*0x1000000"):
        load_linux(small, make_bzimage(), "", None, layout.e820_entries(16 * MiB))


def test_command_line_written_nul_terminated(memory: GuestMemory) -> None:
    memory.write(0x20000, b"\xff" * 64)
    info = load_linux(memory, make_bzimage(), "console=ttyS0 root=/dev/vda", None, e820())
    assert info.cmdline_addr == 0x20000
    assert info.cmdline_size == len("console=ttyS0 root=/dev/vda") + 1
    assert memory.read(0x20000, info.cmdline_size + 1) == b"console=ttyS0 root=/dev/vda\0\xff"


def test_command_line_limit_from_cmdline_size(memory: GuestMemory) -> None:
    image = make_bzimage(cmdline_size=255)
    load_linux(memory, image, "a" * 255, None, e820())
    with pytest.raises(KernelImageError, match=r"too long \(257 bytes with its NUL, the limit is 256\)"):
        load_linux(memory, image, "a" * 256, None, e820())


def test_command_line_limit_capped_by_layout(memory: GuestMemory) -> None:
    image = make_bzimage(cmdline_size=0x7FFF_FFFF)
    load_linux(memory, image, "b" * (0x10000 - 1), None, e820())
    with pytest.raises(KernelImageError, match="the limit is 65536"):
        load_linux(memory, image, "b" * 0x10000, None, e820())


def test_command_line_with_nul_is_refused(memory: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="NUL"):
        load_linux(memory, make_bzimage(), "a\0b", None, e820())


def test_initramfs_at_top_of_low_ram(memory: GuestMemory) -> None:
    initrd = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: not a page multiple
    info = load_linux(memory, make_bzimage(), "", initrd, e820())
    assert info.initramfs_size == len(initrd)
    assert info.initramfs_addr % 4096 == 0
    assert info.initramfs_addr + len(initrd) <= RAM
    assert RAM - (info.initramfs_addr + len(initrd)) < 4096  # as high as page alignment allows
    assert memory.read(info.initramfs_addr, len(initrd)) == initrd


def test_initramfs_respects_initrd_addr_max(memory: GuestMemory) -> None:
    info = load_linux(memory, make_bzimage(initrd_addr_max=0x3FF_FFFF), "", b"r" * 5000, e820())
    assert info.initramfs_addr == (0x400_0000 - 5000) & ~0xFFF


def test_initramfs_stays_below_3gib() -> None:
    big = GuestMemory(layout.ram_regions(4 * layout.GiB))  # NORESERVE: only touched pages cost memory
    entries = layout.e820_entries(4 * layout.GiB)
    info = load_linux(big, make_bzimage(initrd_addr_max=0xFFFF_FFFF), "", b"i" * 8192, entries)
    assert info.initramfs_addr == 0xC000_0000 - 8192
    assert big.read(info.initramfs_addr, 8192) == b"i" * 8192


def test_initramfs_too_large(memory: GuestMemory) -> None:
    # The kernel claims up to 24 MiB (16 MiB pref_address + 8 MiB init_size): the rest of 128 MiB fits.
    room = RAM - 0x1800000
    info = load_linux(memory, make_bzimage(), "", b"\1" * room, e820())
    assert info.initramfs_addr == 0x1800000
    with pytest.raises(KernelImageError, match=rf"initramfs too large \({room + 1} bytes; {room} bytes fit"):
        load_linux(memory, make_bzimage(), "", b"\1" * (room + 1), e820())


def test_empty_initramfs_is_refused(memory: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="initramfs is empty"):
        load_linux(memory, make_bzimage(), "", b"", e820())


def test_paths_are_read(memory: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701" + b"\0" * 200)
    info = load_linux(memory, kernel, "quiet", str(initrd), e820())
    assert memory.read(info.initramfs_addr, 6) == b"070701"
    with pytest.raises(KernelImageError, match=r"cannot read kernel .*/missing: No such file"):
        load_linux(memory, tmp_path / "missing", "", None, e820())
    with pytest.raises(KernelImageError, match="cannot read initramfs"):
        load_linux(memory, kernel, "", tmp_path / "nope.img", e820())


def test_ebda_pointer_written(memory: GuestMemory) -> None:
    load_linux(memory, make_bzimage(), "", None, e820())
    assert memory.read_u16(0x40E) == 0xA000  # segment of 0xA0000


# --- load_linux: the zero page, field by field -----------------------------------------------------


def zero_page(memory: GuestMemory) -> bytes:
    return memory.read(0x7000, 4096)


def test_zero_page_fields(memory: GuestMemory) -> None:
    image = make_bzimage()
    initrd = b"\x42" * 12345
    info = load_linux(memory, image, "console=ttyS0", initrd, e820(), rsdp_addr=0xA0000)
    zp = zero_page(memory)
    assert zp[0x210] == 0xFF  # type_of_loader
    assert zp[0x211] == 0x01 | 0x80  # LOADED_HIGH kept, CAN_USE_HEAP added
    assert u16(zp, 0x224) == 0xFE00  # heap_end_ptr
    assert u16(zp, 0x1FA) == 0xFFFF  # vid_mode "normal"
    assert u32(zp, 0x228) == 0x20000  # cmd_line_ptr
    assert u32(zp, 0x0C8) == 0  # ext_cmd_line_ptr
    assert u32(zp, 0x218) == info.initramfs_addr  # ramdisk_image
    assert u32(zp, 0x21C) == 12345  # ramdisk_size
    assert u32(zp, 0x0C0) == 0 and u32(zp, 0x0C4) == 0  # ext_ramdisk_image / size
    assert u64(zp, 0x070) == 0xA0000  # acpi_rsdp_addr
    assert info.rsdp_in_zero_page
    assert zp[0x1EF] == 0  # sentinel


def test_zero_page_carries_the_image_setup_header(memory: GuestMemory) -> None:
    image = make_bzimage()
    load_linux(memory, image, "", None, e820())
    zp = zero_page(memory)
    assert u16(zp, 0x1FE) == 0xAA55
    assert zp[0x202:0x206] == b"HdrS"
    assert u16(zp, 0x206) == 0x020F
    assert zp[0x1F1] == 4
    assert u32(zp, 0x230) == 0x200000 and zp[0x234] == 1 and u16(zp, 0x236) == 0x03
    assert u32(zp, 0x238) == 2047 and u64(zp, 0x258) == 0x1000000 and u32(zp, 0x260) == 0x800000
    # Untouched header bytes are the image's, bytes outside the header are zero.
    changed = {0x1FA, 0x1FB, 0x210, 0x211, 0x224, 0x225, *range(0x228, 0x22C)}
    for off in range(0x1F1, 0x26C):
        if off not in changed:
            assert zp[off] == image[off], hex(off)
    assert zp[0x10] == 0  # the boot sector is not copied
    assert set(zp[0x26C:0x2D0]) == {0}


def test_zero_page_e820_table(memory: GuestMemory) -> None:
    entries = e820()
    load_linux(memory, make_bzimage(), "", None, entries)
    zp = zero_page(memory)
    assert zp[0x1E8] == len(entries) == 3
    decoded = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(zp[0x1E8])]
    assert decoded == [(0, 0xA0000, 1), (0x100000, RAM - 0x100000, 1), (0xE800_0000, 0x1000_0000, 2)]
    assert set(zp[0x2D0 + 20 * 3 : 0x2D0 + 20 * 4]) == {0}


def test_zero_page_is_cleared_before_writing(memory: GuestMemory) -> None:
    memory.write(0x7000, b"\xee" * 4096)
    load_linux(memory, make_bzimage(), "", None, e820())
    zp = zero_page(memory)
    assert zp[0x1EF] == 0 and u64(zp, 0x070) == 0 and u32(zp, 0x218) == 0
    assert set(zp[0xD00:]) == {0}


def test_rsdp_skipped_before_protocol_2_14(memory: GuestMemory) -> None:
    info = load_linux(memory, make_bzimage(version=0x020D), "", None, e820(), rsdp_addr=0xA0000)
    assert not info.rsdp_in_zero_page
    assert u64(zero_page(memory), 0x070) == 0
    assert memory.read_u16(0x40E) == 0xA000  # such kernels find the RSDP through the EBDA


def test_too_many_e820_entries(memory: GuestMemory) -> None:
    entries = [(i * 0x10000, 0x1000, 1) for i in range(129)]
    with pytest.raises(ZeroPageError, match=r"too many E820 entries \(129, the zero page holds 128\)"):
        load_linux(memory, make_bzimage(), "", None, entries)
    load_linux(memory, make_bzimage(), "", None, entries[:128])
    zp = zero_page(memory)
    assert zp[0x1E8] == 128
    assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * 127) == (127 * 0x10000, 0x1000, 1)


@pytest.mark.parametrize("entry", [(-1, 10, 1), (0, 0, 1), (0, 10, 0), ((1 << 64) - 4, 8, 1)])
def test_bad_e820_entry(memory: GuestMemory, entry: tuple[int, int, int]) -> None:
    with pytest.raises(ZeroPageError, match="invalid E820 entry"):
        load_linux(memory, make_bzimage(), "", None, [entry])


# --- a real kernel, when the lab cache has one -----------------------------------------------------


def _cached_kernels() -> list[Path]:
    cache = Path(os.environ.get("PYVMM_CACHE", Path.home() / ".cache" / "pyvmm")) / "assets"
    if not cache.is_dir():
        return []
    return sorted(p for p in cache.rglob("vmlinuz*") if p.is_file())


@pytest.mark.skipif(not _cached_kernels(), reason="no kernel in the lab cache ($PYVMM_CACHE/assets)")
def test_real_debian_kernel(memory: GuestMemory) -> None:
    path = _cached_kernels()[0]
    image = parse_bzimage(path.read_bytes())
    hdr = image.header
    assert hdr.version >= 0x020C and hdr.has_64bit_entry and hdr.relocatable
    assert hdr.kernel_version and hdr.kernel_version[0].isdigit()
    big = GuestMemory.for_size(512 * MiB)
    info = load_linux(big, path, "console=ttyS0", b"\0" * 4096, layout.e820_entries(512 * MiB))
    assert info.entry_point == 0x100200
    assert info.kernel_end > info.kernel_load_addr + len(image.kernel)
    assert big.read(0x100000, 64) == bytes(image.kernel[:64])
