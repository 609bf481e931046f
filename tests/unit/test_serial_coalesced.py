"""COM1's THR writes queued in KVM's coalesced ring: the UART sees them in the guest's order, relative to
its trapped accesses (LSR, LCR, IER, IIR), and writes its bytes out once per replay.

The scripted vCPU below does what KVM does: while the "guest" runs, its byte writes to 0x3F8 land in the
ring (no exit); then an exit for a trapped access is returned. The last test runs a real-mode guest on
/dev/kvm with the zone registered as the builder registers it.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from collections.abc import Callable, Iterator

import pytest

from pyvmm import layout
from pyvmm.devices.bus import IoBus
from pyvmm.devices.serial import Serial16550
from pyvmm.kvm.bindings import KvmExit, kvm_run
from pyvmm.kvm.coalesced import CoalescedRing, RingSweeper, open_coalesced_ring
from pyvmm.kvm.runloop import StopReason, VcpuLoop, install_kick_handler
from pyvmm.kvm.selftest import real_mode_vcpu
from pyvmm.kvm.system import Kvm, KvmError, Vcpu
from pyvmm.memory import GuestMemory

COM1 = layout.SERIAL_COM1_PORT
THR, IER, IIR, LCR, LSR = 0, 1, 2, 3, 5
IER_THRI = 0x02
IIR_NO_INT, IIR_THRI = 0x01, 0x02
LSR_THRE_TEMT = 0x60
LCR_8N1, LCR_DLAB = 0x03, 0x80
PAGE = mmap.PAGESIZE
DATA_OFFSET = PAGE  # port-I/O data: the page after kvm_run
RING_OFFSET = 2 * PAGE  # where KVM_CAP_COALESCED_MMIO says the ring is (2 on x86)


class Line:
    def __init__(self) -> None:
        self.history: list[bool] = []

    def set_level(self, asserted: bool) -> None:
        self.history.append(asserted)


class Output:
    """The console sink: one entry per call, so batching is visible."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


Step = Callable[["ScriptedVcpu"], int]


class ScriptedVcpu:
    """kvm_run, the data page and the coalesced ring page in one buffer, filled as KVM fills them."""

    def __init__(self, steps: list[Step]) -> None:
        self.index = 0
        self.mmap_size = 3 * PAGE
        self._buffer = ctypes.create_string_buffer(self.mmap_size)
        self.run_address = ctypes.addressof(self._buffer)
        self.kvm_run = kvm_run.from_buffer(self._buffer)
        self.steps = list(steps)
        self.ring: CoalescedRing | None = None
        self.answers: list[int] = []  # what each port read returned to the guest, in order
        self._pending_read = False

    def run_call(self) -> Callable[[], int]:
        return self.run

    def run(self) -> int:
        if self._pending_read:  # the loop has filled in the previous exit's read
            self.answers.append(ctypes.string_at(self.run_address + DATA_OFFSET, 1)[0])
            self._pending_read = False
        return self.steps.pop(0)(self)

    def queue(self, port: int, value: int) -> None:
        """A byte write KVM put in the ring instead of exiting."""
        assert self.ring is not None
        header = self.ring.header
        entry = self.ring.entries[header.last]
        entry.phys_addr, entry.len, entry.pio = port, 1, 1
        ctypes.memmove(entry.data, bytes([value]) + bytes(7), 8)
        header.last = (header.last + 1) % self.ring.capacity

    def trap(self, port: int, out: int | None) -> int:
        io = self.kvm_run.io
        io.direction, io.size, io.port = int(out is not None), 1, port
        io.count, io.data_offset = 1, DATA_OFFSET
        ctypes.memmove(self.run_address + DATA_OFFSET, bytes([out if out is not None else 0xCC]), 1)
        self._pending_read = out is None
        self.kvm_run.exit_reason = KvmExit.KVM_EXIT_IO
        return KvmExit.KVM_EXIT_IO


def queued(*values: int, port: int = COM1) -> Step:
    """The guest writes `values` to `port` (queued), then makes the next step's access."""

    def step(v: ScriptedVcpu) -> int:
        for value in values:
            v.queue(port, value)
        return v.steps.pop(0)(v)

    return step


def inb(reg: int) -> Step:
    return lambda v: v.trap(COM1 + reg, None)


def outb(reg: int, value: int) -> Step:
    return lambda v: v.trap(COM1 + reg, value)


def halt(v: ScriptedVcpu) -> int:
    return KvmExit.KVM_EXIT_HLT


@pytest.fixture(autouse=True)
def kick_handler() -> None:
    install_kick_handler()


@pytest.fixture(params=[True, False], ids=["burst", "per-byte"])
def burst(request: pytest.FixtureRequest) -> bool:
    """Each script runs twice: with the THR bytes of a run replayed in one call, as the builder wires it,
    and each through the bus; the guest must not see a difference."""
    return bool(request.param)


def run_script(steps: list[Step], burst: bool, read_ahead: bool = False) -> tuple[
        ScriptedVcpu, Serial16550, Output, Line, CoalescedRing, list[int]]:
    """Wire a UART the way the builder does when KVM can queue THR writes, and run the script to its HLT.
    With `read_ahead`, LSR reads are answered ahead of the ring as the builder has them; the last value is
    how many writes had been replayed when each such read reached the UART."""
    line, output = Line(), Output()
    uart = Serial16550(line, output)
    pio, mmio = IoBus("pio", 1 << 16), IoBus("mmio")
    pio.insert(COM1, 8, uart)
    vcpu = ScriptedVcpu(steps)
    ring = CoalescedRing(vcpu.run_address + RING_OFFSET, PAGE, pio, mmio)
    vcpu.ring = ring
    uart.batch_output = True
    ring.after_drain.append(uart.flush_output)
    if burst:
        ring.add_burst(COM1, uart.write_thr_bytes)
    replayed_at_lsr: list[int] = []
    if read_ahead:

        def read_lsr_ahead(size: int) -> int:
            value = uart.read_lsr_ahead(size)
            if value >= 0:
                replayed_at_lsr.append(ring.replayed)
            return value

        ring.add_read_ahead(COM1 + LSR, read_lsr_ahead)
    result = VcpuLoop(vcpu, pio, mmio, coalesced=ring).run()
    assert result.reason is StopReason.HALTED, result.describe()
    return vcpu, uart, output, line, ring, replayed_at_lsr


def test_a_polled_console_burst_is_one_write_and_comes_out_before_the_next_lsr_answer(burst: bool) -> None:
    # Linux's console: LSR once, up to 16 bytes to THR, LSR again; at the end it waits for TEMT.
    line1, line2 = b"[    0.000000] L", b"inux version 6.1"
    steps = [inb(LSR), queued(*line1), inb(LSR), queued(*line2), inb(LSR), halt]
    vcpu, _, output, line, ring, _ = run_script(steps, burst)
    assert vcpu.answers == [LSR_THRE_TEMT] * 3
    assert output.chunks == [line1, line2]  # one write per burst, none per byte
    assert ring.replayed == 32 and not ring.pending()
    assert not any(line.history)  # IER is 0 while the console writes: no interrupt


def test_bytes_queued_before_dlab_is_set_are_thr_bytes_and_after_it_the_divisor(burst: bool) -> None:
    # The LCR writes trap, and the ring is replayed before them: each queued byte meets the LCR it was
    # written under.
    steps = [
        outb(LCR, LCR_8N1), queued(*b"ok"),
        outb(LCR, LCR_DLAB | LCR_8N1), queued(0x01),  # DLL = 1: 115200 baud
        outb(LCR, LCR_8N1), queued(*b"!"),
        outb(LCR, LCR_DLAB | LCR_8N1), inb(THR), inb(IER),  # the divisor read back
        outb(LCR, LCR_8N1), halt,
    ]  # fmt: skip
    vcpu, _, output, _, _, _ = run_script(steps, burst)
    assert output.data == b"ok!"
    assert vcpu.answers == [0x01, 0x00]


def test_the_thre_interrupt_for_a_queued_fifo_load_is_raised_at_the_handlers_next_iir_read(
    burst: bool,
) -> None:
    # Linux's interrupt-driven transmit: enable THRI (its THRE interrupt comes at once), the handler reads
    # IIR, fills the FIFO (queued), and reads IIR again: that read must see the new THRE interrupt.
    steps = [
        outb(IER, IER_THRI), inb(IIR), inb(LSR), queued(*b"0123456789abcdef"),
        inb(IIR), inb(LSR), queued(*b"tail"),
        inb(IIR), inb(LSR), outb(IER, 0),  # nothing left to send: THRI off
        inb(IIR), halt,
    ]  # fmt: skip
    vcpu, _, output, line, _, _ = run_script(steps, burst)
    iir = [a & 0x0F for a in vcpu.answers[0::2]]
    assert iir == [IIR_THRI, IIR_THRI, IIR_THRI, IIR_NO_INT]
    assert output.chunks == [b"0123456789abcdef", b"tail"]
    assert line.history == [True, False, True, False, True, False]  # a rising edge per FIFO load


def test_disabling_thri_after_queued_bytes_leaves_no_interrupt_pending(burst: bool) -> None:
    # Bytes queued while THRI is on, then IER = 0 (trapped): replayed first, so IER = 0 is the last word.
    steps = [outb(IER, IER_THRI), inb(IIR), queued(*b"xy"), outb(IER, 0), inb(IIR), halt]
    vcpu, _, output, line, _, _ = run_script(steps, burst)
    assert [a & 0x0F for a in vcpu.answers] == [IIR_THRI, IIR_NO_INT]
    assert line.history[-1] is False and output.data == b"xy"


def test_bytes_still_queued_when_the_vcpu_stops_are_written_out(burst: bool) -> None:
    steps = [inb(LSR), queued(*b"reboot: Power down\n", port=COM1), halt]
    _, _, output, _, ring, _ = run_script(steps, burst)
    assert output.data == b"reboot: Power down\n" and not ring.pending()


def test_without_a_flush_hook_a_trapped_access_flushes_first() -> None:
    line, output = Line(), Output()
    uart = Serial16550(line, output)
    uart.batch_output = True
    for byte in b"held":
        uart.write(THR, 1, byte)
    assert output.chunks == []
    assert uart.read(LSR, 1) == LSR_THRE_TEMT
    assert output.chunks == [b"held"]
    uart.write(THR, 1, ord("!"))
    uart.flush_output()
    assert output.chunks == [b"held", b"!"]


def test_without_batching_every_byte_goes_out_at_once() -> None:
    output = Output()
    uart = Serial16550(Line(), output)
    for byte in b"ab":
        uart.write(THR, 1, byte)
    assert output.chunks == [b"a", b"b"]


# Real mode, as Linux drives COM1: 8N1, three bytes, LSR; DLAB on, DLL = 1, DLAB off; a byte; THRI on; a
# byte; then the divisor read back through DLAB into bl:bh, and the done port.
PROGRAM = bytes(
    [
        0xBA, 0xFB, 0x03, 0xB0, 0x03, 0xEE,  # mov dx, 0x3fb; mov al, 0x03; out dx, al  (LCR 8N1, trap)
        0xBA, 0xF8, 0x03,                    # mov dx, 0x3f8
        0xB0, 0x41, 0xEE,                    # mov al, 'A'; out dx, al                  (queued)
        0xB0, 0x42, 0xEE,                    # 'B'
        0xB0, 0x43, 0xEE,                    # 'C'
        0xBA, 0xFD, 0x03, 0xEC,              # mov dx, 0x3fd; in al, dx                 (LSR, trap)
        0xBA, 0xFB, 0x03, 0xB0, 0x83, 0xEE,  # LCR = DLAB | 8N1                         (trap)
        0xBA, 0xF8, 0x03, 0xB0, 0x01, 0xEE,  # DLL = 1                                  (queued)
        0xBA, 0xFB, 0x03, 0xB0, 0x03, 0xEE,  # LCR = 8N1                                (trap)
        0xBA, 0xF8, 0x03, 0xB0, 0x44, 0xEE,  # 'D'                                      (queued)
        0xBA, 0xF9, 0x03, 0xB0, 0x02, 0xEE,  # IER = THRI                               (trap)
        0xBA, 0xF8, 0x03, 0xB0, 0x45, 0xEE,  # 'E'                                      (queued)
        0xBA, 0xFB, 0x03, 0xB0, 0x83, 0xEE,  # LCR = DLAB | 8N1                         (trap)
        0xBA, 0xF8, 0x03, 0xEC, 0x88, 0xC3,  # in al, dx (DLL); mov bl, al
        0xBA, 0xF9, 0x03, 0xEC, 0x88, 0xC7,  # in al, dx (DLM); mov bh, al
        0xE6, 0x14,                          # out 0x14, al                             (done)
        0xFA, 0xF4,                          # cli; hlt
    ]
)  # fmt: skip


@contextlib.contextmanager
def uart_guest(program: bytes, burst: bool) -> Iterator[tuple[Vcpu, CoalescedRing, Serial16550, Output, Line,
                                                                IoBus]]:
    """A real-mode `program` at 0x1000 on /dev/kvm, COM1 wired as the builder wires it (its THR writes
    queued in the ring; with `burst`, replayed as runs); skipped where KVM cannot do that."""
    try:
        kvm = Kvm()
    except KvmError as e:
        pytest.skip(f"KVM unavailable: {e}")
    memory = GuestMemory([(0, 0x10000)])
    memory.write(0x1000, program)
    line, output = Line(), Output()
    uart = Serial16550(line, output)
    pio, mmio = IoBus("pio", 1 << 16), IoBus("mmio")
    pio.insert(COM1, 8, uart)
    with kvm, kvm.create_vm() as vm:
        vcpu = real_mode_vcpu(vm, memory, 0x1000)
        ring = open_coalesced_ring(vm, vcpu, pio, mmio)
        if ring is None:
            pytest.skip("this KVM cannot coalesce port I/O (KVM_CAP_COALESCED_PIO)")
        ring.register_ports(vm, COM1, 1, burst=uart.write_thr_bytes if burst else None)
        uart.batch_output = True
        ring.after_drain.append(uart.flush_output)
        yield vcpu, ring, uart, output, line, pio


def test_thr_writes_are_queued_by_kvm_and_reach_the_uart_in_the_guests_order() -> None:
    done = threading.Event()

    class Done:
        def read(self, offset: int, size: int) -> int:
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            done.set()

    with uart_guest(PROGRAM, burst=False) as (vcpu, ring, _, output, line, pio):
        pio.insert(0x14, 1, Done())
        loop = VcpuLoop(vcpu, pio, ring.mmio_bus, coalesced=ring)
        thread = loop.start_thread()
        assert done.wait(10), "the guest did not finish"
        loop.request_stop()
        thread.join(5)
        regs = vcpu.get_regs()
    assert ring.replayed == 6  # A B C, DLL, D, E: none of them exited
    assert output.chunks == [b"ABC", b"D", b"E"]
    assert regs.rbx & 0xFFFF == 0x0001  # DLL = 1 and DLM untouched (0x00 of the default 0x000C)
    assert line.history == [True]  # THRI on: THRE raised, and still pending after 'E'


# --- the booting console's LSR polls, answered ahead of the queued bytes ----------------------------------


def test_the_booting_consoles_lsr_polls_do_not_replay_the_ring_and_its_ier_write_does() -> None:
    # Linux's console before user space opens the port: IER saved and cleared, LSR before every byte, LSR
    # for TEMT, IER restored (the trapped write that replays the line).
    text = b"[    0.000000] x\n"
    steps = [inb(IER), outb(IER, 0)]
    for byte in text:
        steps += [inb(LSR), queued(byte)]
    steps += [inb(LSR), outb(IER, 0), inb(IER), halt]
    vcpu, _, output, line, ring, replayed_at_lsr = run_script(steps, burst=True, read_ahead=True)
    assert vcpu.answers == [0, *[LSR_THRE_TEMT] * (len(text) + 1), 0]
    assert replayed_at_lsr == [0] * (len(text) + 1)  # no LSR read waited for a replay
    assert output.chunks == [text]  # one write for the line, at the IER write
    assert ring.replayed == len(text) and not any(line.history)


def test_with_thri_on_or_in_loopback_lsr_reads_replay_first() -> None:
    # Interrupt-driven transmit: the bytes' THRE interrupt must be raised before the guest goes on.
    steps = [outb(IER, IER_THRI), inb(IIR), inb(LSR), queued(*b"ab"), inb(LSR), inb(IIR), outb(IER, 0)]
    # Loopback (MCR bit 4): a THR byte comes back as received data, which LSR shows.
    steps += [outb(4, 0x10), queued(ord("z")), inb(LSR), inb(THR), outb(4, 0), halt]
    vcpu, _, output, line, _, replayed_at_lsr = run_script(steps, burst=True, read_ahead=True)
    assert replayed_at_lsr == []
    assert [vcpu.answers[0] & 0x0F, vcpu.answers[1], vcpu.answers[2], vcpu.answers[3] & 0x0F] == [
        IIR_THRI, LSR_THRE_TEMT, LSR_THRE_TEMT, IIR_THRI]
    assert vcpu.answers[4] == LSR_THRE_TEMT | 0x01 and vcpu.answers[5] == ord("z")  # DR, then the byte
    assert output.data == b"ab" and line.history[:2] == [True, False]


def test_the_sweeper_writes_out_bytes_left_in_the_ring_and_goes_back_to_sleep() -> None:
    output = Output()
    uart = Serial16550(Line(), output)
    pio, mmio = IoBus("pio", 1 << 16), IoBus("mmio")
    pio.insert(COM1, 8, uart)
    vcpu = ScriptedVcpu([])
    ring = CoalescedRing(vcpu.run_address + RING_OFFSET, PAGE, pio, mmio)
    vcpu.ring = ring
    uart.batch_output = True
    ring.after_drain.append(uart.flush_output)
    ring.add_burst(COM1, uart.write_thr_bytes)
    ring.sweeper.start()
    try:
        for byte in b"login: ":
            vcpu.queue(COM1, byte)
        uart.write(THR, 1, ord("!"))  # a byte that exited on a full ring waits in the UART for a flush
        assert output.chunks == [] and not ring.sweeper.awake
        ring.sweeper.wake()  # what a vCPU does after answering a read ahead
        deadline = threading.Event()
        for _ in range(100):
            if not ring.sweeper.awake:
                break
            deadline.wait(0.01)
        assert not ring.sweeper.awake  # asleep again after one sweep found no new read ahead
        assert output.data == b"!login: " and not ring.pending()
    finally:
        ring.sweeper.close()


# Real mode: Linux's console while it boots, three times (LSR, then a byte to THR), then it idles in HLT
# with interrupts off, which KVM handles without an exit: nothing but the sweeper can write the bytes out.
IDLING_CONSOLE = bytes(
    [
        0xBA, 0xFD, 0x03, 0xEC, 0xBA, 0xF8, 0x03, 0xB0, 0x41, 0xEE,  # LSR; 'A'
        0xBA, 0xFD, 0x03, 0xEC, 0xBA, 0xF8, 0x03, 0xB0, 0x42, 0xEE,  # LSR; 'B'
        0xBA, 0xFD, 0x03, 0xEC, 0xBA, 0xF8, 0x03, 0xB0, 0x43, 0xEE,  # LSR; 'C'
        0xFA, 0xF4,                                                  # cli; hlt
    ]
)  # fmt: skip


def test_bytes_written_after_an_lsr_read_ahead_come_out_while_the_guest_idles_in_hlt() -> None:
    with uart_guest(IDLING_CONSOLE, burst=True) as (vcpu, ring, uart, output, _, pio):
        ring.add_read_ahead(COM1 + LSR, uart.read_lsr_ahead)
        ring.sweeper.start()
        loop = VcpuLoop(vcpu, pio, ring.mmio_bus, coalesced=ring)
        thread = loop.start_thread()
        try:
            waited = threading.Event()
            for _ in range(200):
                if output.data == b"ABC":
                    break
                waited.wait(0.01)
            assert output.data == b"ABC"
            assert thread.is_alive()  # the vCPU is still in KVM_RUN: the sweeper wrote them out
            assert ring.replayed == 3
        finally:
            loop.request_stop()
            thread.join(5)
            ring.sweeper.close()


def test_a_close_landing_just_as_the_sweepers_delay_runs_out_ends_it() -> None:
    """close() between the sweeper's delay and its next sweep must not be lost: the full suite once found a
    VM's teardown waiting 5 s for a sweeper that had cleared close()'s wake and slept on. Here close()'s two
    steps happen exactly there, inside the delay's wait as it times out."""
    vcpu = ScriptedVcpu([])
    ring = CoalescedRing(vcpu.run_address + RING_OFFSET, PAGE, IoBus("pio", 1 << 16), IoBus("mmio"))
    sweeper = RingSweeper(ring, delay=0.001)

    class ClosedAsTheDelayRunsOut(threading.Event):
        fired = False

        def wait(self, timeout: float | None = None) -> bool:
            done = super().wait(timeout)
            if timeout is not None and not done and not self.fired:
                self.fired = True
                self.set()  # what close() does, in its order
                sweeper._wake.set()
            return done

    sweeper._closed = ClosedAsTheDelayRunsOut()
    sweeper.start()
    thread = sweeper._thread
    assert thread is not None
    sweeper.wake()
    thread.join(2.0)
    alive = thread.is_alive()
    sweeper.close()
    assert not alive and sweeper._closed.fired
