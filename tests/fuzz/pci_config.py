"""Fuzz target: one PciConfiguration byte by byte, at every offset and width, against a byte model.

The model knows which header bits a guest may change (command bits, cache line size, latency timer,
interrupt line, the writable bytes of a plain capability) and that everything else outside BAR registers
and emulated capability bodies is read-only; reads outside the 4 KiB space answer all-ones and writes there
are dropped. BAR registers are checked only for their type bits here (the platform target checks moves).
"""

from __future__ import annotations

from hypothesis import strategies as st

from fuzz.sinks import RecordingSink
from pyvmm.pci.bar import BarKind
from pyvmm.pci.config import CONFIG_SPACE_SIZE, InterruptPin, PciConfiguration
from pyvmm.pci.msi import MsiCapability

COMMAND_WRITABLE = 0x0547  # I/O, memory, bus master, parity error response, SERR#, INTx disable
BAR_BYTES = set(range(0x10, 0x20)) | set(range(0x30, 0x34))  # implemented ones (0x20-0x27 are not)

ACCESSES = st.lists(
    st.tuples(
        st.booleans(),
        st.one_of(
            st.integers(0, 0x70),
            st.integers(0, 0x100),
            st.integers(-8, CONFIG_SPACE_SIZE + 8),
            st.sampled_from([0x04, 0x06, 0x0C, 0x3C, 0x34, 0xFFC, 0xFFF]),
        ),
        st.sampled_from([1, 2, 4, 1, 2, 4, 3, 8, 0, -1]),
        st.integers(0, (1 << 64) - 1),
    ),
    max_size=120,
)
VENDOR_BODY = st.binary(min_size=1, max_size=20)


def build(vendor_body: bytes, writable: bytes) -> tuple[PciConfiguration, bytearray, bytearray, range]:
    """A config with every BAR kind, a vendor capability and an MSI capability; (config, image, mask, msi)."""
    c = PciConfiguration(
        0x8086, 0x1234, 0x02, 0x00, prog_if=1, revision_id=3, interrupt_pin=InterruptPin.INTA
    )
    c.add_bar(0, BarKind.IO, 0x20, address=0xFFE0)
    c.add_bar(1, BarKind.MEM32, 4096, address=0xC000_0000)
    c.add_bar(2, BarKind.MEM64, 1 << 33, prefetchable=True, address=0x4_0000_0000)
    c.add_bar(6, BarKind.ROM, 1 << 16, address=0xC001_0000)
    vendor = c.add_capability(0x09, vendor_body, writable)
    msi = MsiCapability(RecordingSink("cfg-msi"), 4)
    msi_at = c.add_capability_handler(msi)
    image = bytearray(c.peek(i, 1) for i in range(CONFIG_SPACE_SIZE))
    mask = bytearray(CONFIG_SPACE_SIZE)
    mask[0x04:0x06] = COMMAND_WRITABLE.to_bytes(2, "little")
    mask[0x0C] = mask[0x0D] = mask[0x3C] = 0xFF
    mask[vendor + 2 : vendor + 2 + len(writable)] = writable
    return c, image, mask, range(msi_at + 2, msi_at + msi.length)


def run_accesses(vendor_body: bytes, writable: bytes, accesses: list[tuple[bool, int, int, int]]) -> None:
    c, image, mask, emulated = build(vendor_body, writable)
    for write, offset, size, value in accesses:
        inside = size > 0 and offset >= 0 and offset + size <= CONFIG_SPACE_SIZE
        if write:
            value &= (1 << (8 * max(size, 0))) - 1
            c.write(offset, size, value)
            if inside:
                for i in range(size):
                    pos, byte = offset + i, (value >> (8 * i)) & 0xFF
                    if pos not in BAR_BYTES and pos not in emulated:
                        image[pos] = (image[pos] & ~mask[pos] & 0xFF) | (byte & mask[pos])
        else:
            got = c.read(offset, size)
            if not inside:
                assert got == (1 << (8 * max(size, 0))) - 1, f"read {offset:#x}+{size} gave {got:#x}"
                continue
            assert 0 <= got < 1 << (8 * size)
            for i in range(size):
                pos = offset + i
                if pos not in BAR_BYTES and pos not in emulated:
                    assert (got >> (8 * i)) & 0xFF == image[pos], (
                        f"byte {pos:#x}: {got:#x} vs {image[pos]:#x}"
                    )
    # Finally every dword, as a guest dumping the whole space (lspci -xxxx) would read it.
    for offset in range(0, CONFIG_SPACE_SIZE, 4):
        got = c.read(offset, 4)
        for i in range(4):
            pos = offset + i
            if pos not in BAR_BYTES and pos not in emulated:
                assert (got >> (8 * i)) & 0xFF == image[pos], f"byte {pos:#x}: {got:#x} vs {image[pos]:#x}"
    # Type bits of every BAR survived whatever was written.
    assert c.read(0x10, 4) & 0x3 == 0x1
    assert c.read(0x14, 4) & 0xF == 0x0
    assert c.read(0x18, 4) & 0xF == 0xC
    assert c.read(0x30, 4) & 0x7FF == 0x0
    assert [cap_id for _, cap_id in c.capabilities()] == [0x09, 0x05]


__all__ = ["ACCESSES", "VENDOR_BODY", "run_accesses"]
