"""ELF vmlinux loading for the PVH entry, on crafted files: format detection, segment placement, the
hvm_start_info bytes, the 32-bit entry state, and every bad file refused in one line (exit status 2).

Offsets are the literal numbers of <elf.h> and Xen's arch-x86/hvm/start_info.h, so that a wrong layout in
pyvmm.boot cannot hide itself.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_boot_bzimage import make_bzimage

from pyvmm import layout
from pyvmm.boot import (
    KernelFormat,
    KernelImageError,
    boot_vcpu_state,
    check_kernel,
    load_kernel,
)
from pyvmm.boot.cpu import read_gdt_segment
from pyvmm.errors import ExitStatus
from pyvmm.lab.vmlinux import VmlinuxError, extract_vmlinux
from pyvmm.memory import GuestMemory

MiB = layout.MiB
RAM = 128 * MiB
ENTRY = 0x100_0040
KERNEL_TEXT = bytes(range(256)) * 16  # 4 KiB at 16 MiB
KERNEL_DATA = b"DATA" * 256  # 1 KiB at 17 MiB, then 3 KiB of bss


def _note(owner: bytes, type_: int, desc: bytes) -> bytes:
    name = owner + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), type_) + pad(name) + pad(desc)


def make_elf(
    *,
    ei_class: int = 2,
    machine: int = 62,
    segments: list[tuple[int, bytes, int]] | None = None,
    entry_note: bytes | None = struct.pack("<Q", ENTRY),
    extra_notes: bytes = _note(b"GNU", 3, b"\x01" * 20) + _note(b"Xen", 6, b"linux\0"),
) -> bytes:
    """An ELF64 executable: the given (paddr, bytes, memsz) PT_LOAD segments and a PT_NOTE segment."""
    if segments is None:
        segments = [(0x100_0000, KERNEL_TEXT, len(KERNEL_TEXT)), (0x110_0000, KERNEL_DATA, 4096)]
    notes = extra_notes + (_note(b"Xen", 18, entry_note) if entry_note is not None else b"")
    phnum = len(segments) + 1
    data_offset = 64 + phnum * 56
    body = bytearray()
    phdrs = bytearray()
    for paddr, data, memsz in segments:
        offset = data_offset + len(body)
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, offset, 0xFFFF_FFFF_0000_0000 | paddr, paddr, len(data),
                             memsz, 0x1000)
        body += data
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_offset + len(body), 0, 0, len(notes), len(notes), 4)
    body += notes
    ident = b"\x7fELF" + bytes([ei_class, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0xFFFF_FFFF_8100_0000, 64, 0, 0, 64, 56,
                               phnum, 64, 0, 0)
    return ehdr + bytes(phdrs) + bytes(body)


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory.for_size(RAM)


def _load(memory: GuestMemory, kernel: bytes, initramfs: bytes | None = b"INITRAMFS" * 100,
          cmdline: str = "console=ttyS0 panic=-1"):
    return load_kernel(memory, kernel, cmdline, initramfs, layout.e820_entries(RAM), rsdp_addr=0xA0000)


# --- a good vmlinux ------------------------------------------------------------------------------


def test_segments_loaded_at_their_physical_addresses(memory: GuestMemory) -> None:
    memory.write(0x110_0000 + len(KERNEL_DATA), b"\xff" * 16)  # the bss must come out zeroed
    kernel = _load(memory, make_elf())
    assert kernel.format is KernelFormat.PVH_ELF
    assert kernel.entry_point == ENTRY and kernel.boot_data == layout.PVH_START_INFO_START == 0x6000
    assert memory.read(0x100_0000, len(KERNEL_TEXT)) == KERNEL_TEXT
    assert memory.read(0x110_0000, len(KERNEL_DATA)) == KERNEL_DATA
    assert memory.read(0x110_0000 + len(KERNEL_DATA), 4096 - len(KERNEL_DATA)) == bytes(3072)


def test_hvm_start_info_bytes(memory: GuestMemory) -> None:
    initramfs = b"INITRAMFS" * 100
    _load(memory, make_elf(), initramfs)
    info = memory.read(0x6000, 56)
    magic, version, flags, nr_modules = struct.unpack_from("<IIII", info, 0)
    modlist, cmdline, rsdp, memmap = struct.unpack_from("<QQQQ", info, 16)
    entries, reserved = struct.unpack_from("<II", info, 48)
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert (cmdline, rsdp, reserved) == (layout.CMDLINE_START, 0xA0000, 0)
    assert memory.read(cmdline, 23) == b"console=ttyS0 panic=-1\0"
    # the initramfs is the one module, page aligned at the top of RAM
    paddr, size, mod_cmdline, mod_reserved = struct.unpack_from("<QQQQ", memory.read(modlist, 32))
    assert (size, mod_cmdline, mod_reserved) == (len(initramfs), 0, 0)
    assert paddr % 4096 == 0 and RAM - 4096 <= paddr < RAM - len(initramfs) + 1
    assert memory.read(paddr, size) == initramfs
    # the memory map is the E820 map, 24 bytes an entry
    e820 = layout.e820_entries(RAM)
    assert entries == len(e820)
    raw = memory.read(memmap, 24 * entries)
    assert [struct.unpack_from("<QQII", raw, 24 * i) for i in range(entries)] == [(*e, 0) for e in e820]


def test_no_initramfs_means_no_module(memory: GuestMemory) -> None:
    _load(memory, make_elf(), initramfs=None)
    nr_modules, modlist = struct.unpack_from("<IQ", memory.read(0x6000 + 12, 12))
    assert (nr_modules, modlist) == (0, 0)


def test_a_4_byte_entry_note_is_read_too(memory: GuestMemory) -> None:
    assert _load(memory, make_elf(entry_note=struct.pack("<I", ENTRY))).entry_point == ENTRY


def test_pvh_entry_state(memory: GuestMemory) -> None:
    kernel = _load(memory, make_elf())
    state = boot_vcpu_state(memory, kernel)
    assert state.regs.rip == ENTRY and state.regs.rbx == 0x6000
    assert state.regs.rflags & (1 << 9 | 1 << 8 | 1 << 17) == 0  # IF, TF, VM clear
    sregs = state.sregs
    assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31)  # protected mode, paging off
    assert sregs.cr4 == 0 and sregs.efer == 0
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        flat_32bit = (0, 0xFFFF_FFFF, True, True, False, True)
        assert (seg.base, seg.limit, seg.g, seg.db, seg.l, seg.present) == flat_32bit
    assert sregs.cs.type & 0x8 and not sregs.ds.type & 0x8  # code, data
    assert (sregs.tr.base, sregs.tr.limit, sregs.tr.type) == (0, 0x67, 0xB)  # busy 32-bit TSS
    # the segments are also what the GDT in guest memory says, should the kernel reload them
    assert read_gdt_segment(memory, sregs.gdt, sregs.cs.selector) == sregs.cs
    assert read_gdt_segment(memory, sregs.gdt, sregs.ds.selector) == sregs.ds


def test_bzimage_still_detected_and_loaded(memory: GuestMemory, tmp_path: Path) -> None:
    image = make_bzimage()
    kernel = _load(memory, image)
    assert kernel.format is KernelFormat.BZIMAGE and kernel.boot_data == layout.ZERO_PAGE_START
    assert boot_vcpu_state(memory, kernel).sregs.efer & (1 << 10)  # long mode
    path = tmp_path / "vmlinux"  # the name says nothing: the bytes do
    path.write_bytes(image)
    assert check_kernel(path) is KernelFormat.BZIMAGE
    path = tmp_path / "bzImage"
    path.write_bytes(make_elf())
    assert check_kernel(path, RAM) is KernelFormat.PVH_ELF


def test_loading_from_a_file(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(make_elf())
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"X" * 5000)
    kernel = load_kernel(memory, path, "", initrd, layout.e820_entries(RAM))
    assert kernel.entry_point == ENTRY
    assert memory.read(0x100_0000, len(KERNEL_TEXT)) == KERNEL_TEXT


# --- bad files -----------------------------------------------------------------------------------

GOOD = make_elf()

BAD = {
    "no PVH note": (make_elf(entry_note=None), "no PVH entry point"),
    "32-bit": (make_elf(ei_class=1), "32-bit ELF"),
    "not x86-64": (make_elf(machine=183), "not for x86-64"),
    "truncated header": (GOOD[:40], "truncated"),
    "truncated program headers": (GOOD[:100], "truncated"),
    "truncated segment": (GOOD[: 64 + 3 * 56 + 1000], "truncated"),
    "neither ELF nor bzImage": (b"MZ" + bytes(4094), "neither an ELF vmlinux nor a bzImage"),
    "tiny": (b"\x7fEL", "only 3 bytes"),
    "empty": (b"", "only 0 bytes"),
    "outside RAM": (make_elf(segments=[(RAM - 0x1000, KERNEL_TEXT, 0x2000)],
                             entry_note=struct.pack("<Q", RAM - 0x1000)), "outside guest RAM"),
    "in the 32-bit hole": (make_elf(segments=[(0xD000_0000, KERNEL_TEXT, 0x1000)],
                                    entry_note=struct.pack("<Q", 0xD000_0000)), "outside guest RAM"),
    "over the boot structures": (make_elf(segments=[(0x6000, KERNEL_TEXT, 0x1000)],
                                          entry_note=struct.pack("<Q", 0x6000)), "boot structures"),
    "entry outside segments": (make_elf(entry_note=struct.pack("<Q", 0x300_0000)), "not inside a loaded"),
    "overlapping segments": (make_elf(segments=[(0x100_0000, KERNEL_TEXT, 0x2000),
                                                (0x100_1000, KERNEL_DATA, 0x1000)]), "overlap"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_refused_in_one_line(memory: GuestMemory, tmp_path: Path, case: str) -> None:
    data, words = BAD[case]
    with pytest.raises(KernelImageError) as exc:
        _load(memory, data)
    message = str(exc.value)
    assert words in message and "\n" not in message, message
    assert exc.value.exit_status == ExitStatus.USAGE
    path = tmp_path / "kernel"
    path.write_bytes(data)
    with pytest.raises(KernelImageError) as exc:  # the check before KVM finds it too
        check_kernel(path, RAM)
    assert words in str(exc.value)


def test_initramfs_that_does_not_fit_is_refused(memory: GuestMemory) -> None:
    elf = make_elf(segments=[(0x100_0000, KERNEL_TEXT, RAM - 0x100_0000 - 0x1000)])
    with pytest.raises(KernelImageError, match="initramfs too large"):
        _load(memory, elf, initramfs=b"x" * 0x2000)


def _pyvmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("elf", "words"),
    [
        (make_elf(entry_note=None), "no PVH entry point"),
        # RAM is checked against --memory before KVM is opened
        (make_elf(segments=[(0x1000_0000, KERNEL_TEXT, 0x1000)], entry_note=struct.pack("<Q", 0x1000_0000)),
         "outside guest RAM (128 MiB)"),
    ],
    ids=["no-note", "beyond-memory"],
)
def test_cli_refuses_a_bad_elf_with_exit_2(tmp_path: Path, elf: bytes, words: str) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(elf)
    proc = _pyvmm("--kernel", str(path), "--memory", "size=128M", "--dry-run")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pyvmm: --kernel {path}: "), proc.stderr
    assert words in lines[0] and "Traceback" not in proc.stderr


def test_cli_accepts_a_vmlinux(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(make_elf())
    proc = _pyvmm("--kernel", str(path), "--memory", "size=128M", "--dry-run")
    assert proc.returncode == 0, proc.stderr


# --- the lab's vmlinux, out of a bzImage ---------------------------------------------------------


def _bzimage_carrying(payload: bytes) -> bytes:
    image = bytearray(make_bzimage(payload=payload))
    struct.pack_into("<II", image, 0x248, 0, len(payload))  # payload_offset, payload_length
    return bytes(image)


@pytest.mark.parametrize("compress", [lambda b: lzma.compress(b, format=lzma.FORMAT_XZ), gzip.compress],
                         ids=["xz", "gzip"])
def test_extract_vmlinux(compress) -> None:
    # the kernel build appends the uncompressed size after the stream
    payload = compress(GOOD) + struct.pack("<I", len(GOOD))
    assert extract_vmlinux(_bzimage_carrying(payload)) == GOOD


def test_extract_vmlinux_refuses_unknown_compression() -> None:
    with pytest.raises(VmlinuxError, match="unknown compression"):
        extract_vmlinux(_bzimage_carrying(b"\x00\x01\x02\x03" * 8))
