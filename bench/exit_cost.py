"""Cost of one trapped port access through pyvmm's run loop, on this machine's KVM (no lab needed).

A real-mode guest does what Linux's early PCI probes do: N times, write an address to 0xCF8 and read
0xCFC, on a bus where nothing answers. The VM is wired as the builder wires it (the PCI config ports of
segment 0 on the port bus, among the other legacy devices). Prints microseconds per probe and per exit.
With KVM_CAP_COALESCED_PIO the writes to 0xCF8 are queued in KVM's coalesced ring as pyvmm does (only the
reads exit); `--no-coalesce` measures with every access exiting.
Usage: python bench/exit_cost.py [N] [--no-coalesce]
"""

from __future__ import annotations

import sys
import threading
import time

from pyvmm import layout
from pyvmm.devices.bus import IoBus
from pyvmm.kvm.coalesced import coalesce_port_writes
from pyvmm.kvm.runloop import VcpuLoop, install_kick_handler
from pyvmm.kvm.selftest import real_mode_vcpu
from pyvmm.kvm.system import Kvm
from pyvmm.memory import GuestMemory
from pyvmm.pci.bus import PciConfigIo
from pyvmm.pci.planning import plan_windows, planning_platform

CODE_GPA = 0x1000
DONE_PORT = 0x14


def program(count: int) -> bytes:
    return bytes(
        [
            0x66, 0xBB, 0x00, 0x00, 0x01, 0x80,        # mov ebx, 0x80010000 (bus 1: empty)
            0xB9, count & 0xFF, count >> 8,            # mov cx, count
            0x66, 0x89, 0xD8,                          # L: mov eax, ebx
            0xBA, 0xF8, 0x0C,                          # mov dx, 0xcf8
            0x66, 0xEF,                                # out dx, eax
            0xBA, 0xFC, 0x0C,                          # mov dx, 0xcfc
            0x66, 0xED,                                # in eax, dx
            0x66, 0x81, 0xC3, 0x00, 0x08, 0x00, 0x00,  # add ebx, 0x800
            0xE2, 0xEA,                                # loop L
            0xBA, DONE_PORT, 0x00,                     # mov dx, DONE_PORT
            0xEE,                                      # out dx, al
            0xFA, 0xF4,                                # cli; hlt
        ]
    )  # fmt: skip


class Done:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.at = 0.0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.at = time.perf_counter()
        self.event.set()


def measure(count: int, coalesce: bool = True) -> tuple[float, int]:
    """Seconds for `count` probes, and the value the last 0xCFC read returned."""
    install_kick_handler()
    memory = GuestMemory([(0, 0x10000)])
    memory.write(CODE_GPA, program(count))
    pio_bus, mmio_bus = IoBus("pio", 1 << 16), IoBus("mmio")
    segment = planning_platform(plan_windows([(1, 1)], 1 << 30, 40)).segments[0]
    pio_bus.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE, PciConfigIo(segment))
    done = Done()
    pio_bus.insert(DONE_PORT, 1, done)
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = real_mode_vcpu(vm, memory, CODE_GPA)
        ring = None
        if coalesce:
            ring = coalesce_port_writes(vm, vcpu, layout.PCI_CONFIG_IO_PORT, 4, pio_bus, mmio_bus)
        loop = VcpuLoop(vcpu, pio_bus, mmio_bus, coalesced=ring)
        start = time.perf_counter()
        thread = loop.start_thread()
        if not done.event.wait(120):
            raise TimeoutError("the guest did not finish")
        loop.request_stop()
        thread.join(5)
        return done.at - start, vcpu.get_regs().rax & 0xFFFFFFFF


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    coalesce = "--no-coalesce" not in sys.argv
    count = int(args[0]) if args else 20000
    measure(100, coalesce)  # warm up
    best = min(measure(count, coalesce)[0] for _ in range(3))
    how = "0xCF8 writes coalesced" if coalesce else "every access exits"
    print(f"{count} probes ({how}): {best * 1e6 / count:.2f} us per probe ({best:.3f} s, best of 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
