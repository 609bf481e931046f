"""`python -m pyvmm.kvm.selftest`: prove that this host's KVM runs a guest through pyvmm's run loop.

A VM configured like a real one (TSS, identity map, in-kernel irqchip and PIT) runs a short real-mode
program on its own vCPU thread. The program does byte/word/dword port writes, string I/O in both
directions, an MMIO write and an MMIO read outside RAM, echoes what it read back through ports, then halts
with interrupts off. The halted vCPU is blocked inside KVM_RUN, so ending the run also proves that
request_stop() can kick a vCPU thread out of the kernel. Prints one line; exits 0 on success, 1 on failure.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pyvmm import layout
from pyvmm.kvm.runloop import RunResult, StopReason, VcpuLoop, install_kick_handler
from pyvmm.kvm.system import Kvm, Vcpu, Vm
from pyvmm.memory import GuestMemory

RAM_SIZE = 0x10000
CODE_GPA = 0x1000
OUT_DATA_GPA = 0x2000
IN_DATA_GPA = 0x3000
MMIO_BASE = 0xD0000  # DS = 0xD000: outside the 64 KiB of RAM, so accesses exit as MMIO
MMIO_READ_VALUE = 0xA55A
IN_PORT = 0x13
DONE_PORT = 0x14

# Real mode, CS = DS = ES = 0, IP = CODE_GPA.
PROGRAM = bytes(
    [
        0xB0, 0x42,                          # mov al, 0x42
        0xE6, 0x10,                          # out 0x10, al
        0xBA, 0xF8, 0x03,                    # mov dx, 0x3f8
        0xB0, 0x41,                          # mov al, 'A'
        0xEE,                                # out dx, al
        0x66, 0xB8, 0x78, 0x56, 0x34, 0x12,  # mov eax, 0x12345678
        0x66, 0xE7, 0x12,                    # out 0x12, eax
        0xFC,                                # cld
        0xBE, 0x00, 0x20,                    # mov si, OUT_DATA_GPA
        0xB9, 0x03, 0x00,                    # mov cx, 3
        0xF3, 0x6E,                          # rep outsb          (to dx = 0x3f8)
        0xBF, 0x00, 0x30,                    # mov di, IN_DATA_GPA
        0xB9, 0x02, 0x00,                    # mov cx, 2
        0xBA, 0x13, 0x00,                    # mov dx, IN_PORT
        0xF3, 0x6C,                          # rep insb
        0xB8, 0x00, 0xD0,                    # mov ax, MMIO_BASE >> 4
        0x8E, 0xD8,                          # mov ds, ax
        0xC7, 0x06, 0x10, 0x00, 0xEF, 0xBE,  # mov word [0x10], 0xbeef   (MMIO write)
        0xA1, 0x20, 0x00,                    # mov ax, [0x20]            (MMIO read)
        0xE7, 0x11,                          # out 0x11, ax
        0x31, 0xC0,                          # xor ax, ax
        0x8E, 0xD8,                          # mov ds, ax
        0xA1, 0x00, 0x30,                    # mov ax, [IN_DATA_GPA]
        0xE7, 0x14,                          # out DONE_PORT, ax
        0xFA,                                # cli
        0xF4,                                # hlt
    ]
)  # fmt: skip
OUT_DATA = b"xyz"
IN_VALUES = (0x61, 0x62)


@dataclass
class AccessLog:
    """Accesses (kind, absolute address, size, value) in guest order, plus the guest's end marker."""

    entries: list[tuple[str, int, int, int]] = field(default_factory=list)
    in_values: Iterator[int] = field(default_factory=lambda: iter(IN_VALUES))
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Probe:
    """A bus (pyvmm.kvm.bus.Bus) logging the accesses to its `ranges` (base, length) into `log` with absolute
    addresses; elsewhere it reads all-ones and drops writes, as pyvmm.devices.bus.IoBus does."""

    log: AccessLog
    ranges: tuple[tuple[int, int], ...]

    def _claims(self, addr: int) -> bool:
        return any(base <= addr < base + length for base, length in self.ranges)

    def read(self, addr: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        if not self._claims(addr):
            return mask
        value = (next(self.log.in_values, 0) if addr == IN_PORT else MMIO_READ_VALUE) & mask
        self.log.entries.append(("r", addr, size, value))
        return value

    def write(self, addr: int, size: int, value: int) -> None:
        if not self._claims(addr):
            return
        self.log.entries.append(("w", addr, size, value))
        if addr == DONE_PORT:
            self.log.done.set()


@dataclass
class SelftestRun:
    result: RunResult
    pio: list[tuple[str, int, int, int]]
    mmio: list[tuple[str, int, int, int]]
    in_data: bytes
    stop_latency: float


def expected_pio() -> list[tuple[str, int, int, int]]:
    return [
        ("w", 0x10, 1, 0x42),
        ("w", 0x3F8, 1, ord("A")),
        ("w", 0x12, 4, 0x12345678),
        *(("w", 0x3F8, 1, b) for b in OUT_DATA),
        *(("r", IN_PORT, 1, v) for v in IN_VALUES),
        ("w", 0x11, 2, MMIO_READ_VALUE),
        ("w", DONE_PORT, 2, IN_VALUES[0] | IN_VALUES[1] << 8),
    ]


def expected_mmio() -> list[tuple[str, int, int, int]]:
    return [("w", MMIO_BASE + 0x10, 2, 0xBEEF), ("r", MMIO_BASE + 0x20, 2, MMIO_READ_VALUE)]


def real_mode_vcpu(vm: Vm, memory: GuestMemory, rip: int, irqchip: bool = True) -> Vcpu:
    """Set `vm` up like a real one (TSS, identity map, with `irqchip` the in-kernel irqchip and PIT), map
    `memory` into it and return vCPU 0 ready to run a real-mode program at 0:`rip` with interrupts off."""
    vm.set_tss_addr(layout.KVM_TSS_START)
    vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
    if irqchip:
        vm.create_irqchip()
        vm.create_pit2()
    for slot, region in enumerate(memory.regions):
        vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = rip
    regs.rflags = 0x2  # bit 1 is reserved-one; IF clear
    regs.rsp = 0xF000
    vcpu.set_regs(regs)
    return vcpu


def run_program(
    irqchip: bool = True, timeout: float = 10.0, before_run: Callable[[], None] | None = None
) -> SelftestRun:
    """Run PROGRAM on a fresh VM; with irqchip=False the final HLT ends the loop by itself (HALTED).
    `before_run` is called once the VM is built, just before its vCPU thread starts (where pyvmm installs
    its seccomp filters)."""
    install_kick_handler()
    memory = GuestMemory([(0, RAM_SIZE)])
    memory.write(CODE_GPA, PROGRAM)
    memory.write(OUT_DATA_GPA, OUT_DATA)
    pio_log, mmio_log = AccessLog(), AccessLog()
    pio_bus = Probe(pio_log, ((0x10, 5), (0x3F8, 8)))
    mmio_bus = Probe(mmio_log, ((MMIO_BASE, 0x1000),))

    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = real_mode_vcpu(vm, memory, CODE_GPA, irqchip)
        loop = VcpuLoop(vcpu, pio_bus, mmio_bus)
        if before_run is not None:
            before_run()
        thread = loop.start_thread()
        stop_latency = 0.0
        if irqchip:
            # The in-kernel irqchip handles HLT: the vCPU sleeps in KVM_RUN until kicked.
            if pio_log.done.wait(timeout):
                time.sleep(0.05)  # let it reach the HLT
            started = time.monotonic()
            loop.request_stop()
            thread.join(timeout)
            stop_latency = time.monotonic() - started
        else:
            thread.join(timeout)
        if thread.is_alive():
            loop.request_stop()
            thread.join(2.0)
            raise TimeoutError(f"the vCPU did not stop within {timeout:g} s")
        assert loop.result is not None
        return SelftestRun(
            loop.result,
            pio_log.entries,
            mmio_log.entries,
            memory.read(IN_DATA_GPA, len(IN_VALUES)),
            stop_latency,
        )


def check(run: SelftestRun, irqchip: bool) -> list[str]:
    """Mismatches between what the guest did and what it should have done (empty when all is well)."""
    problems = []
    want = StopReason.STOPPED if irqchip else StopReason.HALTED
    if run.result.reason != want:
        problems.append(f"vCPU ended with {run.result.describe()}, expected {want.name}")
    if run.pio != expected_pio():
        problems.append(f"port I/O {run.pio} != expected {expected_pio()}")
    if run.mmio != expected_mmio():
        problems.append(f"MMIO {run.mmio} != expected {expected_mmio()}")
    if run.in_data != bytes(IN_VALUES):
        problems.append(f"rep insb stored {run.in_data.hex()}, expected {bytes(IN_VALUES).hex()}")
    return problems


def main() -> int:
    try:
        run = run_program(irqchip=True)
    except Exception as e:
        print(f"kvm selftest: FAILED: {type(e).__name__}: {e}")
        return 1
    problems = check(run, irqchip=True)
    if problems:
        print(f"kvm selftest: FAILED: {'; '.join(problems)}")
        return 1
    print(
        f"kvm selftest: OK ({len(run.pio)} port and {len(run.mmio)} MMIO accesses as expected, "
        f"halted vCPU stopped in {run.stop_latency * 1000:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
