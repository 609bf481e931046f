"""Loading "a kernel": a bzImage (64-bit boot protocol) or an ELF vmlinux (PVH entry), told apart by the
file's first bytes, never by its name (docs/boot.md)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from pyvmm import layout
from pyvmm.boot.bootparams import HEADER_MAGIC, Hdr
from pyvmm.boot.bzimage import KernelImageError, load_linux, parse_bzimage
from pyvmm.boot.cpu import BootVcpuState, setup_boot_vcpu, setup_pvh_boot_vcpu
from pyvmm.boot.elf import ELF_MAGIC, ImageFile, open_image, parse_elf_kernel
from pyvmm.boot.pvh import check_segments, load_pvh
from pyvmm.boot.zeropage import E820Entry
from pyvmm.memory import GuestMemory

Source = bytes | bytearray | memoryview | str | os.PathLike[str]


class KernelFormat(Enum):
    BZIMAGE = "bzImage"
    PVH_ELF = "ELF vmlinux (PVH)"


@dataclass(frozen=True)
class LoadedKernel:
    """What the boot vCPU needs: the entry point and the boot structure it is handed (bzImage: the zero
    page in %rsi; PVH: the hvm_start_info in %ebx)."""

    format: KernelFormat
    entry_point: int
    boot_data: int
    version: str | None = None


def kernel_format(head: bytes | memoryview, size: int) -> KernelFormat:
    """The format of an image whose first bytes are `head` (at least 0x206 of them when the file has)."""
    if bytes(head[:4]) == ELF_MAGIC:
        return KernelFormat.PVH_ELF
    if bytes(head[Hdr.HEADER : Hdr.HEADER + 4]) == HEADER_MAGIC:
        return KernelFormat.BZIMAGE
    if size < Hdr.HEADER + 4:
        raise KernelImageError(f"not a Linux kernel (file is only {size} bytes)")
    raise KernelImageError("not a Linux kernel (neither an ELF vmlinux nor a bzImage: no ELF or HdrS magic)")


def check_kernel(path: str | os.PathLike[str], ram_size: int | None = None) -> KernelFormat:
    """Parse a kernel file's headers (no loading) and return its format, or raise KernelImageError; with
    `ram_size`, an ELF's segments must also fit that guest's RAM (layout.ram_regions)."""
    f, size = open_image(path)
    with f:
        image = ImageFile(f, size)
        fmt = kernel_format(image.read(0, min(size, Hdr.HEADER + 4), "the header"), size)
        if fmt is KernelFormat.PVH_ELF:
            elf = parse_elf_kernel(image)
            if ram_size is not None:
                check_segments(elf, layout.ram_regions(ram_size))
        else:
            parse_bzimage(image.read(0, size, "the bzImage"))
    return fmt


def load_kernel(
    memory: GuestMemory,
    kernel: Source,
    cmdline: str,
    initramfs: Source | None,
    e820: Sequence[E820Entry | tuple[int, int, int]],
    rsdp_addr: int | None = None,
) -> LoadedKernel:
    """Load a bzImage or an ELF vmlinux with its command line and initramfs; see load_linux and load_pvh."""
    if isinstance(kernel, (bytes, bytearray, memoryview)):
        return _load(memory, ImageFile.of_bytes(kernel), cmdline, initramfs, e820, rsdp_addr)
    f, size = open_image(kernel)
    with f:
        return _load(memory, ImageFile(f, size), cmdline, initramfs, e820, rsdp_addr)


def _load(memory: GuestMemory, image: ImageFile, cmdline: str, initramfs: Source | None,
          e820: Sequence[E820Entry | tuple[int, int, int]], rsdp_addr: int | None) -> LoadedKernel:
    fmt = kernel_format(image.read(0, min(image.size, Hdr.HEADER + 4), "the header"), image.size)
    if fmt is KernelFormat.PVH_ELF:
        pvh = load_pvh(memory, image, cmdline, initramfs, e820, rsdp_addr)
        return LoadedKernel(fmt, pvh.entry_point, pvh.start_info)
    info = load_linux(memory, image.read(0, image.size, "the bzImage"), cmdline, initramfs, e820, rsdp_addr)
    return LoadedKernel(fmt, info.entry_point, info.zero_page, info.kernel_version)


def boot_vcpu_state(memory: GuestMemory, kernel: LoadedKernel) -> BootVcpuState:
    """The boot vCPU's entry state for `kernel` (writing the GDT/IDT and, for long mode, page tables)."""
    if kernel.format is KernelFormat.PVH_ELF:
        return setup_pvh_boot_vcpu(memory, kernel.entry_point, kernel.boot_data)
    return setup_boot_vcpu(memory, kernel.entry_point, kernel.boot_data)
