"""The uncompressed ELF vmlinux inside a bzImage, for booting the lab kernel through PVH (docs/boot.md).

A bzImage's setup header says where its compressed kernel is (payload_offset, from the start of the
protected-mode part, and payload_length); the compressor is told by the payload's magic bytes.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import zlib
from enum import Enum

from pyvmm.boot.bootparams import Hdr
from pyvmm.boot.bzimage import KernelImageError, parse_setup_header
from pyvmm.boot.elf import ELF_MAGIC
from pyvmm.errors import PyvmmError


class Compressor(Enum):
    """The kernel's CONFIG_KERNEL_* choices, by the magic bytes their streams start with."""

    GZIP = b"\x1f\x8b"
    XZ = b"\xfd7zXZ\x00"
    ZSTD = b"\x28\xb5\x2f\xfd"
    BZIP2 = b"BZh"
    LZMA = b"\x5d\x00\x00"
    LZ4 = b"\x02\x21\x4c\x18"
    LZO = b"\x89LZO"


class VmlinuxError(PyvmmError):
    """The bzImage's payload cannot be turned into a vmlinux here."""


def compressed_payload(bzimage: bytes | memoryview) -> memoryview:
    """The compressed kernel a bzImage carries (protocol 2.08 and later)."""
    header = parse_setup_header(bzimage)
    if header.version < 0x0208:
        raise KernelImageError(f"boot protocol {header.version_str} has no payload_offset (2.08+)")
    offset, length = struct.unpack_from("<II", bzimage, Hdr.PAYLOAD_OFFSET)
    start = header.setup_size + offset
    if length == 0 or start + length > len(bzimage):
        raise KernelImageError(f"payload {start:#x}+{length:#x} is not inside the {len(bzimage)}-byte file")
    return memoryview(bzimage)[start : start + length]


def compressor(payload: bytes | memoryview) -> Compressor:
    head = bytes(payload[:8])
    for kind in Compressor:
        if head.startswith(kind.value):
            return kind
    raise VmlinuxError(f"unknown compression of the kernel payload (starts with {head.hex()})")


def decompress(payload: bytes | memoryview) -> bytes:
    """Decompress a kernel payload (the kernel build appends a 4-byte size after the stream: ignored)."""
    kind = compressor(payload)
    try:
        if kind is Compressor.XZ:
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if kind is Compressor.GZIP:
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if kind is Compressor.ZSTD and shutil.which("zstd"):
            # Python 3.11 has no zstd; Debian's `zstd` tool does (Debian's kernels use xz today).
            proc = subprocess.run(["zstd", "-dcq"], input=bytes(payload), capture_output=True)
            if proc.stdout:
                return proc.stdout
            raise VmlinuxError(f"zstd failed: {proc.stderr.decode(errors='replace').strip()}")
    except (lzma.LZMAError, zlib.error) as exc:
        raise VmlinuxError(f"cannot decompress the {kind.name} kernel payload: {exc}") from exc
    raise VmlinuxError(f"{kind.name}-compressed kernels are not supported (gzip, xz; zstd with its tool)")


def extract_vmlinux(bzimage: bytes | memoryview) -> bytes:
    """The ELF vmlinux a bzImage was made from."""
    vmlinux = decompress(compressed_payload(bzimage))
    if not vmlinux.startswith(ELF_MAGIC):
        raise VmlinuxError("the decompressed kernel payload is not an ELF file")
    return vmlinux
