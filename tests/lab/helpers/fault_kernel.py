"""Write a minimal bzImage whose 64-bit entry point executes `ud2` with no usable IDT: a triple fault."""

from __future__ import annotations

import struct
import sys


def fault_kernel() -> bytes:
    setup_sects = 1
    setup = bytearray(512 * (setup_sects + 1))
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = b"\xeb\x66"  # jmp over the header, which ends at 0x268
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)  # boot protocol 2.15
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, 0x7FFF_FFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment
    setup[0x234] = 1  # relocatable
    setup[0x235] = 21  # min_alignment (log2)
    struct.pack_into("<H", setup, 0x236, 0x3)  # xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    struct.pack_into("<I", setup, 0x238, 2048)  # cmdline_size
    struct.pack_into("<I", setup, 0x260, 0x100000)  # init_size
    kernel = bytearray(0x1000)
    kernel[0x200:0x202] = b"\x0f\x0b"  # ud2 at the 64-bit entry point
    struct.pack_into("<I", setup, 0x1F4, len(kernel) // 16)  # syssize
    return bytes(setup + kernel)


if __name__ == "__main__":
    with open(sys.argv[1], "wb") as f:
        f.write(fault_kernel())
