"""Fuzz target: the ACPI power-management registers (sleep control, sleep status, reset) at any offset/width.

Port I/O reaches the device with offsets 0..7 of its 8-byte range and widths 1, 2 and 4 (8 for an MMIO
variant); wider accesses act byte by byte and may run past the end. The model says exactly when the guest
powers off or resets, and what every byte reads.
"""

from __future__ import annotations

from hypothesis import strategies as st

from pyvmm import layout
from pyvmm.devices.acpi_pm import AcpiPmDevice

ACCESSES = st.lists(
    st.tuples(
        st.integers(0, layout.ACPI_PM_SIZE - 1),
        st.sampled_from([1, 2, 4, 8]),
        st.one_of(
            st.integers(0, (1 << 64) - 1),
            st.sampled_from([0x34, 0x20, 0x14, 0x3C, 0x01, 0x80, 0x0134, 0x01_0000]),  # S5, SLP_EN, reset...
        ),
        st.booleans(),
    ),
    max_size=40,
)


def run_accesses(accesses: list[tuple[int, int, int, bool]]) -> None:
    events: list[str] = []
    pm = AcpiPmDevice(on_poweroff=lambda: events.append("off"), on_reset=lambda: events.append("reset"))
    expected: list[str] = []
    for offset, size, value, write in accesses:
        value &= (1 << (8 * size)) - 1
        if write:
            pm.write(offset, size, value)
            for i in range(size):
                reg, byte = offset + i, (value >> (8 * i)) & 0xFF
                if reg == 0 and byte & 0x20 and (byte >> 2) & 7 == 5:
                    expected.append("off")
                elif reg == 2 and byte == 0x01:
                    expected.append("reset")
        else:
            got = pm.read(offset, size)
            for i in range(size):
                reg = offset + i
                want = 0xFF if reg >= layout.ACPI_PM_SIZE else 0x00  # nothing ever sets WAK_STS
                assert (got >> (8 * i)) & 0xFF == want, f"byte {reg} of {got:#x}"
        assert events == expected


__all__ = ["ACCESSES", "run_accesses"]
