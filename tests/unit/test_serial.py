"""16550A UART, exercised the way Linux's 8250 driver probes and drives it."""

from __future__ import annotations

import threading

import pytest

from pyvmm.devices.serial import INPUT_FIFO_SIZE, Serial16550

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = EFR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IIR_NO_INT = 0x01
IIR_ID = 0x0E
IIR_RLSI, IIR_RDI, IIR_THRI, IIR_MSI = 0x06, 0x04, 0x02, 0x00
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80


class Line:
    """An InterruptLine that records every level change."""

    def __init__(self) -> None:
        self.level = False
        self.history: list[bool] = []

    def set_level(self, asserted: bool) -> None:
        self.history.append(asserted)
        self.level = asserted

    @property
    def rising_edges(self) -> int:
        prev, edges = False, 0
        for level in self.history:
            edges += level and not prev
            prev = level
        return edges


class Uart:
    def __init__(self) -> None:
        self.line = Line()
        self.out = bytearray()
        self.dev = Serial16550(self.line, self.out.extend)

    def inb(self, reg: int) -> int:
        return self.dev.read(reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.dev.write(reg, 1, value)


@pytest.fixture
def u() -> Uart:
    return Uart()


def test_autoconfig_detects_a_16550a(u: Uart) -> None:
    """The checks of drivers/tty/serial/8250/8250_port.c autoconfig(), in order."""
    # IER: all four interrupt bits read back, nothing else.
    saved = u.inb(IER)
    u.outb(IER, 0)
    assert u.inb(IER) & 0x0F == 0
    u.outb(IER, 0x0F)
    assert u.inb(IER) & 0x0F == 0x0F
    u.outb(IER, saved)
    # Loopback test: MCR LOOP|OUT2|RTS must show DCD|CTS in MSR.
    save_mcr = u.inb(MCR)
    u.outb(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
    assert u.inb(MSR) & 0xF0 == MSR_DCD | MSR_CTS
    u.outb(MCR, save_mcr)
    # Enable the FIFO: IIR bits 7:6 = 11 means 16550A.
    u.outb(LCR, 0xBF)
    u.outb(EFR, 0)
    u.outb(LCR, 0)
    u.outb(FCR, 0x01)
    assert u.inb(IIR) >> 6 == 3
    # autoconfig_16550a: no EFR when DLAB is set (a zero there would mean ST16C650V1).
    u.outb(LCR, 0x80)
    assert u.inb(EFR) != 0
    u.outb(LCR, 0xBF)
    assert u.inb(EFR) != 0
    # No 64-byte FIFO (bit 5) with or without DLAB: not a TI16750.
    u.outb(LCR, 0)
    u.outb(FCR, 0x01 | 0x20)
    assert u.inb(IIR) & 0x20 == 0
    u.outb(LCR, 0x80)
    u.outb(FCR, 0x01 | 0x20)
    assert u.inb(IIR) & 0x20 == 0
    u.outb(LCR, 0)
    # No XScale UUE bit.
    u.outb(IER, 0x40)
    assert u.inb(IER) & 0x40 == 0
    # Scratch register holds a byte.
    u.outb(SCR, 0xA5)
    assert u.inb(SCR) == 0xA5


def test_fifo_disabled_reports_8250(u: Uart) -> None:
    u.outb(FCR, 0)
    assert u.inb(IIR) >> 6 == 0


def test_divisor_latch(u: Uart) -> None:
    u.outb(LCR, 0x83)  # DLAB + 8N1
    u.outb(DLL, 0x01)
    u.outb(DLM, 0x00)
    assert (u.inb(DLL), u.inb(DLM)) == (1, 0)
    u.outb(LCR, 0x03)
    u.outb(IER, 0)
    u.outb(LCR, 0x83)
    assert u.inb(DLL) == 1  # IER writes did not touch the divisor
    u.outb(LCR, 0x03)
    assert u.inb(LCR) == 0x03
    assert u.out == b""  # DLL writes are not output


def test_polled_console_output(u: Uart) -> None:
    # serial8250_console_write: wait for THRE, write, with interrupts off.
    for ch in b"hello\n":
        assert u.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
        u.outb(THR, ch)
    assert bytes(u.out) == b"hello\n"
    assert u.line.history == []


def test_thre_interrupt_startup_checks(u: Uart) -> None:
    """serial8250_do_startup's UART_BUG_THRE and UART_BUG_TXEN probes must both find a sane UART."""
    u.outb(IER, IER_THRI)
    iir1 = u.inb(IIR)
    u.outb(IER, 0)
    u.outb(IER, IER_THRI)
    iir = u.inb(IIR)
    u.outb(IER, 0)
    assert not iir1 & IIR_NO_INT
    assert not iir & IIR_NO_INT  # THRE re-asserts when THRI is enabled again
    u.outb(IER, IER_THRI)
    lsr = u.inb(LSR)
    iir = u.inb(IIR)
    u.outb(IER, 0)
    assert lsr & LSR_TEMT and not iir & IIR_NO_INT


def test_thre_interrupt_acknowledged_by_iir_read(u: Uart) -> None:
    u.outb(FCR, 0x01)
    u.outb(IER, IER_THRI)
    assert u.line.level
    assert u.inb(IIR) == 0xC0 | IIR_THRI
    assert not u.line.level
    assert u.inb(IIR) == 0xC0 | IIR_NO_INT
    u.outb(THR, ord("x"))  # THR empties at once: a new THRE interrupt
    assert u.line.level
    assert u.line.rising_edges == 2


def isr(u: Uart, pending: bytearray, received: bytearray) -> bool:
    """serial8250_interrupt + serial8250_handle_irq: loop until IIR reports no interrupt."""
    handled = False
    while not (iir := u.inb(IIR)) & IIR_NO_INT:
        handled = True
        lsr = u.inb(LSR)
        while lsr & LSR_DR:
            received.append(u.inb(RBR))
            lsr = u.inb(LSR)
        if lsr & LSR_THRE and u.inb(IER) & IER_THRI:
            for _ in range(16):  # tx_loadsz of a 16550A
                if not pending:
                    break
                u.outb(THR, pending.pop(0))
            if not pending:
                u.outb(IER, u.inb(IER) & ~IER_THRI)  # __stop_tx
        assert iir & IIR_ID in (IIR_RLSI, IIR_RDI, IIR_THRI, IIR_MSI)
    return handled


def run_guest(u: Uart, pending: bytearray, received: bytearray) -> int:
    """Deliver interrupts on rising edges (edge-triggered IOAPIC pin) until none is left."""
    delivered = 0
    seen = 0
    while seen < u.line.rising_edges:
        seen += 1
        delivered += 1
        isr(u, pending, received)
    return delivered


def test_interrupt_driven_transmit(u: Uart) -> None:
    u.outb(FCR, 0x07)
    u.outb(LCR, 0x03)
    u.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
    u.outb(IER, IER_RDI)
    message = bytes(range(32, 127)) * 2
    pending = bytearray(message)
    received = bytearray()
    u.outb(IER, u.inb(IER) | IER_THRI)  # __start_tx
    run_guest(u, pending, received)
    assert bytes(u.out) == message
    assert not pending
    assert not u.line.level
    assert u.inb(IIR) & IIR_NO_INT


def test_interrupt_driven_receive(u: Uart) -> None:
    u.outb(FCR, 0x01)
    u.outb(IER, IER_RDI | IER_RLSI)
    received = bytearray()
    assert u.dev.queue_input(b"ls -l\n") == 6
    assert u.line.level
    assert u.inb(IIR) == 0xC0 | IIR_RDI
    run_guest(u, bytearray(), received)
    assert bytes(received) == b"ls -l\n"
    assert not u.line.level
    # Each new arrival after the guest drained the FIFO is a fresh edge.
    u.dev.queue_input(b"a")
    run_guest(u, bytearray(), received)
    u.dev.queue_input(b"b")
    run_guest(u, bytearray(), received)
    assert bytes(received) == b"ls -l\nab"
    assert u.line.rising_edges == 3


def test_receive_without_interrupts(u: Uart) -> None:
    u.dev.queue_input(b"q")
    assert u.line.history == []
    assert u.inb(LSR) & LSR_DR
    assert u.inb(RBR) == ord("q")
    assert not u.inb(LSR) & LSR_DR
    assert u.inb(RBR) == 0  # empty FIFO
    # Enabling RDA while data waits raises the interrupt.
    u.dev.queue_input(b"r")
    u.outb(IER, IER_RDI)
    assert u.line.level


def test_priority_rda_over_thre(u: Uart) -> None:
    u.outb(FCR, 0x01)
    u.dev.queue_input(b"z")
    u.outb(IER, IER_RDI | IER_THRI)
    assert u.inb(IIR) & IIR_ID == IIR_RDI
    assert u.inb(IIR) & IIR_ID == IIR_RDI  # RDA stays until the data is read
    u.inb(RBR)
    assert u.inb(IIR) & IIR_ID == IIR_THRI
    assert u.inb(IIR) & IIR_NO_INT
    assert not u.line.level


def test_overrun(u: Uart) -> None:
    u.outb(IER, IER_RDI | IER_RLSI)
    assert u.dev.queue_input(bytes(100)) == INPUT_FIFO_SIZE
    assert u.inb(IIR) & IIR_ID == IIR_RLSI  # line status outranks received data
    lsr = u.inb(LSR)
    assert lsr & LSR_OE and lsr & LSR_DR
    assert not u.inb(LSR) & LSR_OE  # cleared by reading LSR
    assert u.inb(IIR) & IIR_ID == IIR_RDI
    count = 0
    while u.inb(LSR) & LSR_DR:
        u.inb(RBR)
        count += 1
    assert count == INPUT_FIFO_SIZE


def test_fcr_clears_receive_fifo(u: Uart) -> None:
    u.outb(FCR, 0x01)
    u.dev.queue_input(b"junk")
    u.outb(FCR, 0x01 | 0x02)
    assert not u.inb(LSR) & LSR_DR


def test_loopback(u: Uart) -> None:
    u.outb(FCR, 0x01)
    u.outb(MCR, MCR_LOOP)
    assert u.inb(MSR) & 0xF0 == 0
    u.outb(THR, 0x55)
    assert u.out == b""  # looped back, not sent
    assert u.inb(LSR) & LSR_DR
    assert u.inb(RBR) == 0x55
    u.outb(IER, IER_MSI)
    u.outb(MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT1 | MCR_OUT2)
    assert u.line.level
    assert u.inb(IIR) & IIR_ID == IIR_MSI
    msr = u.inb(MSR)
    assert msr == MSR_CTS | MSR_DSR | MSR_RI | MSR_DCD | MSR_DCTS | MSR_DDSR | MSR_DDCD
    assert not u.line.level  # reading MSR clears the deltas
    u.outb(MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT2)  # RI falls: trailing-edge indicator
    assert u.inb(MSR) == MSR_CTS | MSR_DSR | MSR_DCD | MSR_TERI
    u.outb(MCR, MCR_OUT2)
    assert u.inb(MSR) & 0xF0 == MSR_CTS | MSR_DSR | MSR_DCD


def test_wide_access_and_bad_offsets(u: Uart) -> None:
    u.outb(SCR, 0x12)
    assert u.dev.read(SCR, 2) == 0xFF12
    with pytest.raises(ValueError, match="UART access"):
        u.dev.read(8, 1)
    with pytest.raises(ValueError, match="UART access"):
        u.dev.write(0, 3, 0)


def test_input_thread_and_vcpu_concurrently() -> None:
    u = Uart()
    u.outb(IER, IER_RDI)
    data = bytes(i % 251 for i in range(20000))
    received = bytearray()

    def feed() -> None:
        pos = 0
        while pos < len(data):
            pos += u.dev.queue_input(data[pos : pos + 37])  # back-pressure instead of overrun

    thread = threading.Thread(target=feed)
    thread.start()
    while len(received) < len(data):
        if u.inb(LSR) & LSR_DR:
            received.append(u.inb(RBR))
    thread.join()
    assert bytes(received) == data
    assert not u.inb(LSR) & LSR_OE
    assert not u.line.level


def test_builder_name_and_signature() -> None:
    from pyvmm.devices.serial import Serial

    line, out = Line(), bytearray()
    dev = Serial(line, out.extend)
    dev.write(THR, 1, ord("k"))
    assert out == b"k"
