"""Cost of one trapped access through pyvmm's run loop, on this machine's KVM (no lab needed).

Real-mode guests repeat one kind of access N times; the VM is wired as the builder wires it (the same bus,
run loop, coalesced ring and device models; only the guest-physical addresses are moved below 1 MiB so that
real mode reaches them). One row per exit path:

  pio        `in al, dx` from a port whose device answers 0: the bare cost of an exit and its dispatch
  cf8        Linux's early PCI probe: write 0xCF8 (queued in KVM's coalesced ring), read 0xCFC
  ecam       a dword read of config space at 0x100 through the ECAM window (one MMIO exit), of a
             passed-through function's model (VfioPciDevice; the "device" is a memfd, read with pread
             as vfio-pci's config region is) -- `make bench`'s config-space row
  msix       a dword write to the Message Data of a masked MSI-X table entry of that function (one MMIO
             exit) -- `make bench`'s MSI-X table row
  serial     Linux's console: an LSR read, then 16 bytes to THR (queued in the ring as pyvmm does):
             per 16-byte burst
  char       Linux's console while booting (before user space opens the port, the 8250 driver polls LSR
             before every byte): an LSR read, then one byte to THR; per byte

and two floors under them, the `pio` row's guest run without pyvmm's loop:

  bare       a Python loop of ctypes KVM_RUN calls that answers every exit without looking at it (no
             bus, no device): what any Python VMM pays per exit
  c          the same loop in C (bench/exit_floor.c, built with `cc -O2` when a compiler is there; the
             row is skipped otherwise): what a VMM in C pays

Each row runs `--reps` times; the median and the range are printed in microseconds per access (per burst
for `serial`). `--no-coalesce` makes every access exit (as on a KVM without KVM_CAP_COALESCED_PIO);
`--no-read-ahead` makes the LSR and 0xCFC reads replay the ring first (as before their read-ahead).
`--seccomp` runs each measurement in a child process that puts pyvmm's filters on once its VM is built, as
`pyvmm` does (the VMM filter on every thread, the vCPU filter on the vCPU thread): what they add to an
exit (not for the `c` row).
Usage: python bench/exit_cost.py [--rows c,bare,pio,cf8,ecam,msix,serial,char] [--count N] [--reps R]
                                 [--no-coalesce] [--no-read-ahead]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pyvmm import layout
from pyvmm.builder import coalesce_writes
from pyvmm.devices.bus import IoBus
from pyvmm.devices.serial import Serial16550
from pyvmm.ioctl import libc_ioctl
from pyvmm.kvm.bindings import KvmExit, KvmIoctl, kvm_run
from pyvmm.kvm.runloop import VcpuLoop, install_kick_handler
from pyvmm.kvm.selftest import real_mode_vcpu
from pyvmm.kvm.system import Kvm
from pyvmm.memory import GuestMemory
from pyvmm.pci.bus import PciConfigIo, PciConfigMmio
from pyvmm.pci.device import BarBusAdapter
from pyvmm.pci.planning import plan_windows, planning_platform

CODE_GPA = 0x1000
DONE_PORT = 0x14
NULL_PORT = 0x15
ECAM_GPA = 0x20000  # the ECAM window of segment 0
FUNCTION_SLOT = 1
BAR0_GPA = 0xC0000  # BAR0 of the passed-through function (16 KiB: MSI-X table at 0x2000, PBA at 0x3000)
MSIX_TABLE_OFFSET, MSIX_ENTRIES = 0x2000, 64
MAX_COUNT = 0xFFFF  # the loops count in cx


def _loop(setup: list[int], body: list[int], count: int) -> bytes:
    """setup; cx = count; body (a `loop` back to its start); out DONE_PORT; cli; hlt."""
    back = -(len(body) + 2) & 0xFF
    return bytes([*setup, 0xB9, count & 0xFF, count >> 8, *body, 0xE2, back, 0xE6, DONE_PORT, 0xFA, 0xF4])


def _ds(gpa: int) -> tuple[list[int], int]:
    """Code that points DS at `gpa`'s 64 KiB, and the offset of `gpa` in it."""
    segment = gpa >> 4 & 0xF000
    return [0xB8, segment & 0xFF, segment >> 8, 0x8E, 0xD8], gpa - (segment << 4)  # mov ax, seg; mov ds, ax


def program(row: str, count: int) -> bytes:
    if row == "pio":
        return _loop([0xBA, NULL_PORT, 0x00], [0xEC], count)  # mov dx, NULL_PORT; L: in al, dx
    if row == "cf8":
        setup = [0x66, 0xBB, 0x00, 0x00, 0x01, 0x80]  # mov ebx, 0x80010000 (bus 1: empty)
        body = [
            0x66, 0x89, 0xD8,                          # mov eax, ebx
            0xBA, 0xF8, 0x0C, 0x66, 0xEF,              # mov dx, 0xcf8; out dx, eax
            0xBA, 0xFC, 0x0C, 0x66, 0xED,              # mov dx, 0xcfc; in eax, dx
            0x66, 0x81, 0xC3, 0x00, 0x08, 0x00, 0x00,  # add ebx, 0x800
        ]  # fmt: skip
        return _loop(setup, body, count)
    if row == "ecam":
        setup, offset = _ds(ECAM_GPA + (FUNCTION_SLOT << 15) + 0x100)
        return _loop(setup, [0x66, 0xA1, offset & 0xFF, offset >> 8], count)  # mov eax, [offset]
    if row == "msix":
        data = MSIX_TABLE_OFFSET + (MSIX_ENTRIES - 1) * 16 + 8  # the last entry's Message Data
        setup, offset = _ds(BAR0_GPA + data)
        # mov dword [offset], 0x4041 (the entry stays masked: nothing is routed)
        return _loop(setup, [0x66, 0xC7, 0x06, offset & 0xFF, offset >> 8, 0x41, 0x40, 0, 0], count)
    if row == "serial":
        setup = [0xBA, 0xF8, 0x03]  # mov dx, 0x3f8
        body = [0x83, 0xC2, 0x05, 0xEC, 0x83, 0xEA, 0x05]  # add dx, 5; in al, dx (LSR); sub dx, 5
        body += [0xB0, 0x2E, 0xEE] * 16  # 16 x (mov al, '.'; out dx, al)
        return _loop(setup, body, count)
    if row == "char":
        setup = [0xBA, 0xF8, 0x03]  # mov dx, 0x3f8
        body = [0x83, 0xC2, 0x05, 0xEC, 0x83, 0xEA, 0x05, 0xB0, 0x2E, 0xEE]  # LSR; mov al, '.'; out dx, al
        return _loop(setup, body, count)
    raise ValueError(row)


class Null:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class NoLine:
    """COM1's interrupt line: nothing listens (the console polls)."""

    def set_level(self, asserted: bool) -> None:
        pass


class Done(Null):
    def __init__(self) -> None:
        self.event = threading.Event()
        self.at = 0.0

    def write(self, offset: int, size: int, value: int) -> None:
        self.at = time.perf_counter()
        self.event.set()


class NoIrqfds:
    """Irqfds, GSI routing and memory slots that nothing here needs (the MSI-X entry stays masked)."""

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        pass

    def set_gsi_routing(self, routes: list) -> None:
        pass

    def map_memory(self, gpa: int, size: int, host_address: int) -> int:
        raise AssertionError("no BAR is mmap-able here")

    def unmap_memory(self, handle: int) -> None:
        pass


def passthrough_function():  # -> VfioPciDevice (imported here: the other rows need no VFIO code)
    """pyvmm's model of a passed-through NVMe-like function over a memfd standing in for the VFIO fd."""
    from pyvmm.interrupts import MsiRouter
    from pyvmm.vfio.bindings import VfioDeviceFlag, VfioIrqInfoFlag, VfioPciIrq, VfioRegionInfoFlag
    from pyvmm.vfio.device import IrqInfo, RegionInfo, VfioDevice
    from pyvmm.vfio.pci import VfioPciDevice

    config = bytearray(4096)
    struct.pack_into("<HHHH", config, 0, 0x1B36, 0x0010, 0x0006, 0x0010)  # ids, command, status (caps)
    config[0x08:0x0C] = bytes([0x02, 0x02, 0x08, 0x01])
    struct.pack_into("<I", config, 0x10, 0xFEB0_0004)  # BAR0: 64-bit memory
    config[0x34] = 0x40
    config[0x40:0x42] = bytes([0x11, 0x00])  # MSI-X, last capability
    struct.pack_into("<HII", config, 0x42, MSIX_ENTRIES - 1, MSIX_TABLE_OFFSET, 0x3000)
    struct.pack_into("<I", config, 0x100, 0x0001_0001)  # AER, end of the extended chain

    class StandIn(VfioDevice):
        def __init__(self) -> None:  # no VFIO_DEVICE_GET_INFO: the regions are described here
            self.fd = os.memfd_create("exit-cost-function", os.MFD_CLOEXEC)
            self.name = "0000:01:00.0"
            self.flags = VfioDeviceFlag.VFIO_DEVICE_FLAGS_PCI
            self.num_regions, self.num_irqs = 9, 5
            flag = VfioRegionInfoFlag
            rw = flag.VFIO_REGION_INFO_FLAG_READ | flag.VFIO_REGION_INFO_FLAG_WRITE
            self.regions = {0: RegionInfo(0, rw, 0x4000, 0), 7: RegionInfo(7, rw, 4096, 0x10000)}
            msix = VfioPciIrq.VFIO_PCI_MSIX_IRQ_INDEX
            self.irqs = {msix: IrqInfo(msix, VfioIrqInfoFlag.VFIO_IRQ_INFO_EVENTFD, MSIX_ENTRIES)}
            os.ftruncate(self.fd, 0x11000)
            os.pwrite(self.fd, bytes(config), 0x10000)

    hypervisor = NoIrqfds()
    return VfioPciDevice(StandIn(), hypervisor, MsiRouter(hypervisor), memory_slots=hypervisor)


def measure_bare(count: int, before_run: Callable[[], None] | None = None) -> float:
    """Seconds for `count` iterations of the `pio` row's access in a Python loop of bare ctypes KVM_RUN
    calls: no bus, no device, the exit's data answered without decoding it. `before_run` is called once
    the VM is built."""
    memory = GuestMemory([(0, 0x10000)])
    memory.write(CODE_GPA, program("pio", count))
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = real_mode_vcpu(vm, memory, CODE_GPA)
        page = memoryview((ctypes.c_char * vcpu.mmap_size).from_address(vcpu.run_address)).cast("B")
        run, fd = vcpu.kvm_run, vcpu.fd
        io_exit = struct.Struct("<BBHIQ").unpack_from
        if before_run is not None:
            before_run()
        start = time.perf_counter()
        while True:
            libc_ioctl(fd, KvmIoctl.KVM_RUN, 0)
            if run.exit_reason != KvmExit.KVM_EXIT_IO:
                raise RuntimeError(f"bare: unexpected exit {run.exit_reason}")
            _direction, _size, port, _count, offset = io_exit(page, kvm_run.u.offset)
            if port == DONE_PORT:
                return time.perf_counter() - start
            page[offset] = 0


def floor_binary() -> Path | None:
    """bench/exit_floor.c built with cc -O2 (kept in the temporary directory until the source changes), or
    None without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = Path(__file__).with_name("exit_floor.c")
    binary = Path(tempfile.gettempdir()) / f"pyvmm-exit-floor-{os.getuid()}-{int(source.stat().st_mtime)}"
    if not binary.exists():
        subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def measure_c(binary: Path, count: int) -> float:
    """Seconds for `count` iterations of the `pio` row's access under bench/exit_floor.c's loop."""
    with tempfile.NamedTemporaryFile(prefix="exit-floor-", suffix=".bin") as code:
        code.write(program("pio", count))
        code.flush()
        out = subprocess.run([str(binary), code.name, hex(CODE_GPA), hex(DONE_PORT),
                              hex(layout.KVM_TSS_START), hex(layout.KVM_IDENTITY_MAP_START)],
                             capture_output=True, text=True, check=True)
    return float(out.stdout)


def measure(row: str, count: int, coalesce: bool = True, read_ahead: bool = True,
            before_run: Callable[[], None] | None = None) -> float:
    """Seconds for `count` iterations of `row`'s access; `before_run` is called once the VM is built."""
    install_kick_handler()
    memory = GuestMemory([(0, 0x10000)])
    memory.write(CODE_GPA, program(row, count))
    pio_bus, mmio_bus = IoBus("pio", 1 << 16), IoBus("mmio")
    segment = planning_platform(plan_windows([(1, 1)], 1 << 30, 40)).segments[0]
    config_io = PciConfigIo(segment)
    pio_bus.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE, config_io)
    mmio_bus.insert(ECAM_GPA, 0x10000, PciConfigMmio(segment))  # slots 0 and 1 of the 1 MiB window
    serial = Serial16550(NoLine(), lambda data: None)  # the console output is discarded
    pio_bus.insert(layout.SERIAL_COM1_PORT, 8, serial)
    if row in ("ecam", "msix"):
        function = passthrough_function()
        segment.add_device(function, FUNCTION_SLOT)
        mmio_bus.insert(BAR0_GPA, 0x4000, BarBusAdapter(function, 0))
    pio_bus.insert(NULL_PORT, 1, Null())
    done = Done()
    pio_bus.insert(DONE_PORT, 1, done)
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = real_mode_vcpu(vm, memory, CODE_GPA)
        ring = None
        if coalesce:  # wired as the builder wires it
            ring = coalesce_writes(vm, vcpu, pio_bus, mmio_bus, serial, config_io, read_ahead)
        if ring is not None and ring.sweep_after:
            ring.sweeper.start()
        loop = VcpuLoop(vcpu, pio_bus, mmio_bus, coalesced=ring)
        if before_run is not None:
            before_run()
        start = time.perf_counter()
        thread = loop.start_thread()
        try:
            if not done.event.wait(300):
                raise TimeoutError(f"{row}: the guest did not finish")
        finally:
            loop.request_stop()
            thread.join(5)
            if ring is not None:
                ring.sweeper.close()
        return done.at - start


def filtered(run: Callable[..., float]) -> Callable[[int], float]:
    """`run(count)` in a child process that puts pyvmm's seccomp filters on once its VM is built (the
    filters allow no new VM, so each measurement needs a fresh process)."""
    from pyvmm.sandbox import SeccompMode
    from pyvmm.seccomp.install import install

    def in_child(count: int) -> float:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report, and leave without Python's teardown
            os.close(read_end)
            status = 1
            try:
                seconds = run(count, before_run=lambda: install(SeccompMode.TRUE))
                os.write(write_end, f"{seconds!r}".encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as answer:
            text = answer.read()
        _pid, status = os.waitpid(pid, 0)
        if status != 0 or not text:
            raise RuntimeError(f"the filtered measurement failed (wait status {status:#x})")
        return float(text)

    return in_child


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="c,bare,pio,cf8,ecam,msix,serial,char",
                        help="comma-separated rows to run")
    parser.add_argument("--count", type=int, default=20000, help=f"accesses per run (at most {MAX_COUNT})")
    parser.add_argument("--reps", type=int, default=5, help="runs per row (the median is reported)")
    parser.add_argument("--no-coalesce", action="store_true", help="every access exits")
    parser.add_argument("--no-read-ahead", action="store_true",
                        help="LSR reads replay the ring first (as before the console's read-ahead)")
    parser.add_argument("--seccomp", action="store_true",
                        help="pyvmm's seccomp filters on in each measurement, as pyvmm runs")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not 0 < args.count <= MAX_COUNT:
        parser.error(f"--count: 1 to {MAX_COUNT}")
    coalesce = not args.no_coalesce
    print(f"{'row':8} {'median us':>10} {'min':>8} {'max':>8}   ({args.count} accesses x {args.reps} runs, "
          f"{'coalescing on' if coalesce else 'every access exits'}"
          f"{', seccomp filters on' if args.seccomp else ''})")
    for row in rows:
        count = max(1, args.count // 16) if row == "serial" else args.count
        read_ahead = not args.no_read_ahead
        run: Callable[[int], float]
        if row == "c":
            binary = floor_binary()
            if binary is None:
                print(f"{row:8} (no C compiler: cc or gcc)")
                continue
            run = functools.partial(measure_c, binary)  # a program of its own: never filtered
        elif row == "bare":
            run = filtered(measure_bare) if args.seccomp else measure_bare
        else:
            one = functools.partial(measure, row, coalesce=coalesce, read_ahead=read_ahead)
            run = filtered(one) if args.seccomp else one
        run(100)  # warm up (imports, first VM)
        samples = [run(count) * 1e6 / count for _ in range(args.reps)]
        print(f"{row:8} {statistics.median(samples):10.2f} {min(samples):8.2f} {max(samples):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
