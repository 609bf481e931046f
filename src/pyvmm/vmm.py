"""The VM builder: the one place that turns a validated VmConfig into a running VM.

Order matters and follows what KVM expects: VM → TSS/identity map → in-kernel irqchip and PIT → RAM slots
→ devices on the buses → ACPI tables → kernel → vCPUs (CPUID, MSRs, boot state) → one thread per vCPU.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from pyvmm import layout
from pyvmm.acpi.platform import AcpiPciSegment, AcpiPlatform
from pyvmm.acpi.tables import build_acpi_tables
from pyvmm.boot import (
    CpuidEntry,
    CpuTopology,
    KernelImageError,
    adjust_cpuid,
    boot_msrs,
    guest_phys_bits,
    host_phys_bits,
    load_linux,
    parse_bzimage,
    setup_boot_vcpu,
)
from pyvmm.config import ConsoleMode, VmConfig
from pyvmm.console import ConsoleOutput, TerminalInput
from pyvmm.devices.acpi_pm import RESET_VALUE, AcpiPmDevice, PmRegister
from pyvmm.devices.bus import IoBus
from pyvmm.devices.i8042 import I8042Device
from pyvmm.devices.serial import Serial
from pyvmm.errors import UsageError, VmError
from pyvmm.interrupts import MsiRouter
from pyvmm.kvm.bindings import KvmCap, kvm_cpuid_entry2
from pyvmm.kvm.coalesced import CoalescedRing, coalesce_port_writes
from pyvmm.kvm.regs import format_registers
from pyvmm.kvm.runloop import RunResult, StopReason, VcpuLoop, install_kick_handler, stop_all
from pyvmm.kvm.system import Kvm, KvmError, Vcpu, Vm
from pyvmm.memory import GuestMemory, GuestMemoryError
from pyvmm.pci.bus import PciConfigIo, PciConfigMmio, PciError, PciSegment
from pyvmm.pci.planning import make_segments, reserve_slots
from pyvmm.pci.vmplan import dry_run_report, vm_plan

if TYPE_CHECKING:
    from pyvmm.vfio.passthrough import ManagedBinding

log = logging.getLogger("pyvmm")


class ExitKind(Enum):
    POWEROFF = "poweroff"
    RESET = "reset"
    SIGNAL = "signal"
    ERROR = "error"


@dataclass(frozen=True)
class VmExit:
    kind: ExitKind
    detail: str = ""


class KvmIrqLine:
    """An IOAPIC/PIC input driven with KVM_IRQ_LINE (the in-kernel irqchip does the rest)."""

    def __init__(self, vm: Vm, irq: int) -> None:
        self._vm = vm
        self._irq = irq

    def set_level(self, asserted: bool) -> None:
        self._vm.irq_line(self._irq, 1 if asserted else 0)


def _fill(struct: Any, values: Any) -> None:
    """Copy a boot dataclass into the ctypes struct whose field names it shares."""
    for name in getattr(values, "__dataclass_fields__", {}):
        value = getattr(values, name)
        if hasattr(value, "__dataclass_fields__"):
            _fill(getattr(struct, name), value)
        else:
            setattr(struct, name, int(value))


class VirtualMachine:
    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self._exit: VmExit | None = None
        self._exit_lock = threading.Lock()
        self._stopped = threading.Event()
        self._closers: list[Any] = []
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        self.pio_bus = IoBus("pio", 1 << 16)
        self.mmio_bus = IoBus("mmio")
        self.segments: list[PciSegment] = []
        self.serial: Serial | None = None
        self.serial_input: TerminalInput | None = None
        self.coalesced: CoalescedRing | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def request_stop(self, kind: ExitKind, detail: str = "") -> None:
        """Ask every vCPU to stop; the first reason given wins."""
        with self._exit_lock:
            if self._exit is None:
                self._exit = VmExit(kind, detail)
        self._stopped.set()

    # -- building -----------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.config
        try:
            self.kvm = Kvm()
        except KvmError as exc:
            raise VmError(f"{exc} (pyvmm needs KVM: without it, try pyvmm in `pyvmm-lab shell`)") from exc
        self._closers.append(self.kvm)
        if cfg.cpus.boot > self.kvm.max_vcpus:
            raise UsageError(f"--cpus: boot={cfg.cpus.boot} is more than the {self.kvm.max_vcpus} vCPUs "
                             "this host's KVM allows")
        supported = [_cpuid_entry(e) for e in self.kvm.supported_cpuid()]
        phys_bits = guest_phys_bits(host_phys_bits(supported), cfg.cpus.max_phys_bits)
        vm = self.vm = self.kvm.create_vm()
        self._closers.append(vm)
        vm.set_tss_addr(layout.KVM_TSS_START)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
        vm.create_irqchip()
        vm.create_pit2()

        try:
            memory = self.memory = GuestMemory.for_config(cfg.memory)
        except GuestMemoryError as exc:  # a huge page pool too small is the user's to fix: exit 2
            wrapper = UsageError if exc.exit_status == UsageError.exit_status else VmError
            raise wrapper(f"--memory size={cfg.memory.size >> 20}M: {exc}") from exc
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address)

        self._add_legacy_devices()
        windows = self._add_pci(phys_bits)
        self._add_disks()
        self._add_vfio_devices()
        self._check_pci_plan()
        tables = build_acpi_tables(
            AcpiPlatform(
                num_vcpus=cfg.cpus.boot,
                segments=[
                    AcpiPciSegment(w.segment, layout.ecam_base(w.segment), (w.mmio32.start, w.mmio32.end),
                                   (w.mmio64.start, w.mmio64.end))
                    for w in windows
                ],
                serial=cfg.serial.mode is not ConsoleMode.OFF,
            )
        )
        memory.write(tables.address, tables.data)
        memory.write(layout.RESET_VECTOR, _reset_vector_stub())

        payload = cfg.payload
        assert payload.kernel is not None  # the parser requires --kernel
        try:
            info = load_linux(memory, payload.kernel, payload.cmdline, payload.initramfs,
                              layout.e820_entries(cfg.memory.size), rsdp_addr=tables.rsdp_address)
        except KernelImageError as exc:
            raise UsageError(f"--kernel {payload.kernel}: {exc}") from exc
        log.info("kernel %s loaded, entry %#x", info.kernel_version or "?", info.entry_point)

        topology = None
        if cfg.cpus.topology is not None:
            t = cfg.cpus.topology
            topology = CpuTopology(t.threads_per_core, t.cores_per_die, t.dies_per_package, t.packages)
        tsc_deadline = bool(vm.check_extension(KvmCap.KVM_CAP_TSC_DEADLINE_TIMER))
        for index in range(cfg.cpus.boot):
            vcpu = vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            entries = adjust_cpuid(supported, index, cfg.cpus.boot, phys_bits, topology, tsc_deadline)
            vcpu.set_cpuid2([_kvm_cpuid_entry(e) for e in entries])
            vcpu.set_msrs(boot_msrs())
            if index == 0:
                state = setup_boot_vcpu(memory, info.entry_point, info.zero_page)
                regs = vcpu.get_regs()
                _fill(regs, state.regs)
                vcpu.set_regs(regs)
                sregs = vcpu.get_sregs()
                _fill(sregs, state.sregs)
                vcpu.set_sregs(sregs)
                fpu = vcpu.get_fpu()
                _fill(fpu, state.fpu)
                vcpu.set_fpu(fpu)
        # The 0xCF8 address register needs no answer, and Linux's early PCI probes (an AGP-bridge search
        # over all 256 buses) write it thousands of times: KVM queues those writes instead of exiting.
        self.coalesced = coalesce_port_writes(
            vm, self.vcpus[0], layout.PCI_CONFIG_IO_PORT, 4, self.pio_bus, self.mmio_bus
        )

    def _add_legacy_devices(self) -> None:
        assert self.vm is not None
        cfg = self.config
        if cfg.serial.mode is not ConsoleMode.OFF:
            output = ConsoleOutput(cfg.serial)
            self._closers.append(output)
            self.serial = Serial(KvmIrqLine(self.vm, layout.SERIAL_COM1_IRQ), output.write)
            self.pio_bus.insert(layout.SERIAL_COM1_PORT, 8, self.serial)
            if cfg.serial.mode is ConsoleMode.TTY:
                self.serial_input = TerminalInput(self.serial.queue_input)
        pm = AcpiPmDevice(
            on_poweroff=lambda: self.request_stop(ExitKind.POWEROFF),
            on_reset=lambda: self.request_stop(ExitKind.RESET),
        )
        self.pio_bus.insert(layout.ACPI_PM_PORT, layout.ACPI_PM_SIZE, pm)
        i8042 = I8042Device(on_reset=lambda: self.request_stop(ExitKind.RESET))
        self.pio_bus.insert(layout.I8042_PORT, layout.I8042_SIZE, i8042)

    def _add_pci(self, phys_bits: int) -> list:
        """Plan every BAR first (exhaustion found here, before anything is opened), then create the segments
        the plan was computed on; devices plugged later land where the plan says (_check_pci_plan)."""
        try:
            self.pci_plan = vm_plan(self.config, phys_bits)
            windows = list(self.pci_plan.windows)
            self.segments = make_segments(windows, on_bar_move=self._move_bar)
            reserve_slots(self.segments, self.pci_plan.items)
        except PciError as exc:
            raise UsageError(str(exc)) from exc
        for segment in self.segments:
            ecam = PciConfigMmio(segment)
            self.mmio_bus.insert(segment.ecam_base, layout.PCI_MMCONFIG_SIZE_PER_SEGMENT, ecam)
        legacy = PciConfigIo(self.segments[0])
        self.pio_bus.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE, legacy)
        return windows

    def _check_pci_plan(self) -> None:
        """Every device's BARs where the plan (and `--dry-run`) said they would be."""
        for planned in self.pci_plan.devices:
            segment = self.segments[planned.item.segment]
            actual = tuple(segment.placements(planned.slot)) if segment.device(planned.slot) else ()
            if actual != planned.placements:
                log.warning("%s: BARs placed at %s, not where planned (%s)", planned.item.label,
                            [hex(p.address) for p in actual], [hex(p.address) for p in planned.placements])

    # -- virtio-blk disks (--disk) -----------------------------------------------------------------------
    def _add_disks(self) -> None:
        """Open and lock every --disk image and plug one virtio-blk each (before VFIO, as CH orders them)."""
        if not self.config.disks:
            return
        assert self.vm is not None and self.memory is not None
        # The virtio and VFIO stacks are imported only by VMs that use them: start-up time matters.
        from pyvmm.devices.virtio.attach import attach_disks
        from pyvmm.devices.virtio.image import DiskImageError

        if getattr(self, "msi_router", None) is None:
            self.msi_router = MsiRouter(self.vm)
        try:
            disks = attach_disks(self.config.disks, memory=self.memory, vm=self.vm, router=self.msi_router,
                                 segments=self.segments, mmio_bus=self.mmio_bus)
        except (DiskImageError, PciError) as exc:
            raise UsageError(str(exc)) from exc
        self._closers.extend(disks)

    # -- VFIO passthrough (--device) ---------------------------------------------------------------------
    def _add_vfio_devices(self) -> None:
        """Open, DMA-map (all RAM, IOVA = GPA) and plug every --device before the guest runs."""
        if not self.config.devices:
            return
        assert self.vm is not None and self.memory is not None
        from pyvmm.vfio import KvmSlotMapper, VfioError, attach_vfio_devices
        from pyvmm.vfio.capabilities import CapabilityConflict
        from pyvmm.vfio.passthrough import VfioConfigError

        if getattr(self, "msi_router", None) is None:
            self.msi_router = MsiRouter(self.vm)  # one VM-wide GSI routing table, shared with virtio
        try:
            vfio = attach_vfio_devices(
                self.vm, self.msi_router, self.memory, self.segments, self.mmio_bus, self.pio_bus,
                self.config.devices, KvmSlotMapper(self.vm, first_slot=len(self.memory.regions)),
                p2p_dma=self.config.platform.vfio_p2p_dma,
                # The host takes a device away (removed, unbound): stop, exit 1 with its message.
                on_request=lambda _name, message: self.request_stop(ExitKind.ERROR, message),
            )
        except VfioConfigError as exc:  # the --device list is at fault (exit 2)
            raise UsageError(str(exc)) from exc
        except (PciError, CapabilityConflict) as exc:  # slots, BAR space, the clique's place: exit 2
            raise UsageError(str(exc)) from exc
        except VfioError as exc:
            raise VmError(str(exc)) from exc
        self._closers.append(vfio)

    def _move_bar(self, device: Any, move: Any) -> bool:
        bus = self.pio_bus if _is_io_move(device, move) else self.mmio_bus
        try:
            bus.move(move.old, move.new)
        except Exception:  # an overlap the allocator did not see: refuse, the segment rolls back
            log.warning("cannot move BAR %d of %s to %#x", move.bar_index, device, move.new, exc_info=True)
            return False
        return True

    # -- running ------------------------------------------------------------------------------------
    def _vcpu_stopped(self, result: RunResult) -> None:
        if result.reason is StopReason.ERROR:
            self.request_stop(ExitKind.ERROR, result.describe())
        elif result.reason is StopReason.POWEROFF:
            self.request_stop(ExitKind.POWEROFF)
        elif result.reason is StopReason.RESET:
            self.request_stop(ExitKind.RESET)
        elif result.reason is StopReason.HALTED:
            self.request_stop(ExitKind.ERROR, result.describe())

    def run(self) -> VmExit:
        """Start one thread per vCPU and wait until the guest powers off, fails or a signal stops it."""
        install_kick_handler()
        loops = [
            VcpuLoop(v, self.pio_bus, self.mmio_bus, on_stop=self._vcpu_stopped, coalesced=self.coalesced)
            for v in self.vcpus
        ]

        def on_signal(signum: int, frame: object) -> None:
            self.request_stop(ExitKind.SIGNAL, signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        threads = []
        try:
            threads = [loop.start_thread() for loop in loops]
            if self.serial_input is not None:
                self.serial_input.start()
            # A timed wait stays interruptible by SIGINT/SIGTERM; it need not wake often (each wake costs CPU
            # while the guest idles, and everything that ends the VM sets the event).
            while not self._stopped.wait(30.0):
                pass
        finally:
            stop_all(loops)
            for thread in threads:
                thread.join(timeout=10)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if log.isEnabledFor(logging.DEBUG):
            for vcpu in self.vcpus:  # where each vCPU was when it stopped
                log.debug("vCPU %d:\n%s", vcpu.index, format_registers(vcpu.get_regs(), vcpu.get_sregs()))
        assert self._exit is not None
        return self._exit

    def close(self) -> None:
        if self.serial_input is not None:
            self.serial_input.close()
        self.vcpus.clear()  # closed with the VM
        for obj in reversed(self._closers):
            try:
                obj.close()
            except Exception:  # closing must go on for the rest
                log.debug("closing %r failed", obj, exc_info=True)
        self._closers.clear()


def _reset_vector_stub() -> bytes:
    """Real-mode code at the reset vector that asks for a reset through the ACPI reset register.

    There is no firmware: a guest that reboots by jumping back to the BIOS entry point finds this instead.
    """
    port = layout.ACPI_PM_PORT + PmRegister.RESET
    return bytes([0xBA, port & 0xFF, port >> 8, 0xB0, RESET_VALUE, 0xEE, 0xF4, 0xEB, 0xFD])
    # mov dx, port; mov al, value; out dx, al; 1: hlt; jmp 1b


def _is_io_move(device: Any, move: Any) -> bool:
    from pyvmm.pci.bar import BarKind

    return any(b.index == move.bar_index and b.kind is BarKind.IO for b in device.bars())


def _cpuid_entry(e: kvm_cpuid_entry2) -> CpuidEntry:
    return CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)


def _kvm_cpuid_entry(e: CpuidEntry) -> kvm_cpuid_entry2:
    return kvm_cpuid_entry2(function=e.function, index=e.index, flags=e.flags,
                            eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx)


def _check_kernel(config: VmConfig) -> None:
    """Refuse a file that is not a bzImage before touching KVM."""
    kernel = config.payload.kernel
    assert kernel is not None
    try:
        parse_bzimage(kernel.read_bytes())
    except KernelImageError as exc:
        raise UsageError(f"--kernel {kernel}: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"--kernel {kernel}: {exc.strerror}") from exc


def run_vm(config: VmConfig) -> int:
    _check_kernel(config)
    if config.dry_run:
        return _dry_run(config)
    if config.console.mode not in (ConsoleMode.OFF, ConsoleMode.NULL):
        log.warning("--console %s: virtio-console is not available yet; the guest console is on "
                    "--serial (use --serial tty --console off)", config.console.mode.value)
    with _managed_devices(config) as managed:
        machine = VirtualMachine(config)
        try:
            machine.build()
            result = machine.run()
        finally:
            managed.hold_signals()  # tearing down must not be interrupted: the give-back needs the fds closed
            machine.close()
    return _exit_status(result)


class _NoDevices:
    """What _managed_devices yields for a VM without --device: nothing to bind, nothing to hold."""

    def hold_signals(self) -> None:
        pass


@contextlib.contextmanager
def _managed_devices(config: VmConfig) -> Iterator[ManagedBinding | _NoDevices]:
    """--device ...,managed=on: bind their IOMMU groups before building, give them back on every way out."""
    if not config.devices:
        yield _NoDevices()
        return
    from pyvmm.vfio.errors import VfioError
    from pyvmm.vfio.passthrough import VfioConfigError, managed_binding

    stack = contextlib.ExitStack()
    try:
        managed = stack.enter_context(managed_binding(config.devices))
    except VfioConfigError as exc:
        raise UsageError(str(exc)) from exc
    except VfioError as exc:
        raise VmError(str(exc)) from exc
    with stack:
        yield managed


def _dry_run(config: VmConfig) -> int:
    """Print where every segment's windows and every device's BARs go; opens neither KVM nor VFIO."""
    try:
        report = dry_run_report(config)
    except PciError as exc:
        raise UsageError(str(exc)) from exc
    sys.stdout.write(report)
    return 0


def _exit_status(result: VmExit) -> int:
    if result.kind is ExitKind.ERROR:
        raise VmError(result.detail)
    if result.kind is ExitKind.RESET:
        log.warning("the guest asked for a reboot; pyvmm does not restart guests, it exits")
    if result.kind is ExitKind.SIGNAL:
        print(f"pyvmm: stopped by {result.detail}", file=sys.stderr)
    return 0
