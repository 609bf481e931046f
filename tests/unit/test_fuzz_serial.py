"""Fuzzing of the 16550A UART (model-checked sequences, and input from a second thread)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fuzz.budget import fuzz_settings
from fuzz.serial import UartMachine, run_concurrent

UartMachine.TestCase.settings = fuzz_settings(examples=300, steps=60)
TestUart = UartMachine.TestCase

OPS = st.lists(
    st.tuples(
        st.sampled_from(["r", "r", "w"]),
        st.integers(0, 7),
        st.one_of(st.integers(0, 0xFF), st.sampled_from([0x0F, 0x07, 0x80, 0x00, 0x10])),
    ),
    max_size=300,
)


@fuzz_settings(examples=150)
@given(ops=OPS, chunks=st.lists(st.binary(max_size=100), max_size=40))
def test_uart_with_concurrent_input(ops: list[tuple[str, int, int]], chunks: list[bytes]) -> None:
    run_concurrent(ops, chunks)
