"""A built VM: its vCPU loops, what it must start when it runs, and what it closes; `run`, `request_stop`,
`close`. Built only by `pyvmm.builder.build_vm`, which hands it every part ready (no optional parts).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from pyvmm.kvm.regs import format_registers
from pyvmm.kvm.runloop import RunResult, StopReason, VcpuLoop, install_kick_handler, stop_all
from pyvmm.kvm.system import Vcpu
from pyvmm.memory import GuestMemory
from pyvmm.pci.platform import PciAddress, PciPlatform

if TYPE_CHECKING:
    from pyvmm.config import DeviceConfig, DiskConfig, NetConfig
    from pyvmm.hotplug import PciHotplug

log = logging.getLogger("pyvmm")


class ExitKind(Enum):
    POWEROFF = "poweroff"
    RESET = "reset"
    SIGNAL = "signal"
    ERROR = "error"
    REQUESTED = "requested"  # stopped through the API (vm.shutdown, vm.delete, vmm.shutdown)


@dataclass(frozen=True)
class VmExit:
    kind: ExitKind
    detail: str = ""


class ExitLatch:
    """Why the VM stops: the first reason given wins. Devices built before the VM exists (the ACPI PM
    device, the i8042, VFIO's request watcher) report to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exit: VmExit | None = None
        self._set = threading.Event()

    def request(self, kind: ExitKind, detail: str = "") -> None:
        with self._lock:
            if self._exit is None:
                self._exit = VmExit(kind, detail)
        self._set.set()

    def wait(self, timeout: float) -> bool:
        return self._set.wait(timeout)

    @property
    def exit(self) -> VmExit:
        with self._lock:
            return self._exit or VmExit(ExitKind.ERROR, "the VM stopped without a reason")

    def vcpu_stopped(self, result: RunResult) -> None:
        """A vCPU loop ended (called on its thread)."""
        if result.reason is StopReason.POWEROFF:
            self.request(ExitKind.POWEROFF)
        elif result.reason is StopReason.RESET:
            self.request(ExitKind.RESET)
        elif result.reason in (StopReason.ERROR, StopReason.HALTED):
            self.request(ExitKind.ERROR, result.describe())


class Service(Protocol):
    """Something that works beside the vCPUs while the VM runs (e.g. the terminal's input)."""

    def start(self) -> None: ...

    def close(self) -> None: ...


class VirtualMachine:
    """A VM ready to run. `resources` closes everything the builder opened, in reverse order. `hotplug`
    adds and removes passed-through functions from another thread while it runs."""

    def __init__(
        self,
        *,
        vcpus: Sequence[Vcpu],
        loops: Sequence[VcpuLoop],
        latch: ExitLatch,
        memory: GuestMemory,
        platform: PciPlatform,
        pci_addresses: Sequence[PciAddress],
        hotplug: PciHotplug,
        services: Sequence[Service],
        resources: contextlib.ExitStack,
    ) -> None:
        self.vcpus = list(vcpus)
        self.loops = list(loops)
        self.latch = latch
        self.memory = memory
        self.platform = platform
        # where each PCI device the config names sits, in plug order: console, disks, rng, devices
        self.pci_addresses = tuple(pci_addresses)
        self._threads: list[threading.Thread] = []
        self.hotplug = hotplug  # add_vfio_device / remove_device while the VM runs (docs/hotplug.md)
        self.services = list(services)
        self._resources = resources

    def request_stop(self, kind: ExitKind, detail: str = "") -> None:
        """Ask every vCPU to stop; the first reason given wins."""
        self.latch.request(kind, detail)

    def run(self) -> VmExit:
        """Start one thread per vCPU and wait until the guest powers off, fails or a signal stops it."""

        def on_signal(signum: int, frame: object) -> None:
            self.request_stop(ExitKind.SIGNAL, signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            # A timed wait stays interruptible by SIGINT/SIGTERM; it need not wake often (each wake costs CPU
            # while the guest idles, and everything that ends the VM sets the latch).
            while not self.latch.wait(30.0):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.latch.exit

    def start(self) -> None:
        """Start the vCPU threads and the services (from the main thread: it installs the kick handler)."""
        install_kick_handler()
        for loop in self.loops:
            self._threads.append(loop.start_thread())
        for service in self.services:
            service.start()

    def stop(self) -> VmExit:
        """Stop the vCPUs and wait for their threads (idempotent); why the VM stopped."""
        stop_all(self.loops)
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []
        if log.isEnabledFor(logging.DEBUG):
            for vcpu in self.vcpus:  # where each vCPU was when it stopped
                log.debug("vCPU %d:\n%s", vcpu.index, format_registers(vcpu.get_regs(), vcpu.get_sregs()))
        return self.latch.exit

    def pause(self) -> None:
        """Take every vCPU out of KVM_RUN and end its thread (devices stay as they are); resume() goes on."""
        stop_all(self.loops)
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    def resume(self) -> None:
        for loop in self.loops:
            loop.rearm()
        for loop in self.loops:
            self._threads.append(loop.start_thread())

    def add_device(self, device: DeviceConfig) -> dict[str, str]:
        """vm.add-device: plug a VFIO function into the running guest; CH's answer, {"id", "bdf"}."""
        address = self.hotplug.add_vfio_device(device)
        ident = next(i for i, a in self.hotplug.devices().items() if a == address)
        return {"id": ident, "bdf": str(address)}

    def add_disk(self, disk: DiskConfig) -> dict[str, str]:
        """vm.add-disk: plug a virtio-blk disk into the running guest; CH's answer, {"id", "bdf"}."""
        ident, address = self.hotplug.add_disk(disk)
        return {"id": ident, "bdf": str(address)}

    def add_net(self, net: NetConfig) -> dict[str, str]:
        """vm.add-net: plug a virtio-net NIC into the running guest; CH's answer, {"id", "bdf"}."""
        ident, address = self.hotplug.add_net(net)
        return {"id": ident, "bdf": str(address)}

    def counters(self) -> dict[str, dict[str, int]]:
        """vm.counters: each device's counters by id (the virtio-blk disks: docs/api.md#endpoints)."""
        return self.hotplug.counters()

    def power_button(self) -> None:
        """vm.power-button: the ACPI power button's event through the GED (the guest's button driver)."""
        from pyvmm.devices.acpi_hotplug import AcpiNotification

        self.hotplug.ged.notify(AcpiNotification.POWER_BUTTON_CHANGED)

    def remove_device(self, ident: str) -> None:
        """vm.remove-device: ask the guest to eject the device; it is released when the guest does."""
        self.hotplug.remove_device(ident)

    def close(self) -> None:
        for service in self.services:
            with contextlib.suppress(Exception):
                service.close()
        self.services.clear()
        self.loops.clear()
        self.vcpus.clear()  # closed with the KVM VM
        self._resources.close()
