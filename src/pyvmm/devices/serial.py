"""A 16550A UART for the guest console (8 byte-wide registers from layout.SERIAL_COM1_PORT).

THR is always empty again after a write: the byte goes to `output` at once, or, with `batch_output` set,
when `flush_output()` is called. The builder sets it when KVM queues THR writes in the coalesced ring
(docs/ARCHITECTURE.md#device-interfaces-devicesbuspy) and flushes after each replay: Linux's console polls
LSR once and then writes up to 16 bytes, which then cost one exit and one write(2) instead of sixteen.
Every trapped access replays the ring first, so the registers still see the guest's order (an LCR write
that sets DLAB traps, hence the bytes queued before it are THR bytes). Input is queued by a reader thread
through `queue_input`.

The interrupt line is level-modelled: asserted while an enabled interrupt is pending, so a new pending
condition after the guest has serviced the previous one is a 0->1 edge, which is what the edge-triggered
IOAPIC pin of ISA IRQ 4 needs. A THRE interrupt for queued bytes is raised when they are replayed, i.e. at
the guest's next trapped access: Linux's 8250 interrupt handler reads IIR again after filling the FIFO.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from enum import IntEnum, IntFlag
from typing import Protocol


class InterruptLine(Protocol):
    # TODO: import from pyvmm.devices.bus once it exists (same shape as docs/ARCHITECTURE.md).
    def set_level(self, asserted: bool) -> None: ...


class Reg(IntEnum):
    RBR_THR_DLL = 0
    IER_DLM = 1
    IIR_FCR = 2
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


class Ier(IntFlag):
    RDA = 1 << 0  # received data available
    THRE = 1 << 1  # transmitter holding register empty
    RLS = 1 << 2  # receiver line status
    MS = 1 << 3  # modem status


IER_MASK = 0x0F  # the upper IER bits do not exist on a 16550A (Linux probes that they read back 0)


class Iir(IntEnum):
    """Interrupt identification, highest priority first (bits 3:0)."""

    RLS = 0x06
    RDA = 0x04
    THRE = 0x02
    MS = 0x00
    NONE = 0x01


IIR_FIFO_ENABLED = 0xC0  # bits 7:6 both set: what makes Linux's autoconfig report a 16550A


class Fcr(IntFlag):
    ENABLE_FIFO = 1 << 0
    CLEAR_RCVR = 1 << 1
    CLEAR_XMIT = 1 << 2


class Lcr(IntFlag):
    DLAB = 1 << 7


class Mcr(IntFlag):
    DTR = 1 << 0
    RTS = 1 << 1
    OUT1 = 1 << 2
    OUT2 = 1 << 3
    LOOP = 1 << 4


MCR_MASK = 0x1F


class Lsr(IntFlag):
    DR = 1 << 0
    OE = 1 << 1
    THRE = 1 << 5
    TEMT = 1 << 6


class Msr(IntFlag):
    DCTS = 1 << 0
    DDSR = 1 << 1
    TERI = 1 << 2
    DDCD = 1 << 3
    CTS = 1 << 4
    DSR = 1 << 5
    RI = 1 << 6
    DCD = 1 << 7


MSR_DELTAS = Msr.DCTS | Msr.DDSR | Msr.TERI | Msr.DDCD
# A console with nothing to flow-control: carrier, data set ready and clear to send all asserted.
MSR_CONNECTED = Msr.DCD | Msr.DSR | Msr.CTS
INPUT_FIFO_SIZE = 64
DEFAULT_DIVISOR = 0x0C  # 9600 baud from the 1.8432 MHz clock
REGISTER_COUNT = 8
_TX_BATCH_LIMIT = 4096  # bytes held for one flush at most, whatever the caller does

# Plain ints for the per-access paths: an IntFlag operation costs about a microsecond, and Linux's console
# makes two register accesses per character (LSR poll, THR write).
_IER_RDA, _IER_THRE, _IER_RLS, _IER_MS = (int(f) for f in (Ier.RDA, Ier.THRE, Ier.RLS, Ier.MS))
_IIR_RLS, _IIR_RDA, _IIR_THRE, _IIR_MS, _IIR_NONE = (
    int(i) for i in (Iir.RLS, Iir.RDA, Iir.THRE, Iir.MS, Iir.NONE)
)
_LSR_EMPTY = int(Lsr.THRE | Lsr.TEMT)
_LSR_DR, _LSR_OE = int(Lsr.DR), int(Lsr.OE)
_LCR_DLAB = int(Lcr.DLAB)
_FCR_ENABLE_FIFO, _FCR_CLEAR_RCVR = int(Fcr.ENABLE_FIFO), int(Fcr.CLEAR_RCVR)
_MCR_LOOP = int(Mcr.LOOP)
_RBR_THR_DLL, _IER_DLM, _IIR_FCR, _LCR, _MCR, _LSR, _MSR, _SCR = (
    int(r) for r in (Reg.RBR_THR_DLL, Reg.IER_DLM, Reg.IIR_FCR, Reg.LCR, Reg.MCR, Reg.LSR, Reg.MSR, Reg.SCR)
)


class Serial16550:
    """Bus device implementing a 16550A; `output` receives transmitted bytes (outside the device lock)."""

    def __init__(self, interrupt: InterruptLine, output: Callable[[bytes], object] | None = None) -> None:
        self._irq = interrupt
        self._output = output
        self._lock = threading.Lock()
        self._output_lock = threading.Lock()  # keeps flushes from two threads in order
        self._tx = bytearray()  # transmitted, not yet given to `output`
        self.batch_output = False  # True: THR bytes wait for flush_output() (see the module docstring)
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0
        self._scr = 0
        self._divisor = DEFAULT_DIVISOR
        self._overrun = False
        self._thr_pending = False  # THRE interrupt raised and not yet acknowledged
        self._msr_deltas = Msr(0)
        self._asserted = False

    # --- bus-device interface --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        _check_access(offset, size)
        with self._lock:
            value = self._read(offset)
            self._update_irq()
        if self._tx:  # bytes replayed from the ring without a flush after them: out before the answer
            self.flush_output()
        # Only the addressed register answers; the upper bytes of a wider access read like an empty bus.
        return value | (((1 << (8 * size)) - 1) & ~0xFF)

    def read_lsr_ahead(self, size: int) -> int:
        """LSR for a read that may be answered before the THR bytes still queued in KVM's ring are replayed,
        or -1 when it may not. Those bytes cannot change LSR (THR is empty after every byte), only the
        interrupt line (with THRI on) or the receiver (in loopback); and reading an overrun clears it. The
        console polls LSR before every byte while it boots: this answer costs no replay and no lock."""
        if size != 1 or self._ier & _IER_THRE or self._mcr & _MCR_LOOP or self._overrun:
            return -1
        return _LSR_EMPTY | _LSR_DR if self._rx else _LSR_EMPTY

    def write(self, offset: int, size: int, value: int) -> None:
        _check_access(offset, size)
        with self._lock:
            self._write(offset, value & 0xFF)
            # A THR byte can only change the line through a THRE interrupt: with THRE off (the console
            # writes with IER = 0) there is nothing to update, for each of the bytes of a burst.
            if offset != _RBR_THR_DLL or self._ier & _IER_THRE or self._mcr & _MCR_LOOP:
                self._update_irq()
            if not self._tx or (
                self.batch_output and offset == _RBR_THR_DLL and len(self._tx) < _TX_BATCH_LIMIT
            ):
                return
        self.flush_output()

    def write_thr_bytes(self, data: bytes) -> None:
        """Byte writes to THR (offset 0) in a row, replayed from KVM's coalesced ring: the same as `write`
        for each, in one call (the console's 16-byte bursts are the common case on the exit path)."""
        with self._lock:
            if self._lcr & _LCR_DLAB or self._mcr & _MCR_LOOP or self._output is None:
                for value in data:  # not transmitted bytes: each goes through the register logic
                    self._write(_RBR_THR_DLL, value)
            elif data:
                self._thr_pending = True  # each byte leaves at once: THR is empty after the last one
                self._tx += data
            if self._ier & _IER_THRE or self._mcr & _MCR_LOOP:
                self._update_irq()
            if not self._tx or (self.batch_output and len(self._tx) < _TX_BATCH_LIMIT):
                return
        self.flush_output()

    def flush_output(self) -> None:
        """Give the transmitted bytes to `output` in one call (outside the device lock)."""
        with self._output_lock:
            with self._lock:
                if not self._tx:
                    return
                data = bytes(self._tx)
                self._tx.clear()
            if self._output is not None:
                self._output(data)

    # --- input from the host ---------------------------------------------------------------------------

    def queue_input(self, data: bytes) -> int:
        """Queue bytes typed on the host console; returns how many fit (the rest is an overrun)."""
        with self._lock:
            accepted = self._receive(data)
            self._update_irq()
        return accepted

    # --- register logic (called with the lock held) --------------------------------------------------

    def _receive(self, data: bytes) -> int:
        room = max(0, INPUT_FIFO_SIZE - len(self._rx))
        self._rx.extend(data[:room])
        if len(data) > room:
            self._overrun = True
        return min(room, len(data))

    def _read(self, offset: int) -> int:
        if offset == _LSR:  # first: the console polls it before every character
            lsr = _LSR_EMPTY
            if self._rx:
                lsr |= _LSR_DR
            if self._overrun:
                lsr |= _LSR_OE
                self._overrun = False  # error bits clear on read
            return lsr
        if offset == _RBR_THR_DLL:
            if self._lcr & _LCR_DLAB:
                return self._divisor & 0xFF
            return self._rx.popleft() if self._rx else 0
        if offset == _IER_DLM:
            return (self._divisor >> 8) & 0xFF if self._lcr & _LCR_DLAB else self._ier
        if offset == _IIR_FCR:
            iir = self._pending()
            if iir == _IIR_THRE:
                self._thr_pending = False  # reading IIR acknowledges a THRE interrupt
            fifo = IIR_FIFO_ENABLED if self._fcr & _FCR_ENABLE_FIFO else 0
            return fifo | iir
        if offset == _LCR:
            return self._lcr
        if offset == _MCR:
            return self._mcr
        if offset == _MSR:
            msr = self._modem_status() | self._msr_deltas
            self._msr_deltas = Msr(0)
            return int(msr)
        return self._scr

    def _write(self, offset: int, value: int) -> None:
        """Apply a register write (a transmitted byte goes to the output buffer)."""
        if offset == _RBR_THR_DLL:
            if self._lcr & _LCR_DLAB:
                self._divisor = (self._divisor & 0xFF00) | value
                return
            # The byte leaves at once, so THR is empty again: a fresh THRE interrupt.
            self._thr_pending = True
            if self._mcr & _MCR_LOOP:
                self._receive(bytes([value]))
            elif self._output is not None:
                self._tx.append(value)
            return
        if offset == _IER_DLM:
            if self._lcr & _LCR_DLAB:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
                return
            enabling_thre = value & _IER_THRE and not self._ier & _IER_THRE
            self._ier = value & IER_MASK
            # Enabling THRE with THR empty raises it (Linux's 8250 startup tests rely on this).
            if enabling_thre:
                self._thr_pending = True
            elif not self._ier & _IER_THRE:
                self._thr_pending = False
            return
        if offset == _IIR_FCR:
            if value & _FCR_CLEAR_RCVR or (value ^ self._fcr) & _FCR_ENABLE_FIFO:
                self._rx.clear()  # toggling FIFO mode also resets the FIFOs
            self._fcr = value & _FCR_ENABLE_FIFO
            return
        if offset == _LCR:
            self._lcr = value
        elif offset == _MCR:
            before = self._modem_status()
            self._mcr = value & MCR_MASK
            self._record_modem_change(before, self._modem_status())
        elif offset == _SCR:
            self._scr = value
        # LSR and MSR writes are ignored (factory test only)

    def _modem_status(self) -> Msr:
        if not self._mcr & Mcr.LOOP:
            return MSR_CONNECTED
        status = Msr(0)
        for out, into in ((Mcr.RTS, Msr.CTS), (Mcr.DTR, Msr.DSR), (Mcr.OUT1, Msr.RI), (Mcr.OUT2, Msr.DCD)):
            if self._mcr & out:
                status |= into
        return status

    def _record_modem_change(self, before: Msr, after: Msr) -> None:
        changed = before ^ after
        for line, delta in ((Msr.CTS, Msr.DCTS), (Msr.DSR, Msr.DDSR), (Msr.DCD, Msr.DDCD)):
            if changed & line:
                self._msr_deltas |= delta
        if before & Msr.RI and not after & Msr.RI:  # trailing edge of ring indicator
            self._msr_deltas |= Msr.TERI

    def _pending(self) -> int:
        """The highest-priority enabled interrupt (an Iir value)."""
        ier = self._ier
        if ier & _IER_RLS and self._overrun:
            return _IIR_RLS
        if ier & _IER_RDA and self._rx:
            return _IIR_RDA
        if ier & _IER_THRE and self._thr_pending:
            return _IIR_THRE
        if ier & _IER_MS and self._msr_deltas:
            return _IIR_MS
        return _IIR_NONE

    def _update_irq(self) -> None:
        asserted = self._pending() != _IIR_NONE
        if asserted != self._asserted:
            self._asserted = asserted
            self._irq.set_level(asserted)


def _check_access(offset: int, size: int) -> None:
    if size not in (1, 2, 4) or not 0 <= offset < REGISTER_COUNT:
        raise ValueError(f"invalid UART access of {size} bytes at offset {offset}")


Serial = Serial16550  # the name the VM builder uses
