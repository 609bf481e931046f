"""The per-vCPU run loop: KVM_RUN, dispatch of I/O exits to the buses, and why the vCPU stopped.

One thread per vCPU calls `VcpuLoop.run()`. Any thread may call `request_stop()`: it sets
kvm_run.immediate_exit (so a KVM_RUN that has not started yet returns at once) and sends the kick signal
to the vCPU thread (so a KVM_RUN that is blocked, e.g. in a guest HLT, returns EINTR). The kick signal
needs a handler, installed once from the main thread with `install_kick_handler()`: with the default
disposition the signal would kill the process, and an ignored signal would not interrupt KVM_RUN.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from pyvmm import sandbox
from pyvmm.kvm.bindings import (
    KvmExit,
    KvmExitIo,
    KvmInternalError,
    KvmSystemEvent,
    _kvm_run_io,
    _kvm_run_mmio,
    kvm_regs,
    kvm_run,
    kvm_sregs,
)
from pyvmm.kvm.bus import Bus
from pyvmm.kvm.coalesced import CoalescedRing
from pyvmm.kvm.regs import format_registers, is_reset_state
from pyvmm.threadname import set_thread_comm

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1

# Plain ints: comparing against these is cheaper than against enum members on the hot path.
_EXIT_IO = int(KvmExit.KVM_EXIT_IO)
_EXIT_MMIO = int(KvmExit.KVM_EXIT_MMIO)
_EXIT_INTR = int(KvmExit.KVM_EXIT_INTR)
_IO_OUT = int(KvmExitIo.KVM_EXIT_IO_OUT)
_EXIT_U_OFFSET = kvm_run.u.offset
_MMIO_DATA_OFFSET = _EXIT_U_OFFSET + _kvm_run_mmio.data.offset
# struct kvm_run's exit unions, as the kernel lays them out (checked against the ctypes bindings below)
_IO_EXIT = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO_EXIT = struct.Struct("<QQIB")  # phys_addr, data[8] (little endian), len, is_write
_ITEM = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}
_U64 = _ITEM[8]
_RING_INDICES = struct.Struct("<II")  # struct kvm_coalesced_mmio_ring: first, last
# Per MMIO length: the mask of its bytes, and of the data bytes KVM left beyond them (kept as they were).
_MMIO_MASKS = {n: ((1 << (8 * n)) - 1, ~((1 << (8 * n)) - 1) & 0xFFFF_FFFF_FFFF_FFFF) for n in range(1, 9)}
assert (_kvm_run_io.direction.offset, _kvm_run_io.size.offset, _kvm_run_io.port.offset,
        _kvm_run_io.count.offset, _kvm_run_io.data_offset.offset) == (0, 1, 2, 4, 8)
assert (_kvm_run_mmio.phys_addr.offset, _kvm_run_mmio.data.offset, _kvm_run_mmio.len.offset,
        _kvm_run_mmio.is_write.offset) == (0, 8, 16, 20)


class StopReason(IntEnum):
    STOPPED = 0  # request_stop() was called
    POWEROFF = 1  # the guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN)
    RESET = 2  # the guest asked for a reset (KVM_SYSTEM_EVENT_RESET)
    HALTED = 3  # HLT reached userspace: only without the in-kernel irqchip, nothing can wake the vCPU
    ERROR = 4  # triple fault, entry failure, internal error, crash, device exception...


@dataclass(frozen=True)
class RunResult:
    """Why a vCPU loop ended. For ERROR, `message` is one line and `registers` a multi-line dump."""

    reason: StopReason
    vcpu: int
    message: str = ""
    registers: str = ""

    def describe(self) -> str:
        """Text for stderr: 'vCPU n: <message>' followed by the register dump, if any."""
        text = f"vCPU {self.vcpu}: {self.message or self.reason.name.lower()}"
        return f"{text}\n{self.registers}" if self.registers else text


class RunnableVcpu(Protocol):
    """What the loop needs of a vCPU (pyvmm.kvm.system.Vcpu provides it)."""

    index: int
    run_address: int
    mmap_size: int  # of the vCPU mapping: kvm_run, then the port-I/O data page
    kvm_run: kvm_run

    def run(self) -> int: ...
    def run_call(self) -> Callable[[], int]: ...
    def get_regs(self) -> kvm_regs: ...
    def get_sregs(self) -> kvm_sregs: ...


def _nothing_queued() -> int:
    return 0


def install_kick_handler(signum: int = KICK_SIGNAL) -> None:
    """Give the kick signal a no-op handler; call from the main thread before starting vCPU threads."""
    if signal.getsignal(signum) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signum, _ignore_kick)


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick only has to interrupt KVM_RUN; there is nothing to do when it is delivered."""


class VcpuLoop:
    """Runs one vCPU until it stops; `on_stop(result)` is called on the vCPU thread as the loop ends."""

    def __init__(
        self,
        vcpu: RunnableVcpu,
        pio_bus: Bus,
        mmio_bus: Bus,
        on_stop: Callable[[RunResult], None] | None = None,
        kick_signal: int = KICK_SIGNAL,
        debug: bool = False,
        coalesced: CoalescedRing | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.coalesced = coalesced
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.on_stop = on_stop
        self.kick_signal = kick_signal
        self.debug = debug
        self.result: RunResult | None = None
        self._stop = False
        self._thread_id: int | None = None
        self._thread_lock = threading.Lock()
        # One byte view of the whole vCPU mapping: every exit is decoded with a single struct unpack from it
        # (each ctypes field read costs about as much as the unpack, and an exit needs five of them).
        mapping = (ctypes.c_char * vcpu.mmap_size).from_address(vcpu.run_address)
        self._page = memoryview(mapping).cast("B")

    # --- control (any thread) ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Make the loop end with STOPPED as soon as possible (idempotent, safe from any thread)."""
        self._stop = True
        self.vcpu.kvm_run.immediate_exit = 1
        with self._thread_lock:
            # The lock keeps the thread alive while it is signalled (run() clears the id under it).
            if self._thread_id is not None and self._thread_id != threading.get_ident():
                signal.pthread_kill(self._thread_id, self.kick_signal)

    def rearm(self) -> None:
        """Make a loop that ended with STOPPED runnable again (resuming a paused VM); its thread has ended."""
        with self._thread_lock:
            if self._thread_id is not None:
                raise RuntimeError(f"vCPU {self.vcpu.index} is still running")
        self._stop = False
        self.vcpu.kvm_run.immediate_exit = 0
        self.result = None

    @property
    def stop_requested(self) -> bool:
        return self._stop

    def start_thread(self) -> threading.Thread:
        """Run the loop on a new daemon thread named vcpu<N>."""
        thread = threading.Thread(target=self.run, name=f"vcpu{self.vcpu.index}", daemon=True)
        thread.start()
        return thread

    # --- the loop (vCPU thread) ----------------------------------------------------------------------------

    def run(self) -> RunResult:
        handler = signal.getsignal(self.kick_signal)
        if handler in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise RuntimeError(
                f"signal {signal.Signals(self.kick_signal).name} has no handler: "
                "call install_kick_handler() in the main thread first"
            )
        with self._thread_lock:
            self._thread_id = threading.get_ident()
        set_thread_comm(f"vcpu{self.vcpu.index}")
        try:
            result = self._loop()
        finally:
            with self._thread_lock:
                self._thread_id = None
        if self.coalesced is not None:
            # Writes this vCPU queued before it stopped (e.g. the console's last bytes) are not lost.
            try:
                self.coalesced.drain()
            except Exception as e:
                log.warning("vCPU %d: replaying queued writes as it stopped: %s", self.vcpu.index, e)
        self.result = result
        if self.on_stop is not None:
            self.on_stop(result)
        return result

    def _loop(self) -> RunResult:
        vcpu = self.vcpu
        run = vcpu.kvm_run
        page = self._page
        # KVM_RUN as one call that returns the exit reason: the hot path's fewest Python frames
        # (bench/exit_cost.py's `pio` row against its `bare` floor).
        run_vcpu = vcpu.run_call()
        unpack_io = _IO_EXIT.unpack_from
        io_exit = self._io_exit
        mmio_exit = self._mmio_exit
        debug = self.debug
        ring = self.coalesced
        # Writes KVM queued in the coalesced ring happened before this exit: devices see them first,
        drain: Callable[[], int] = ring.drain if ring is not None else _nothing_queued
        # the ring's first and last index in one read: the common empty ring costs no call to drain
        ring_page = ring.header_view if ring is not None else None
        ring_indices = _RING_INDICES.unpack_from
        # except for the reads their device answers ahead of them (kvm/coalesced.py).
        read_ahead = ring.read_ahead if ring is not None else {}
        sweep_after = ring.sweep_after if ring is not None else set()
        sweeper = ring.sweeper if ring is not None else None
        try:
            sandbox.enter(sandbox.ThreadKind.VCPU)  # this thread's seccomp filter, when --seccomp is on
            while not self._stop:
                reason = run_vcpu()
                if debug:
                    log.debug("vCPU %d: exit %s", vcpu.index, _exit_name(reason))
                if reason == _EXIT_IO:
                    direction, size, port, count, offset = unpack_io(page, _EXIT_U_OFFSET)
                    if read_ahead and direction != _IO_OUT and count == 1:
                        read = read_ahead.get(port)
                        if read is not None and (value := read(size)) >= 0:
                            if size == 1:
                                page[offset] = value
                            else:
                                _ITEM[size].pack_into(page, offset, value)
                            if sweeper is not None and not sweeper.awake and port in sweep_after:
                                sweeper.wake()
                            continue
                    if ring_page is not None:
                        first, last = ring_indices(ring_page)
                        if first != last:
                            drain()
                    io_exit(direction, size, port, count, offset)
                elif reason == _EXIT_MMIO:
                    if ring_page is not None:
                        first, last = ring_indices(ring_page)
                        if first != last:
                            drain()
                    mmio_exit()
                elif reason != _EXIT_INTR:
                    result = self._other_exit(reason, run)
                    if result is not None:
                        return result
        except Exception as e:  # a device or KVM_RUN failed: the VM cannot go on, report it in one line
            # (a host-side failure, e.g. out of file descriptors: the guest's registers say nothing about
            # it, so they are shown only with -v)
            return self._error(f"{type(e).__name__}: {e}", with_registers=debug)
        return RunResult(StopReason.STOPPED, vcpu.index)

    def _io_exit(self, direction: int, size: int, port: int, count: int, offset: int) -> None:
        page = self._page
        item = _ITEM[size]
        bus = self.pio_bus
        # count > 1 for string I/O (rep ins/outs): the elements are consecutive in the data area.
        if direction == _IO_OUT:
            for i in range(count):
                bus.write(port, size, item.unpack_from(page, offset + i * size)[0])
        else:
            for i in range(count):
                item.pack_into(page, offset + i * size, bus.read(port, size))

    def _mmio_exit(self) -> None:
        page = self._page
        addr, data, length, is_write = _MMIO_EXIT.unpack_from(page, _EXIT_U_OFFSET)
        masks = _MMIO_MASKS.get(length)
        if masks is None:
            raise ValueError(f"MMIO exit of {length} bytes at {addr:#x}")
        # Odd lengths do not occur for ordinary instructions; the mask keeps them byte-exact anyway.
        mask, beyond = masks
        if is_write:
            self.mmio_bus.write(addr, length, data & mask)
        else:
            value = self.mmio_bus.read(addr, length) & mask
            _U64.pack_into(page, _MMIO_DATA_OFFSET, value | (data & beyond))

    # --- rare exits ----------------------------------------------------------------------------------------

    def _other_exit(self, reason: int, run: kvm_run) -> RunResult | None:
        index = self.vcpu.index
        if reason == KvmExit.KVM_EXIT_HLT:
            return RunResult(StopReason.HALTED, index, "halted with no irqchip to wake it")
        if reason == KvmExit.KVM_EXIT_SYSTEM_EVENT:
            event = run.system_event.type
            if event == KvmSystemEvent.KVM_SYSTEM_EVENT_SHUTDOWN:
                return RunResult(StopReason.POWEROFF, index)
            if event == KvmSystemEvent.KVM_SYSTEM_EVENT_RESET:
                return RunResult(StopReason.RESET, index)
            if event == KvmSystemEvent.KVM_SYSTEM_EVENT_CRASH:
                return self._error("guest crashed (KVM_SYSTEM_EVENT_CRASH)")
            return self._error(f"unexpected system event {_enum_name(KvmSystemEvent, event)}")
        if reason == KvmExit.KVM_EXIT_SHUTDOWN:
            return self._triple_fault()
        if reason == KvmExit.KVM_EXIT_FAIL_ENTRY:
            fail = run.fail_entry
            return self._error(
                f"VM entry failed (KVM_EXIT_FAIL_ENTRY): hardware reason "
                f"{fail.hardware_entry_failure_reason:#x} on host CPU {fail.cpu}"
            )
        if reason == KvmExit.KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            data = " ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
            return self._error(
                f"KVM internal error {_enum_name(KvmInternalError, internal.suberror)}"
                + (f" data: {data}" if data else "")
            )
        if reason == KvmExit.KVM_EXIT_IRQ_WINDOW_OPEN:
            return None
        return self._error(f"unhandled exit {_exit_name(reason)}")

    def _triple_fault(self) -> RunResult:
        message = "triple fault (KVM_EXIT_SHUTDOWN)"
        try:
            reset = is_reset_state(self.vcpu.get_regs(), self.vcpu.get_sregs())
        except Exception:  # _error reports unreadable registers itself
            reset = False
        if reset:
            # KVM on AMD has already re-initialised the vCPU: the dump is its reset state. Without this a
            # running vCPU that faulted reads as an AP that never left real mode.
            message += ("; the registers below are the vCPU's reset state (KVM re-initialises a vCPU after a "
                        "shutdown on AMD): where it faulted is lost")
        return self._error(message)

    def _error(self, message: str, with_registers: bool = True) -> RunResult:
        if not with_registers:
            return RunResult(StopReason.ERROR, self.vcpu.index, message)
        try:
            registers = format_registers(self.vcpu.get_regs(), self.vcpu.get_sregs())
        except Exception as e:  # the report must not be lost because the registers are unreadable
            registers = f"(registers unavailable: {e})"
        return RunResult(StopReason.ERROR, self.vcpu.index, message, registers)


def stop_all(loops: Iterable[VcpuLoop]) -> None:
    for loop in loops:
        loop.request_stop()


def _enum_name(enum: type[IntEnum], value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)


def _exit_name(reason: int) -> str:
    return _enum_name(KvmExit, reason)
