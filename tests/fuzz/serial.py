"""Fuzz targets: the 16550A UART driven through its 8 ports in any order, with host input arriving too.

`UartMachine` checks every read against a register model written from the 16550A data sheet (FIFO, DLAB,
IIR priorities and THRE acknowledgement, LSR, loopback and modem-status deltas, scratch) and the interrupt
line against the model's pending interrupt. `run_concurrent` feeds input from a second thread while the
guest side hammers the registers, and checks what holds under any interleaving.
"""

from __future__ import annotations

import threading
from collections import deque

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fuzz.sinks import RecordingLine
from pyvmm.devices.serial import INPUT_FIFO_SIZE, Serial16550

REGISTERS = st.integers(0, 7)
SIZES = st.sampled_from([1, 1, 1, 2, 4])
BYTES = st.integers(0, 0xFF)
# Values that matter: DLAB on/off, FIFO enable/clear, loopback and modem lines, IER bits.
VALUES = st.one_of(BYTES, st.sampled_from([0x80, 0x03, 0x01, 0x07, 0x0F, 0x10, 0x1F, 0x02, 0x06]))

IIR_NONE, IIR_MS, IIR_THRE, IIR_RDA, IIR_RLS = 0x01, 0x00, 0x02, 0x04, 0x06


class UartModel:
    """A 16550A as the data sheet describes it (only what pyvmm emulates: no errors but overrun)."""

    def __init__(self) -> None:
        self.rx: deque[int] = deque()
        self.ier = self.lcr = self.mcr = self.fcr = self.scr = 0
        self.divisor = 0x0C
        self.overrun = False
        self.thre = False  # THRE interrupt pending
        self.deltas = 0
        self.output: list[int] = []

    def dlab(self) -> bool:
        return bool(self.lcr & 0x80)

    def modem(self) -> int:
        if not self.mcr & 0x10:
            return 0xB0  # DCD, DSR, CTS
        m = self.mcr
        return (
            (0x10 if m & 2 else 0) | (0x20 if m & 1 else 0) | (0x40 if m & 4 else 0) | (0x80 if m & 8 else 0)
        )

    def receive(self, data: bytes) -> int:
        room = INPUT_FIFO_SIZE - len(self.rx)
        self.rx.extend(data[:room])
        if len(data) > room:
            self.overrun = True
        return min(room, len(data))

    def pending(self) -> int:
        if self.ier & 4 and self.overrun:
            return IIR_RLS
        if self.ier & 1 and self.rx:
            return IIR_RDA
        if self.ier & 2 and self.thre:
            return IIR_THRE
        if self.ier & 8 and self.deltas:
            return IIR_MS
        return IIR_NONE

    def write(self, reg: int, value: int) -> None:
        if reg == 0 and self.dlab():
            self.divisor = (self.divisor & 0xFF00) | value
        elif reg == 0:
            self.thre = True
            if self.mcr & 0x10:
                self.receive(bytes([value]))
            else:
                self.output.append(value)
        elif reg == 1 and self.dlab():
            self.divisor = (self.divisor & 0xFF) | value << 8
        elif reg == 1:
            if value & 2 and not self.ier & 2:
                self.thre = True
            elif not value & 2:
                self.thre = False
            self.ier = value & 0x0F
        elif reg == 2:
            if value & 2 or (value ^ self.fcr) & 1:
                self.rx.clear()
            self.fcr = value & 1
        elif reg == 3:
            self.lcr = value
        elif reg == 4:
            before = self.modem()
            self.mcr = value & 0x1F
            after = self.modem()
            changed = before ^ after
            for line, delta in ((0x10, 0x01), (0x20, 0x02), (0x80, 0x08)):
                if changed & line:
                    self.deltas |= delta
            if before & 0x40 and not after & 0x40:
                self.deltas |= 0x04
        elif reg == 7:
            self.scr = value

    def read(self, reg: int) -> int:
        if reg == 0:
            if self.dlab():
                return self.divisor & 0xFF
            return self.rx.popleft() if self.rx else 0
        if reg == 1:
            return self.divisor >> 8 if self.dlab() else self.ier
        if reg == 2:
            iir = self.pending()
            if iir == IIR_THRE:
                self.thre = False
            return (0xC0 if self.fcr & 1 else 0) | iir
        if reg == 3:
            return self.lcr
        if reg == 4:
            return self.mcr
        if reg == 5:
            lsr = 0x60 | (1 if self.rx else 0) | (2 if self.overrun else 0)
            self.overrun = False
            return lsr
        if reg == 6:
            msr = self.modem() | self.deltas
            self.deltas = 0
            return msr
        return self.scr


class UartMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.line = RecordingLine()
        self.sent: list[int] = []
        self.uart = Serial16550(self.line, lambda b: self.sent.extend(b))
        self.model = UartModel()

    @rule(reg=REGISTERS, size=SIZES, value=st.integers(0, 0xFFFF_FFFF))
    def write(self, reg: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        self.uart.write(reg, size, value)
        self.model.write(reg, value & 0xFF)

    @rule(reg=REGISTERS, value=VALUES)
    def write_byte(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)
        self.model.write(reg, value)

    @rule(reg=REGISTERS, size=SIZES)
    def read(self, reg: int, size: int) -> None:
        got = self.uart.read(reg, size)
        expected = self.model.read(reg) | (((1 << (8 * size)) - 1) & ~0xFF)
        assert got == expected, f"register {reg} read {got:#x}, model {expected:#x}"

    @rule(data=st.binary(max_size=80))
    def host_input(self, data: bytes) -> None:
        accepted = self.uart.queue_input(data)
        assert accepted == self.model.receive(data)

    @rule()
    def drain(self) -> None:
        """A driver's receive loop: read RBR while LSR.DR is set; never more than the FIFO holds."""
        if self.model.dlab():  # RBR is the divisor latch while DLAB is set
            self.write_byte(3, self.model.lcr & 0x7F)
        count = 0
        while True:
            lsr = self.uart.read(5, 1)
            assert lsr == self.model.read(5)
            if not lsr & 1:
                break
            assert self.uart.read(0, 1) == self.model.read(0)
            count += 1
            assert count <= INPUT_FIFO_SIZE, "more bytes than the FIFO holds"

    @invariant()
    def consistent(self) -> None:
        assert self.line.level == (self.model.pending() != IIR_NONE), "interrupt line vs pending interrupt"
        assert self.sent == self.model.output
        assert len(self.model.rx) <= INPUT_FIFO_SIZE


def run_concurrent(ops: list[tuple[str, int, int]], chunks: list[bytes]) -> None:
    """Guest accesses `ops` on this thread while another thread queues `chunks` of input."""
    line = RecordingLine()
    uart = Serial16550(line, lambda b: None)
    accepted: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def feed() -> None:
        try:
            start.wait()
            for chunk in chunks:
                n = uart.queue_input(chunk)
                assert 0 <= n <= len(chunk)
                accepted.extend(chunk[:n])
        except BaseException as exc:  # reported on the main thread
            errors.append(exc)

    feeder = threading.Thread(target=feed, name="uart-feeder")
    feeder.start()
    received: list[int] = []
    loopback = any(op == "w" and reg == 4 and value & 0x10 for op, reg, value in ops)
    lcr = 0
    try:
        start.wait()
        for op, reg, value in ops:
            if op == "w":
                uart.write(reg, 1, value)
                lcr = value if reg == 3 else lcr
            elif reg == 0:
                # Only this thread consumes: with DR set, RBR returns a byte the host queued.
                if uart.read(5, 1) & 1 and not lcr & 0x80:
                    received.append(uart.read(0, 1))
            else:
                got = uart.read(reg, 1)
                assert 0 <= got <= 0xFF
                if reg == 5:
                    assert got & 0x60 == 0x60 and not got & 0x9C, f"LSR {got:#x}"
                elif reg == 2:
                    assert got & 0x3F in (IIR_NONE, IIR_MS, IIR_THRE, IIR_RDA, IIR_RLS), f"IIR {got:#x}"
                    assert got & 0xC0 in (0, 0xC0), f"IIR {got:#x}"
            assert len(uart._rx) <= INPUT_FIFO_SIZE  # internal: the FIFO never grows past its size
    finally:
        feeder.join(timeout=30)
    assert not feeder.is_alive(), "queue_input blocked"
    assert not errors, errors
    # Drain what is left: at most a FIFO's worth, then the line must agree with IIR.
    uart.write(3, 1, 0)
    uart.write(4, 1, 0)  # no loopback: only host input is in the FIFO from now on
    leftover = 0
    while uart.read(5, 1) & 1:
        uart.read(0, 1)
        leftover += 1
        assert leftover <= INPUT_FIFO_SIZE
    iir = uart.read(2, 1) & 0x0F
    if iir == IIR_NONE:
        assert not line.level
    else:
        assert line.level or iir == IIR_THRE  # reading a THRE IIR acknowledges it
    if not loopback:  # the guest read host bytes in order, none invented (FIFO clears may drop some)
        remaining = iter(accepted)
        assert all(byte in remaining for byte in received), "received bytes are not the host's, in order"


__all__ = ["UartMachine", "UartModel", "run_concurrent"]
