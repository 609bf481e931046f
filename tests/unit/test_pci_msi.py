"""MSI and MSI-X emulation: register layout, routing reports, masking, pending bits, address checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm import layout
from pyvmm.pci.config import PciConfiguration
from pyvmm.pci.msi import (
    MSI_CAP_ID,
    MSIX_CAP_ID,
    MsiCapability,
    MsiMessage,
    MsixCapability,
)

ADDR = 0xFEE0_1000
BAD_ADDR = 0xFED0_0000


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def vector_changed(self, vector: int, message: MsiMessage | None) -> None:
        self.events.append(("vector", vector, message))

    def enable_changed(self, enabled: bool, count: int) -> None:
        self.events.append(("enable", enabled, count))

    def signal(self, vector: int, message: MsiMessage) -> None:
        self.events.append(("signal", vector, message))

    def take(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


# ---- MSI ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address_64", "pvm", "length"),
    [(False, False, 10), (True, False, 14), (False, True, 20), (True, True, 24)],
)
def test_msi_layout_lengths(address_64: bool, pvm: bool, length: int) -> None:
    cap = MsiCapability(Sink(), 1, address_64, pvm)
    assert cap.length == length
    assert cap.read(0, 1) == MSI_CAP_ID
    control = cap.read(2, 2)
    assert bool(control & 0x80) == address_64
    assert bool(control & 0x100) == pvm


def test_msi_enable_routes_then_reports_enable() -> None:
    sink = Sink()
    cap = MsiCapability(sink, 1, address_64=True, per_vector_mask=False)
    cap.write(4, 4, ADDR | 0x3)  # low two bits are read-only zero
    cap.write(8, 4, 0)
    cap.write(0xC, 2, 0x41)
    assert sink.take() == []
    cap.write(2, 2, 0x1)
    msg = MsiMessage(ADDR, 0x41)
    assert sink.take() == [("vector", 0, msg), ("enable", True, 1)]
    assert cap.fire(0) == msg
    cap.write(0, 4, 0)  # control in the upper half of the first dword
    assert sink.take() == [("vector", 0, None), ("enable", False, 0)]
    assert cap.fire(0) is None


def test_msi_byte_writes_are_accepted() -> None:
    sink = Sink()
    cap = MsiCapability(sink, 1, address_64=False, per_vector_mask=True)
    for i, byte in enumerate(ADDR.to_bytes(4, "little")):
        cap.write(4 + i, 1, byte)
    cap.write(8, 1, 0x22)
    cap.write(9, 1, 0x00)
    cap.write(2, 1, 0x01)
    assert sink.take() == [("vector", 0, MsiMessage(ADDR, 0x22)), ("enable", True, 1)]


def test_msi_read_only_control_bits() -> None:
    cap = MsiCapability(Sink(), 4, address_64=True, per_vector_mask=True)
    before = cap.read(2, 2)
    cap.write(2, 2, 0xFFFF)
    after = cap.read(2, 2)
    assert after & 0x18E == before & 0x18E  # MMC, 64-bit, per-vector mask unchanged
    assert after & 0x71 == 0x71
    assert cap.read(0, 2) == MSI_CAP_ID


def test_msi_multiple_vectors_get_distinct_data() -> None:
    sink = Sink()
    cap = MsiCapability(sink, 8, address_64=False, per_vector_mask=False)
    cap.write(4, 4, ADDR)
    cap.write(8, 2, 0x40)
    cap.write(2, 2, (2 << 4) | 1)  # MME = 2: four vectors
    events = sink.take()
    assert events[:-1] == [("vector", v, MsiMessage(ADDR, 0x40 | v)) for v in range(4)]
    assert events[-1] == ("enable", True, 4)
    assert cap.fire(4) is None  # not granted


def test_msi_mme_clamped_to_capable_count() -> None:
    sink = Sink()
    cap = MsiCapability(sink, 2, address_64=False, per_vector_mask=False)
    cap.write(4, 4, ADDR)
    cap.write(2, 2, (5 << 4) | 1)
    assert sink.take()[-1] == ("enable", True, 2)


def test_msi_per_vector_mask_and_pending() -> None:
    sink = Sink()
    cap = MsiCapability(sink, 1, address_64=True, per_vector_mask=True)
    cap.write(4, 4, ADDR)
    cap.write(0xC, 2, 0x33)
    cap.write(0x10, 4, 1)  # mask vector 0 before enabling
    cap.write(2, 2, 1)
    assert sink.take() == [("enable", True, 1)]
    assert cap.fire(0) is None
    assert cap.read(0x14, 4) == 1  # pending bit
    cap.write(0x14, 4, 0)  # pending bits are read-only
    assert cap.read(0x14, 4) == 1
    cap.write(0x10, 1, 0)
    msg = MsiMessage(ADDR, 0x33)
    assert sink.take() == [("vector", 0, msg), ("signal", 0, msg)]
    assert cap.read(0x14, 4) == 0
    cap.write(0x10, 4, 0xFFFF_FFFF)
    assert cap.read(0x10, 4) == 1  # only implemented vectors have mask bits
    assert sink.take() == [("vector", 0, None)]


def test_msi_address_outside_window_is_never_routed() -> None:
    sink = Sink()
    cap = MsiCapability(sink, 1, address_64=True, per_vector_mask=True)
    cap.write(4, 4, BAD_ADDR)
    cap.write(2, 2, 1)
    assert sink.take() == [("enable", True, 1)]
    assert cap.fire(0) is None
    cap.write(8, 4, 1)  # high dword set: still outside
    cap.write(4, 4, ADDR)
    assert sink.take() == []
    cap.write(8, 4, 0)
    msg = MsiMessage(ADDR, 0)
    assert sink.take() == [("vector", 0, msg), ("signal", 0, msg)]


def test_msi_from_control_and_config_integration() -> None:
    sink = Sink()
    cap = MsiCapability.from_control(0x0186, sink)  # MMC=3 (8 vectors), 64-bit, per-vector mask
    assert (cap.vectors, cap.address_64, cap.per_vector_mask) == (8, True, True)
    config = PciConfiguration(0x1234, 0x5678, 0xFF, 0x00)
    off = config.add_capability_handler(cap)
    assert config.read(off, 4) == (0x0186 << 16) | MSI_CAP_ID
    config.write(off + 4, 8, ADDR)
    config.write(off + 0xC, 4, 0x55)
    config.write(off, 4, 0x1 << 16)
    assert sink.take() == [("vector", 0, MsiMessage(ADDR, 0x55)), ("enable", True, 1)]


def test_msi_reset_disables() -> None:
    sink = Sink()
    cap = MsiCapability(sink, 1, address_64=False, per_vector_mask=False)
    cap.write(4, 4, ADDR)
    cap.write(2, 2, 1)
    sink.take()
    cap.reset()
    assert sink.take() == [("vector", 0, None), ("enable", False, 0)]
    assert cap.read(4, 4) == 0


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(-2, 26), st.integers(0, 5), st.integers(0, 2**40)), max_size=40),
    fires=st.lists(st.integers(-1, 33), max_size=5),
)
def test_msi_random_writes_never_raise_and_only_route_valid_addresses(
    ops: list[tuple[int, int, int]], fires: list[int]
) -> None:
    sink = Sink()
    cap = MsiCapability(sink, 4, address_64=True, per_vector_mask=True)
    for offset, size, value in ops:
        cap.write(offset, size, value)
        cap.read(offset, size)
    for vector in fires:
        msg = cap.fire(vector)
        assert msg is None or layout.MSI_WINDOW_START <= msg.address < 0xFEF0_0000
    for event in sink.events:
        if event[0] == "vector" and event[2] is not None:
            assert layout.MSI_WINDOW_START <= event[2].address < 0xFEF0_0000
    assert cap.read(2, 2) & 0x18E == 0x184  # MMC=2 (4 vectors), 64-bit, PVM


# ---- MSI-X ----------------------------------------------------------------------------------------------


def program(cap: MsixCapability, vector: int, address: int, data: int, masked: bool) -> None:
    base = 16 * vector
    cap.table_write(base, 8, address)
    cap.table_write(base + 8, 8, data | (int(masked) << 32))


def test_msix_capability_registers() -> None:
    cap = MsixCapability(Sink(), 64, table_bir=2, table_offset=0x2000, pba_bir=4, pba_offset=0x800)
    assert cap.read(0, 4) == (63 << 16) | MSIX_CAP_ID
    assert cap.read(4, 4) == 0x2002
    assert cap.read(8, 4) == 0x804
    assert (cap.table_length, cap.pba_length) == (1024, 8)
    cap.write(4, 4, 0)  # offsets are read-only
    assert cap.read(4, 4) == 0x2002
    cap.write(2, 2, 0xFFFF)
    assert cap.read(2, 2) == 0xC000 | 63


def test_msix_entries_start_masked() -> None:
    sink = Sink()
    cap = MsixCapability(sink, 4)
    assert [cap.table_read(16 * v + 12, 4) for v in range(4)] == [1] * 4
    cap.write(2, 2, 0x8000)
    assert sink.take() == [("enable", True, 4)]


def test_msix_unmasking_routes_and_masking_unroutes() -> None:
    sink = Sink()
    cap = MsixCapability(sink, 4)
    cap.write(3, 1, 0x80)  # byte write to the upper control byte
    sink.take()
    program(cap, 1, ADDR, 0x41, masked=False)
    msg = MsiMessage(ADDR, 0x41)
    assert sink.take() == [("vector", 1, msg)]
    assert cap.fire(1) == msg
    cap.table_write(16 + 12, 4, 1)
    assert sink.take() == [("vector", 1, None)]
    assert cap.fire(1) is None
    assert cap.pba_read(0, 8) == 0b10
    cap.table_write(16 + 12, 4, 0)
    assert sink.take() == [("vector", 1, msg), ("signal", 1, msg)]
    assert cap.pba_read(0, 8) == 0


def test_msix_function_mask() -> None:
    sink = Sink()
    cap = MsixCapability(sink, 4)
    cap.write(2, 2, 0x8000)
    program(cap, 0, ADDR, 1, masked=False)
    program(cap, 2, ADDR, 3, masked=False)
    sink.take()
    cap.write(2, 2, 0xC000)
    assert sink.take() == [("vector", 0, None), ("vector", 2, None)]
    assert cap.fire(2) is None
    cap.write(2, 2, 0x8000)
    m0, m2 = MsiMessage(ADDR, 1), MsiMessage(ADDR, 3)
    assert sink.take() == [("vector", 0, m0), ("vector", 2, m2), ("signal", 2, m2)]
    cap.write(2, 2, 0)
    assert sink.take() == [("vector", 0, None), ("vector", 2, None), ("enable", False, 0)]
    assert cap.fire(0) is None


def test_msix_entry_programmed_while_disabled_routes_on_enable() -> None:
    sink = Sink()
    cap = MsixCapability(sink, 2)
    program(cap, 1, ADDR, 9, masked=False)
    assert sink.take() == []
    cap.write(0, 4, 0x8000 << 16)
    assert sink.take() == [("vector", 1, MsiMessage(ADDR, 9)), ("enable", True, 2)]


def test_msix_table_access_sizes() -> None:
    cap = MsixCapability(Sink(), 2)
    cap.table_write(0, 4, ADDR | 3)
    cap.table_write(4, 4, 0x1)
    cap.table_write(8, 4, 0xABCD)
    assert cap.table_read(0, 4) == ADDR
    assert cap.table_read(0, 8) == 0x1_0000_0000 | ADDR
    assert cap.table_read(8, 8) == (1 << 32) | 0xABCD
    assert cap.table_read(4, 8) == 2**64 - 1  # misaligned 8-byte access
    assert cap.table_read(2, 2) == 0xFFFF
    assert cap.table_read(1, 4) == 0xFFFF_FFFF
    assert cap.table_read(32, 4) == 0xFFFF_FFFF  # beyond the table
    cap.table_write(8, 2, 0)
    cap.table_write(32, 4, 0)
    assert cap.table_read(8, 4) == 0xABCD
    cap.table_write(12, 4, 0xFFFF_FFFF)
    assert cap.table_read(12, 4) == 1  # only the mask bit is writable


def test_msix_invalid_address_is_treated_as_masked() -> None:
    sink = Sink()
    cap = MsixCapability(sink, 1)
    cap.write(2, 2, 0x8000)
    sink.take()
    program(cap, 0, BAD_ADDR, 5, masked=False)
    assert sink.take() == []
    assert cap.fire(0) is None
    assert cap.pba_read(0, 4) == 1
    cap.table_write(0, 4, ADDR)
    msg = MsiMessage(ADDR, 5)
    assert sink.take() == [("vector", 0, msg), ("signal", 0, msg)]


def test_msix_pba_layout_for_large_tables() -> None:
    sink = Sink()
    cap = MsixCapability(sink, 2048)
    assert cap.pba_length == 256
    cap.write(2, 2, 0xC000)  # enabled but function-masked
    program(cap, 100, ADDR, 0, masked=False)
    assert cap.fire(100) is None
    assert cap.pba_read(8, 8) == 1 << 36
    assert cap.pba_read(12, 4) == 1 << 4
    assert cap.pba_read(256, 8) == 2**64 - 1


def test_msix_bad_construction() -> None:
    with pytest.raises(ValueError, match="table size"):
        MsixCapability(Sink(), 2049)
    with pytest.raises(ValueError, match="table size"):
        MsixCapability(Sink(), 0)
    with pytest.raises(ValueError, match="BIR"):
        MsixCapability(Sink(), 4, table_bir=6)
    with pytest.raises(ValueError, match="offset"):
        MsixCapability(Sink(), 4, table_offset=0x1004)
