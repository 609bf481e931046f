"""Run-loop dispatch against a scripted vCPU (no KVM needed): exits are written into a real kvm_run
layout exactly where the kernel puts them, and what the loop writes back is read from the same memory."""

from __future__ import annotations

import ctypes
import signal
import threading
import time
from collections.abc import Callable

import pytest

from pyvmm.devices.bus import IoBus
from pyvmm.kvm.bindings import (
    KvmExit,
    KvmInternalError,
    KvmSystemEvent,
    kvm_regs,
    kvm_run,
    kvm_sregs,
)
from pyvmm.kvm.runloop import RunResult, StopReason, VcpuLoop, install_kick_handler, stop_all

DATA_OFFSET = 0x1000  # where KVM puts port-I/O data (one page after kvm_run)

Step = Callable[["FakeVcpu"], int]


class FakeVcpu:
    """Replays `steps`; each fills kvm_run like KVM would and returns the exit reason."""

    def __init__(self, steps: list[Step], index: int = 0) -> None:
        self.index = index
        self.mmap_size = 3 * 0x1000
        self._page = ctypes.create_string_buffer(self.mmap_size)
        self.run_address = ctypes.addressof(self._page)
        self.kvm_run = kvm_run.from_buffer(self._page)
        self.steps = list(steps)
        self.runs = 0

    def run_call(self) -> Callable[[], int]:
        return self.run

    def run(self) -> int:
        self.runs += 1
        if not self.steps:
            raise AssertionError("the loop ran past the end of the script")
        return self.steps.pop(0)(self)

    def get_regs(self) -> kvm_regs:
        return kvm_regs(rip=0xFFF0, rax=0x1234, rflags=0x46)

    def get_sregs(self) -> kvm_sregs:
        sregs = kvm_sregs(cr0=0x60000010)
        sregs.cs.selector = 0xF000
        sregs.cs.base = 0xFFFF0000
        return sregs

    def data(self, offset: int, length: int) -> bytes:
        return ctypes.string_at(self.run_address + offset, length)

    def set_data(self, offset: int, data: bytes) -> None:
        ctypes.memmove(self.run_address + offset, data, len(data))


def io_out(port: int, size: int, values: list[int]) -> Step:
    def step(v: FakeVcpu) -> int:
        r = v.kvm_run
        r.exit_reason = KvmExit.KVM_EXIT_IO
        r.io.direction, r.io.size, r.io.port, r.io.count, r.io.data_offset = (
            1,
            size,
            port,
            len(values),
            DATA_OFFSET,
        )
        v.set_data(DATA_OFFSET, b"".join(x.to_bytes(size, "little") for x in values))
        return KvmExit.KVM_EXIT_IO

    return step


def io_in(port: int, size: int, count: int) -> Step:
    def step(v: FakeVcpu) -> int:
        r = v.kvm_run
        r.exit_reason = KvmExit.KVM_EXIT_IO
        r.io.direction, r.io.size, r.io.port, r.io.count, r.io.data_offset = 0, size, port, count, DATA_OFFSET
        v.set_data(DATA_OFFSET, b"\xcc" * size * count)
        return KvmExit.KVM_EXIT_IO

    return step


def mmio(addr: int, length: int, write_value: int | None = None) -> Step:
    def step(v: FakeVcpu) -> int:
        m = v.kvm_run.mmio
        m.phys_addr, m.len, m.is_write = addr, length, write_value is not None
        ctypes.memmove(m.data, b"\xcc" * 8, 8)
        if write_value is not None:
            ctypes.memmove(m.data, write_value.to_bytes(length, "little"), length)
        return KvmExit.KVM_EXIT_MMIO

    return step


def capture(into: list[bytes], offset: int, length: int) -> Step:
    """Record the data area left by the previous exit, then stop the loop with a HLT exit."""

    def step(v: FakeVcpu) -> int:
        into.append(v.data(offset, length))
        return KvmExit.KVM_EXIT_HLT

    return step


def exit_with(reason: int, fill: Callable[[kvm_run], None] | None = None) -> Step:
    def step(v: FakeVcpu) -> int:
        if fill is not None:
            fill(v.kvm_run)
        return reason

    return step


class Device:
    def __init__(self, read_values: list[int] | None = None, fail: bool = False) -> None:
        self.log: list[tuple[str, int, int, int]] = []
        self.read_values = list(read_values or [])
        self.fail = fail

    def read(self, offset: int, size: int) -> int:
        value = self.read_values.pop(0)
        self.log.append(("r", offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if self.fail:
            raise ValueError("device exploded")
        self.log.append(("w", offset, size, value))


@pytest.fixture(autouse=True)
def kick_handler() -> None:
    install_kick_handler()


def make_loop(
    steps: list[Step], pio: Device | None = None, mmio_dev: Device | None = None
) -> tuple[VcpuLoop, FakeVcpu]:
    pio_bus, mmio_bus = IoBus("pio", 1 << 16), IoBus("mmio")
    if pio is not None:
        pio_bus.insert(0x3F8, 8, pio)
    if mmio_dev is not None:
        mmio_bus.insert(0xD000_0000, 0x1000, mmio_dev)
    vcpu = FakeVcpu(steps)
    return VcpuLoop(vcpu, pio_bus, mmio_bus), vcpu


def test_port_writes_of_each_size_and_string_out() -> None:
    dev = Device()
    loop, _ = make_loop(
        [
            io_out(0x3F8, 1, [0x41]),
            io_out(0x3FA, 2, [0xBEEF]),
            io_out(0x3FC, 4, [0xDEADBEEF]),
            io_out(0x3F9, 1, [ord(c) for c in "abc"]),  # rep outsb: count 3
            io_out(0x80, 1, [0x99]),  # unclaimed: dropped
            exit_with(KvmExit.KVM_EXIT_HLT),
        ],
        pio=dev,
    )
    assert loop.run().reason == StopReason.HALTED
    assert dev.log == [
        ("w", 0, 1, 0x41),
        ("w", 2, 2, 0xBEEF),
        ("w", 4, 4, 0xDEADBEEF),
        ("w", 1, 1, 0x61),
        ("w", 1, 1, 0x62),
        ("w", 1, 1, 0x63),
    ]


def test_port_reads_fill_the_data_area() -> None:
    seen: list[bytes] = []
    dev = Device(read_values=[0x1122, 0x05, 0x06, 0x07])
    loop, _ = make_loop(
        [io_in(0x3FE, 2, 1), capture(seen, DATA_OFFSET, 2)],
        pio=dev,
    )
    loop.run()
    loop2, _ = make_loop([io_in(0x3F8, 1, 3), capture(seen, DATA_OFFSET, 3)], pio=dev)
    loop2.run()
    loop3, _ = make_loop([io_in(0x60, 4, 1), capture(seen, DATA_OFFSET, 4)], pio=dev)  # unclaimed
    loop3.run()
    assert seen == [b"\x22\x11", b"\x05\x06\x07", b"\xff\xff\xff\xff"]
    assert [e[:3] for e in dev.log] == [("r", 6, 2), ("r", 0, 1), ("r", 0, 1), ("r", 0, 1)]


def test_mmio_writes_and_reads() -> None:
    seen: list[bytes] = []
    dev = Device(read_values=[0xA55A, 0x0102030405060708, 0xABCDEF])
    mmio_data = 0x28  # offsetof(struct kvm_run, mmio.data) in the kernel header
    loop, _ = make_loop(
        [
            mmio(0xD000_0010, 4, 0x12345678),
            mmio(0xD000_0018, 8, 0x1122334455667788),
            mmio(0xD000_0020, 2),
            capture(seen, mmio_data, 8),
        ],
        mmio_dev=dev,
    )
    loop.run()
    loop2, _ = make_loop([mmio(0xD000_0028, 8), capture(seen, mmio_data, 8)], mmio_dev=dev)
    loop2.run()
    loop3, _ = make_loop(
        [mmio(0xD000_0030, 3, 0x665544), mmio(0xD000_0030, 3), capture(seen, mmio_data, 4)], mmio_dev=dev
    )
    loop3.run()
    loop4, _ = make_loop([mmio(0xE000_0000, 4), capture(seen, mmio_data, 8)], mmio_dev=dev)  # unclaimed
    loop4.run()
    assert dev.log == [
        ("w", 0x10, 4, 0x12345678),
        ("w", 0x18, 8, 0x1122334455667788),
        ("r", 0x20, 2, 0xA55A),
        ("r", 0x28, 8, 0x0102030405060708),
        ("w", 0x30, 3, 0x665544),
        ("r", 0x30, 3, 0xABCDEF),
    ]
    assert seen == [
        b"\x5a\xa5" + b"\xcc" * 6,  # only `len` bytes are written back
        (0x0102030405060708).to_bytes(8, "little"),
        b"\xef\xcd\xab\xcc",
        b"\xff" * 4 + b"\xcc" * 4,
    ]


def _system_event(kind: int) -> Step:
    def fill(r: kvm_run) -> None:
        r.system_event.type = kind

    return exit_with(KvmExit.KVM_EXIT_SYSTEM_EVENT, fill)


@pytest.mark.parametrize(
    ("step", "reason", "message"),
    [
        (_system_event(KvmSystemEvent.KVM_SYSTEM_EVENT_SHUTDOWN), StopReason.POWEROFF, ""),
        (_system_event(KvmSystemEvent.KVM_SYSTEM_EVENT_RESET), StopReason.RESET, ""),
        (_system_event(KvmSystemEvent.KVM_SYSTEM_EVENT_CRASH), StopReason.ERROR, "guest crashed"),
        (_system_event(77), StopReason.ERROR, "unexpected system event 77"),
        (exit_with(KvmExit.KVM_EXIT_SHUTDOWN), StopReason.ERROR, "triple fault"),
        (exit_with(KvmExit.KVM_EXIT_HLT), StopReason.HALTED, "halted"),
        (exit_with(KvmExit.KVM_EXIT_DEBUG), StopReason.ERROR, "unhandled exit KVM_EXIT_DEBUG"),
        (exit_with(99), StopReason.ERROR, "unhandled exit 99"),
    ],
)
def test_stop_reasons(step: Step, reason: StopReason, message: str) -> None:
    loop, _ = make_loop([exit_with(KvmExit.KVM_EXIT_INTR), exit_with(KvmExit.KVM_EXIT_IRQ_WINDOW_OPEN), step])
    result = loop.run()
    assert result.reason == reason
    assert message in result.message
    # Errors carry a register dump; the orderly stops do not.
    assert ("RIP=000000000000fff0" in result.registers) == (reason == StopReason.ERROR)
    if reason == StopReason.ERROR:
        assert "CS =f000 base=00000000ffff0000" in result.registers
        assert "CR0=60000010" in result.registers


def test_fail_entry_and_internal_error_details() -> None:
    def fail(r: kvm_run) -> None:
        r.fail_entry.hardware_entry_failure_reason = 0x80000021
        r.fail_entry.cpu = 3

    def internal(r: kvm_run) -> None:
        r.internal.suberror = KvmInternalError.KVM_INTERNAL_ERROR_EMULATION
        r.internal.ndata = 2
        r.internal.data[0], r.internal.data[1] = 0x10, 0x20

    loop, _ = make_loop([exit_with(KvmExit.KVM_EXIT_FAIL_ENTRY, fail)])
    assert "hardware reason 0x80000021 on host CPU 3" in loop.run().message
    loop, _ = make_loop([exit_with(KvmExit.KVM_EXIT_INTERNAL_ERROR, internal)])
    assert loop.run().message == "KVM internal error KVM_INTERNAL_ERROR_EMULATION data: 0x10 0x20"


def test_device_exception_becomes_error_result() -> None:
    loop, vcpu = make_loop([io_out(0x3F8, 1, [1]), exit_with(KvmExit.KVM_EXIT_HLT)], pio=Device(fail=True))
    result = loop.run()
    assert result.reason == StopReason.ERROR
    assert result.message == "ValueError: device exploded"
    assert result.registers == ""  # a host-side failure: one line, the guest's registers only with -v
    assert result.describe() == "vCPU 0: ValueError: device exploded"
    assert vcpu.runs == 1
    loop, _ = make_loop([io_out(0x3F8, 1, [1])], pio=Device(fail=True))
    loop.debug = True
    assert "RIP=" in loop.run().registers


def test_stop_from_a_device_on_the_vcpu_thread_and_on_stop_callback() -> None:
    results: list[RunResult] = []
    loop: VcpuLoop | None = None

    class Stopper:
        def read(self, offset: int, size: int) -> int:
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            assert loop is not None
            loop.request_stop()

    pio_bus = IoBus("pio", 1 << 16)
    pio_bus.insert(0x500, 1, Stopper())
    vcpu = FakeVcpu([io_out(0x500, 1, [1]), exit_with(KvmExit.KVM_EXIT_HLT)])
    loop = VcpuLoop(vcpu, pio_bus, IoBus(), on_stop=results.append)
    result = loop.run()
    assert result == RunResult(StopReason.STOPPED, 0)
    assert results == [result] and loop.result == result
    assert vcpu.kvm_run.immediate_exit == 1
    assert vcpu.runs == 1


def test_request_stop_kicks_a_thread_blocked_in_a_syscall() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    entered = threading.Event()

    def blocking_run(v: FakeVcpu) -> int:
        entered.set()
        libc.pause()  # like a KVM_RUN sleeping on HLT: only a signal ends it
        return KvmExit.KVM_EXIT_INTR

    loops = []
    threads = []
    for i in range(2):
        vcpu = FakeVcpu([blocking_run, blocking_run], index=i)
        loops.append(VcpuLoop(vcpu, IoBus(), IoBus()))
        entered.clear()
        threads.append(loops[-1].start_thread())
        assert entered.wait(5)
    time.sleep(0.05)  # both threads are now inside pause()
    started = time.monotonic()
    stop_all(loops)
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert time.monotonic() - started < 2
    assert [lp.result for lp in loops] == [RunResult(StopReason.STOPPED, 0), RunResult(StopReason.STOPPED, 1)]
    assert [t.name for t in threads] == ["vcpu0", "vcpu1"]


def test_run_refuses_to_start_without_a_kick_handler() -> None:
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        loop = VcpuLoop(FakeVcpu([]), IoBus(), IoBus(), kick_signal=signal.SIGUSR2)
        with pytest.raises(RuntimeError, match="install_kick_handler"):
            loop.run()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_describe() -> None:
    assert RunResult(StopReason.POWEROFF, 2).describe() == "vCPU 2: poweroff"
    error = RunResult(StopReason.ERROR, 0, "triple fault (KVM_EXIT_SHUTDOWN)", "RAX=0\nRIP=1")
    assert error.describe() == "vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)\nRAX=0\nRIP=1"


def test_thread_comm_is_set_for_tools_that_read_proc() -> None:
    """Kata finds vCPU threads by /proc/PID/task/TID/comm, which Python's thread name does not set."""
    import os
    from pathlib import Path

    from pyvmm.threadname import set_thread_comm

    seen: list[str] = []

    def body() -> None:
        set_thread_comm("vcpu7")
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == ["vcpu7"]
    assert Path(f"/proc/self/task/{os.getpid()}/comm").read_text().strip() != "vcpu7"  # only that thread


class FaultedVcpu(FakeVcpu):
    """A vCPU that triple faulted in long mode and kept its registers (KVM on Intel)."""

    def get_regs(self) -> kvm_regs:
        return kvm_regs(rip=0xFFFFFFFF81000000, rflags=0x46)

    def get_sregs(self) -> kvm_sregs:
        sregs = kvm_sregs(cr0=0x80050033)
        sregs.cs.selector = 0x10
        return sregs


def test_triple_fault_says_when_the_registers_are_the_reset_state() -> None:
    # KVM on AMD re-initialises the vCPU before KVM_EXIT_SHUTDOWN: the dump is the reset vector's state.
    reset = make_loop([exit_with(KvmExit.KVM_EXIT_SHUTDOWN)])[0].run()
    assert reset.message.startswith("triple fault (KVM_EXIT_SHUTDOWN); the registers below are the vCPU's "
                                    "reset state")
    assert "RIP=000000000000fff0" in reset.registers
    faulted = VcpuLoop(FaultedVcpu([exit_with(KvmExit.KVM_EXIT_SHUTDOWN)]), IoBus("pio"), IoBus("mmio")).run()
    assert faulted.message == "triple fault (KVM_EXIT_SHUTDOWN)"
    assert "RIP=ffffffff81000000" in faulted.registers
