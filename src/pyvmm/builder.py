"""The VM builder: the one place that turns a validated VmConfig into a VirtualMachine ready to run.

Order matters and follows what KVM expects: VM → TSS/identity map → in-kernel irqchip and PIT → RAM slots
→ legacy devices → PCI platform (planned first) → virtio-console, disks, nets, virtio-rng, fs, vsock →
passed-through devices → ACPI tables → kernel → vCPUs (CPUID, MSRs, boot state). Everything is built in
locals and registered for closing as it is opened; when a step fails, what was opened is closed again
before the error propagates (one line, its own exit status: see pyvmm.errors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pyvmm import layout
from pyvmm.acpi.platform import AcpiPciHotplug, AcpiPciSegment, AcpiPlatform
from pyvmm.acpi.tables import build_acpi_tables
from pyvmm.boot import (
    BootVcpuState,
    CpuidEntry,
    CpuTopology,
    KernelImageError,
    adjust_cpuid,
    boot_msrs,
    boot_vcpu_state,
    guest_phys_bits,
    host_phys_bits,
    load_kernel,
)
from pyvmm.config import ConfigError, ConsoleMode, MemoryConfig, VmConfig
from pyvmm.console import ConsoleOutput, TerminalInput, TerminalResize, terminal_size
from pyvmm.devices.acpi_hotplug import AcpiGed
from pyvmm.devices.acpi_pm import RESET_VALUE, AcpiPmDevice, PmRegister
from pyvmm.devices.bus import IoBus
from pyvmm.devices.cmos import CmosDevice
from pyvmm.devices.i8042 import I8042Device
from pyvmm.devices.serial import Reg as SerialReg
from pyvmm.devices.serial import Serial
from pyvmm.errors import UsageError, VmError, in_context
from pyvmm.hotplug import BootDisk, PciHotplug
from pyvmm.hypervisor import VfioGroupRegistry
from pyvmm.interrupts import MsiRouter
from pyvmm.kvm.bindings import KvmCap, kvm_cpuid_entry2
from pyvmm.kvm.coalesced import CoalescedRing, open_coalesced_ring
from pyvmm.kvm.memslots import KvmMemorySlots
from pyvmm.kvm.runloop import VcpuLoop
from pyvmm.kvm.system import Kvm, KvmError, Vcpu, Vm
from pyvmm.machine import ExitKind, ExitLatch, Service, VirtualMachine
from pyvmm.memory import GuestMemory, GuestMemoryError
from pyvmm.pci.bus import PciConfigIo
from pyvmm.pci.planning import PciPlan, reserve_slots
from pyvmm.pci.platform import PciAddress, PciPlatform
from pyvmm.vmplan import vm_plan

if TYPE_CHECKING:
    from pyvmm.config import DiskConfig
    from pyvmm.devices.virtio.pci import VirtioPciDevice
    from pyvmm.vfio.passthrough import VfioPassthrough
    from pyvmm.vhost.hangup import HangupWatch
    from pyvmm.vhost.storage_daemon import DiskService

log = logging.getLogger("pyvmm")


class _Closable(Protocol):
    def close(self) -> None: ...


def _closing(stack: contextlib.ExitStack, resource: _Closable) -> None:
    """Close `resource` with the VM; a failure to close is logged and the rest still closes."""

    def close() -> None:
        try:
            resource.close()
        except Exception:
            log.debug("closing %r failed", resource, exc_info=True)

    stack.callback(close)


class KvmIrqLine:
    """An IOAPIC/PIC input driven with KVM_IRQ_LINE (the in-kernel irqchip does the rest)."""

    def __init__(self, vm: Vm, irq: int) -> None:
        self._vm = vm
        self._irq = irq

    def set_level(self, asserted: bool) -> None:
        self._vm.irq_line(self._irq, 1 if asserted else 0)


def build_vm(config: VmConfig, on_host_request: Callable[[str], None] | None = None) -> VirtualMachine:
    """Build the VM `config` describes. `on_host_request(name)` is told (besides the VM stopping) when the
    host asks a passed-through function back while the VM has it."""
    stack = contextlib.ExitStack()
    try:
        machine = _build(config, stack, on_host_request)
    except BaseException:
        stack.close()
        raise
    return machine


def _build(config: VmConfig, stack: contextlib.ExitStack,
           on_host_request: Callable[[str], None] | None) -> VirtualMachine:
    latch = ExitLatch()
    try:
        kvm = Kvm()
    except KvmError as exc:
        raise VmError(f"{exc} (pyvmm needs KVM: without it, try pyvmm in `pyvmm-lab shell`)") from exc
    _closing(stack, kvm)
    if config.cpus.boot > kvm.max_vcpus:
        raise UsageError(f"--cpus: boot={config.cpus.boot} is more than the {kvm.max_vcpus} vCPUs "
                         "this host's KVM allows")
    supported = [_cpuid_entry(e) for e in kvm.supported_cpuid()]
    phys_bits = guest_phys_bits(host_phys_bits(supported), config.cpus.max_phys_bits)
    vm = kvm.create_vm()
    _closing(stack, vm)
    vm.set_tss_addr(layout.KVM_TSS_START)
    vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
    vm.create_irqchip()
    vm.create_pit2()

    disk_services = _disk_services(config)
    try:
        memory = GuestMemory.for_config(_memory_for_disks(config, disk_services))
    except GuestMemoryError as exc:
        raise in_context(f"--memory size={config.memory.size >> 20}M", exc) from exc
    _closing(stack, memory)
    memory_slots = KvmMemorySlots(vm)
    for region in memory.regions:
        memory_slots.map_memory(region.gpa, region.size, region.host_address)

    pio_bus, mmio_bus = IoBus("pio", 1 << 16), IoBus("mmio")
    services, serial = _add_legacy_devices(config, vm, pio_bus, latch, stack)
    # Every BAR is planned first (exhaustion is found here, before any image or device is opened); the
    # platform is built on the plan's windows and devices land where the plan says (_check_plan).
    plan = vm_plan(config, phys_bits)
    platform = PciPlatform(plan.windows, pio_bus=pio_bus, mmio_bus=mmio_bus, memory_slots=memory_slots)
    reserve_slots(platform, plan.items)
    router = MsiRouter(vm, config.platform.x_max_msi_routes)  # one VM-wide GSI table, virtio and VFIO
    # cloud-hypervisor's creation order, which the plan follows: console, disks, rng, passthrough devices
    services += _add_console(config, memory, platform, router, vm, stack)
    disks = _add_disks(config, disk_services, memory, platform, router, vm, stack)
    nets = _add_nets(config, memory, platform, router, vm, stack)
    _add_rng(config, memory, platform, router, vm, stack)
    fses = _add_fs(config, memory, platform, router, vm, stack)
    hangups = _watch_vhost_user_backends([d.transport for d in disks] + fses, memory, latch, stack)
    if hangups is not None:
        services.append(hangups)
    services += _add_vsock(config, memory, platform, router, vm, stack)

    def host_request(name: str, message: str) -> None:
        # The host takes a device away (removed, unbound): stop, exit 1 with its message.
        hotplug.host_asked_back(name)
        if on_host_request is not None:
            on_host_request(name)
        latch.request(ExitKind.ERROR, message)

    hotplug = _add_hotplug(config, vm, memory, platform, router, mmio_bus, phys_bits, host_request, hangups)
    vfio = _add_vfio_devices(config, memory, platform, router, vm, stack, host_request)
    hotplug.adopt(vfio, config.devices, disks, nets, fs_ids=[f.id for f in config.fs],
                  vsock_ids=[config.vsock.id] if config.vsock is not None else [])
    _closing(stack, hotplug)  # before the boot-time VFIO side: hot-plugged functions may be in its container
    _check_plan(plan, platform)

    tables = build_acpi_tables(
        AcpiPlatform(
            num_vcpus=config.cpus.boot,
            segments=[
                AcpiPciSegment(w.segment, layout.ecam_base(w.segment), (w.mmio32.start, w.mmio32.end),
                               (w.mmio64.start, w.mmio64.end))
                for w in plan.windows
            ],
            serial=config.serial.mode is not ConsoleMode.OFF,
            cmos_rtc=True,
            pci_hotplug=AcpiPciHotplug(layout.pci_hotplug_base(phys_bits), layout.ged_base(phys_bits)),
        )
    )
    memory.write(tables.address, tables.data)
    memory.write(layout.RESET_VECTOR, _reset_vector_stub())

    payload = config.payload
    if payload.kernel is None:  # the parser requires --kernel
        raise UsageError("--kernel: a kernel to boot is required")
    try:  # a bzImage or an ELF vmlinux (PVH entry): docs/boot.md
        kernel = load_kernel(memory, payload.kernel, payload.cmdline, payload.initramfs,
                             layout.e820_entries(config.memory.size), rsdp_addr=tables.rsdp_address)
    except KernelImageError as exc:
        raise in_context(f"--kernel {payload.kernel}", exc) from exc
    log.info("kernel %s (%s) loaded, entry %#x", kernel.version or "?", kernel.format.value,
             kernel.entry_point)

    vcpus = _create_vcpus(config, vm, kvm_supported=supported, phys_bits=phys_bits)
    state = boot_vcpu_state(memory, kernel)
    _set_boot_state(vcpus[0], state)
    coalesced = coalesce_writes(vm, vcpus[0], pio_bus, mmio_bus, serial, platform.config_io)
    if coalesced is not None and coalesced.sweep_after:
        services.append(coalesced.sweeper)
    loops = [VcpuLoop(v, pio_bus, mmio_bus, on_stop=latch.vcpu_stopped, coalesced=coalesced) for v in vcpus]
    return VirtualMachine(vcpus=vcpus, loops=loops, latch=latch, memory=memory, platform=platform,
                          pci_addresses=[PciAddress(d.item.segment, d.slot) for d in plan.devices],
                          hotplug=hotplug, services=services, resources=stack)


def coalesce_writes(vm: Vm, vcpu: Vcpu, pio_bus: IoBus, mmio_bus: IoBus, serial: Serial | None,
                    config_io: PciConfigIo, read_ahead: bool = True) -> CoalescedRing | None:
    """Port writes that need no answer are queued by KVM instead of exiting (docs/ARCHITECTURE.md), and
    the reads that need no replay are answered ahead of them (bench/exit_cost.py measures both, wired by
    this function; its --no-read-ahead is `read_ahead=False`)."""
    ring = open_coalesced_ring(vm, vcpu, pio_bus, mmio_bus)
    if ring is None:
        return None
    # Linux's early PCI probes (two searches for an AGP bridge over all 256 buses, 8,192 config reads
    # each) write 0xCF8 before every 0xCFC read: the writes are queued, and the reads taken ahead of the
    # ring when only those writes are queued (kvm/coalesced.py).
    cf8 = layout.PCI_CONFIG_IO_PORT
    ring.register_ports(vm, cf8, 4)
    if read_ahead:
        ring.add_latch_read_ahead(config_io, cf8, cf8, range(cf8 + 4, cf8 + layout.PCI_CONFIG_IO_SIZE))
    if serial is not None:
        # Byte writes to COM1's THR (DLL while DLAB is set): the console's bytes, up to 16 per LSR poll.
        ring.register_ports(vm, layout.SERIAL_COM1_PORT, 1, burst=serial.write_thr_bytes)
        serial.batch_output = True
        ring.after_drain.append(serial.flush_output)
        # While Linux boots, its console polls LSR before every byte: those reads need not replay the ring.
        if read_ahead:
            ring.add_read_ahead(layout.SERIAL_COM1_PORT + SerialReg.LSR, serial.read_lsr_ahead)
    return ring


def _add_legacy_devices(config: VmConfig, vm: Vm, pio_bus: IoBus, latch: ExitLatch,
                        stack: contextlib.ExitStack) -> tuple[list[Service], Serial | None]:
    """COM1 (when --serial is on), the ACPI PM registers, the i8042's reset line and the CMOS RTC."""
    services: list[Service] = []
    serial = None
    if config.serial.mode is not ConsoleMode.OFF:
        output = ConsoleOutput(config.serial)
        _closing(stack, output)
        serial = Serial(KvmIrqLine(vm, layout.SERIAL_COM1_IRQ), output.write)
        stack.callback(serial.flush_output)  # bytes replayed as the VM stopped (before the output closes)
        pio_bus.insert(layout.SERIAL_COM1_PORT, 8, serial)
        if config.serial.mode is ConsoleMode.TTY:
            services.append(TerminalInput(serial.queue_input))
    pm = AcpiPmDevice(
        on_poweroff=lambda: latch.request(ExitKind.POWEROFF),
        on_reset=lambda: latch.request(ExitKind.RESET),
    )
    pio_bus.insert(layout.ACPI_PM_PORT, layout.ACPI_PM_SIZE, pm)
    i8042 = I8042Device(on_reset=lambda: latch.request(ExitKind.RESET))
    pio_bus.insert(layout.I8042_PORT, layout.I8042_SIZE, i8042)
    # The guest's wall clock at boot (and `hwclock`) comes from here, as under cloud-hypervisor.
    pio_bus.insert(layout.CMOS_PORT, layout.CMOS_SIZE, CmosDevice.for_ram_size(config.memory.size))
    return services, serial


def _add_console(config: VmConfig, memory: GuestMemory, platform: PciPlatform, router: MsiRouter, vm: Vm,
                 stack: contextlib.ExitStack) -> list[Service]:
    """The virtio-console (`--console`, hvc0) unless it is off; with tty, the services feeding it stdin and
    the terminal's size."""
    console = config.console
    if console.mode is ConsoleMode.OFF:
        return []
    from pyvmm.devices.virtio.attach import attach_virtio
    from pyvmm.devices.virtio.console import VirtioConsole

    output = ConsoleOutput(console, "--console")
    _closing(stack, output)
    size = terminal_size() if console.mode is ConsoleMode.TTY else None
    device = VirtioConsole(output.write, size)
    transport = attach_virtio(device, segment=console.pci_segment, slot=console.pci_device_id,
                              name=f"virtio-console-{console.id or 0}", memory=memory, platform=platform,
                              router=router, irqfds=vm, ioeventfds=vm)
    _closing(stack, transport)
    if console.mode is not ConsoleMode.TTY:
        return []
    services: list[Service] = [TerminalInput(device.queue_input, "console-input")]
    if size is not None:

        def resized(cols: int, rows: int) -> None:
            if device.set_size(cols, rows):
                transport.notify_config_change()

        services.append(TerminalResize(resized))
    return services


def _add_rng(config: VmConfig, memory: GuestMemory, platform: PciPlatform, router: MsiRouter, vm: Vm,
             stack: contextlib.ExitStack) -> None:
    """The virtio-rng every VM has (`--rng src=`, /dev/urandom by default)."""
    from pyvmm.devices.virtio.attach import attach_virtio
    from pyvmm.devices.virtio.rng import RngSourceError, VirtioRng

    src = config.rng.src
    try:
        device = VirtioRng.open(str(src))
    except (RngSourceError, VmError) as exc:
        raise in_context(f"--rng src={src}", exc) from exc
    transport = attach_virtio(device, segment=0, slot=None, name="virtio-rng", memory=memory,
                              platform=platform, router=router, irqfds=vm, ioeventfds=vm)
    _closing(stack, transport)


def _add_vsock(config: VmConfig, memory: GuestMemory, platform: PciPlatform, router: MsiRouter, vm: Vm,
               stack: contextlib.ExitStack) -> list[Service]:
    """`--vsock`: the virtio-vsock and its muxer listening on the socket (docs/vsock.md); the muxer's
    thread is a service, started with the vCPUs (under its own seccomp filter: docs/seccomp.md)."""
    if config.vsock is None:
        return []
    from pyvmm.devices.virtio.attach import attach_virtio
    from pyvmm.devices.virtio.vsock import MuxerService, VirtioVsock
    from pyvmm.devices.virtio.vsock_muxer import VsockSocketError

    vsock = config.vsock
    label = f"--vsock socket={vsock.socket}"
    try:
        device = VirtioVsock.open(vsock.cid, str(vsock.socket), start=False)
    except VsockSocketError as exc:
        raise ConfigError(label, exc.strerror or str(exc)) from None
    transport = attach_virtio(device, segment=vsock.pci_segment, slot=vsock.pci_device_id,
                              name=f"virtio-vsock-{vsock.id or 0}", memory=memory, platform=platform,
                              router=router, irqfds=vm, ioeventfds=vm)
    _closing(stack, transport)
    return [MuxerService(device.muxer)]


def _disk_services(config: VmConfig, disks: Sequence[DiskConfig] | None = None,
                   private_ram: bool = False) -> list[DiskService]:
    """Who serves each of `disks` (the --disks by default), and the qemu-storage-daemon to start for it
    (vhost/storage_daemon.py). Under pyvmm's seccomp filter (`pyvmm --api-socket` installs it before it
    builds) only the spawner it started beforehand can start one (vhost/spawner.py)."""
    disks = config.disks if disks is None else disks
    if not disks:
        return []
    from pyvmm.vhost.spawner import can_start_daemons
    from pyvmm.vhost.storage_daemon import disk_service, storage_daemon_binary

    daemon = storage_daemon_binary()
    can_start = can_start_daemons()
    host_cpus = len(os.sched_getaffinity(0))
    return [disk_service(disk, config.memory, daemon, can_start=can_start, vcpus=config.cpus.boot,
                         host_cpus=host_cpus, private_ram=private_ram)
            for disk in disks]


def _memory_for_disks(config: VmConfig, services: list[DiskService]) -> MemoryConfig:
    """--memory, with RAM a shared memfd when a qemu-storage-daemon serves a disk: it maps guest RAM
    (docs/virtio-blk.md#who-serves-a-disk)."""
    if not services or config.memory.shared:
        return config.memory
    from pyvmm.vhost.storage_daemon import shares_ram_for_disks

    if not shares_ram_for_disks(services):
        return config.memory
    return dataclasses.replace(config.memory, shared=True)


def _hotplug_disk_service(config: VmConfig, memory: GuestMemory) -> Callable[[DiskConfig], DiskService]:
    """Who serves a disk hot-plugged into this VM (vm.add-disk): as for --disk, except that a daemon needs
    guest RAM to be a shared memfd already, which it is only if the VM booted with it (--memory shared=on,
    or a daemon-served --disk: docs/virtio-blk.md#who-serves-a-disk). Asked at each vm.add-disk, not at
    build: a VM that never gets one is not refused for a bad PYVMM_STORAGE_DAEMON (the call is)."""
    private_ram = not memory.backing.memfd
    return lambda disk: _disk_services(config, [disk], private_ram)[0]


def _add_disks(config: VmConfig, services: list[DiskService], memory: GuestMemory,
               platform: PciPlatform, router: MsiRouter, vm: Vm,
               stack: contextlib.ExitStack) -> list[BootDisk]:
    """Open and lock every --disk image (starting its qemu-storage-daemon, or the worker) and plug one
    virtio-blk each (before VFIO, as CH orders them)."""
    if not config.disks:
        return []
    # The virtio and VFIO stacks are imported only by VMs that use them: start-up time matters.
    from pyvmm.devices.virtio.attach import attach_disks

    attached = attach_disks(config.disks, memory=memory, platform=platform, router=router, irqfds=vm,
                            ioeventfds=vm, services=services)
    for transport, _address in attached:
        _closing(stack, transport)  # also when the guest ejected it first (closing twice is harmless)
    return [BootDisk(disk.id, transport, address)
            for disk, (transport, address) in zip(config.disks, attached, strict=True)]


def _add_fs(config: VmConfig, memory: GuestMemory, platform: PciPlatform, router: MsiRouter, vm: Vm,
            stack: contextlib.ExitStack) -> list[VirtioPciDevice]:
    """One virtio-fs per --fs, its queues served by the vhost-user backend on its socket
    (docs/virtio-fs.md); after the rng, as cloud-hypervisor orders them."""
    if not config.fs:
        return []
    from pyvmm.devices.virtio.attach import attach_fs

    attached = attach_fs(config.fs, memory=memory, platform=platform, router=router, irqfds=vm, ioeventfds=vm)
    for transport in attached:
        _closing(stack, transport)
    return attached


def _watch_vhost_user_backends(transports: list[VirtioPciDevice], memory: GuestMemory, latch: ExitLatch,
                               stack: contextlib.ExitStack) -> HangupWatch | None:
    """A vhost-user backend that hangs up stops the VM with one line naming the disk or file system
    (docs/virtio-blk.md#a-dead-backend). The watch runs whenever guest RAM is a shared memfd, the one case
    where a vhost-user device can be there, at boot or hot-plugged later (docs/hotplug.md)."""
    if not memory.backing.memfd:
        return None  # no vhost-user device possible: the vhost-user modules stay unloaded
    from pyvmm.devices.virtio.attach import backend_socket
    from pyvmm.vhost.hangup import HangupWatch

    def stop(message: str) -> None:
        latch.request(ExitKind.ERROR, message)

    watch = HangupWatch(stop, [s for t in transports if (s := backend_socket(t)) is not None])
    _closing(stack, watch)  # also when the build fails before the VM runs
    return watch


def _add_nets(config: VmConfig, memory: GuestMemory, platform: PciPlatform, router: MsiRouter, vm: Vm,
              stack: contextlib.ExitStack) -> list[BootDisk]:
    """One virtio-net per --net, its queues served by vhost-net on a tap (docs/net.md); like the disks,
    removable by the guest's eject (hotplug.py)."""
    if not config.nets:
        return []
    from pyvmm.devices.virtio.attach import attach_nets

    nets = []
    for net, (transport, address) in zip(config.nets, attach_nets(config.nets, memory=memory,
                                                                  platform=platform, router=router,
                                                                  irqfds=vm, ioeventfds=vm), strict=True):
        _closing(stack, transport)
        nets.append(BootDisk(net.id, transport, address))
    return nets


def _add_hotplug(config: VmConfig, vm: Vm, memory: GuestMemory, platform: PciPlatform, router: MsiRouter,
                 mmio_bus: IoBus, phys_bits: int, host_request: Callable[[str, str], None],
                 hangups: HangupWatch | None) -> PciHotplug:
    """The Generic Event Device and the PCI hot-plug registers in the platform area, and the object that adds
    and removes passed-through functions while the VM runs (docs/hotplug.md)."""
    ged = AcpiGed(KvmIrqLine(vm, layout.GED_IRQ))
    mmio_bus.insert(layout.ged_base(phys_bits), layout.GED_SIZE, ged)
    registry: VfioGroupRegistry | None = None

    def kvm_vfio_device() -> VfioGroupRegistry:
        nonlocal registry
        if registry is None:  # one per VM, created before any group joins (docs/ARCHITECTURE.md)
            from pyvmm.kvm.vfio_device import KvmVfioDevice

            device = KvmVfioDevice(vm)
            device.create()
            registry = device
        return registry

    hotplug = PciHotplug(platform=platform, ged=ged, memory=memory, router=router, irqfds=vm,
                         ioeventfds=vm, registry=kvm_vfio_device, p2p_dma=config.platform.vfio_p2p_dma,
                         allow_unsafe_interrupts=config.platform.allow_unsafe_interrupts,
                         on_host_request=host_request, hangups=hangups,
                         disk_service=_hotplug_disk_service(config, memory))
    mmio_bus.insert(layout.pci_hotplug_base(phys_bits), layout.PCI_HOTPLUG_SIZE, hotplug.registers)
    return hotplug


def _add_vfio_devices(config: VmConfig, memory: GuestMemory, platform: PciPlatform, router: MsiRouter, vm: Vm,
                      stack: contextlib.ExitStack,
                      host_request: Callable[[str, str], None]) -> VfioPassthrough | None:
    """Open, DMA-map (all RAM, IOVA = GPA) and plug every --device before the guest runs."""
    if not config.devices:
        return None
    from pyvmm.kvm.vfio_device import KvmVfioDevice
    from pyvmm.vfio import attach_vfio_devices

    registry = KvmVfioDevice(vm)
    registry.create()  # before any group joins a container (docs/ARCHITECTURE.md)
    vfio = attach_vfio_devices(config.devices, platform=platform, registry=registry, irqfds=vm, router=router,
                               memory=memory, p2p_dma=config.platform.vfio_p2p_dma, on_request=host_request)
    _closing(stack, vfio)
    return vfio


def _check_plan(plan: PciPlan, platform: PciPlatform) -> None:
    """Every device's BARs where the plan (and `--dry-run`) said they would be."""
    for planned in plan.devices:
        address = PciAddress(planned.item.segment, planned.slot)
        actual = tuple(platform.placements(address)) if platform.device(address) else ()
        if actual != planned.placements:
            log.warning("%s: BARs placed at %s, not where planned (%s)", planned.item.label,
                        [hex(p.address) for p in actual], [hex(p.address) for p in planned.placements])


def _create_vcpus(config: VmConfig, vm: Vm, *, kvm_supported: list[CpuidEntry], phys_bits: int) -> list[Vcpu]:
    topology = None
    if config.cpus.topology is not None:
        t = config.cpus.topology
        topology = CpuTopology(t.threads_per_core, t.cores_per_die, t.dies_per_package, t.packages)
    tsc_deadline = bool(vm.check_extension(KvmCap.KVM_CAP_TSC_DEADLINE_TIMER))
    vcpus = []
    for index in range(config.cpus.boot):
        vcpu = vm.create_vcpu(index)
        vcpus.append(vcpu)
        entries = adjust_cpuid(kvm_supported, index, config.cpus.boot, phys_bits, topology, tsc_deadline)
        vcpu.set_cpuid2([_kvm_cpuid_entry(e) for e in entries])
        vcpu.set_msrs(boot_msrs())
    return vcpus


def _set_boot_state(vcpu: Vcpu, state: BootVcpuState) -> None:
    regs = vcpu.get_regs()
    _fill(regs, state.regs)
    vcpu.set_regs(regs)
    sregs = vcpu.get_sregs()
    _fill(sregs, state.sregs)
    vcpu.set_sregs(sregs)
    fpu = vcpu.get_fpu()
    _fill(fpu, state.fpu)
    vcpu.set_fpu(fpu)


def _fill(struct: Any, values: Any) -> None:
    """Copy a boot dataclass into the ctypes struct whose field names it shares."""
    for name in getattr(values, "__dataclass_fields__", {}):
        value = getattr(values, name)
        if hasattr(value, "__dataclass_fields__"):
            _fill(getattr(struct, name), value)
        else:
            setattr(struct, name, int(value))


def _reset_vector_stub() -> bytes:
    """Real-mode code at the reset vector that asks for a reset through the ACPI reset register.

    There is no firmware: a guest that reboots by jumping back to the BIOS entry point finds this instead.
    """
    port = layout.ACPI_PM_PORT + PmRegister.RESET
    return bytes([0xBA, port & 0xFF, port >> 8, 0xB0, RESET_VALUE, 0xEE, 0xF4, 0xEB, 0xFD])
    # mov dx, port; mov al, value; out dx, al; 1: hlt; jmp 1b


def _cpuid_entry(e: kvm_cpuid_entry2) -> CpuidEntry:
    return CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)


def _kvm_cpuid_entry(e: CpuidEntry) -> kvm_cpuid_entry2:
    return kvm_cpuid_entry2(function=e.function, index=e.index, flags=e.flags,
                            eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx)

