"""`pyvmm` after the command line is parsed: check what can be checked before touching KVM, bind managed
devices, build the VM (pyvmm.builder), run it, tear it down, and turn how it ended into an exit status.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pyvmm import memlock, seccomp
from pyvmm.boot import KernelImageError, check_kernel
from pyvmm.builder import build_vm
from pyvmm.config import VmConfig
from pyvmm.errors import UsageError, VmError, in_context
from pyvmm.events import EventMonitor
from pyvmm.irq_remapping import UNSAFE_INTERRUPTS_OPT_IN, check_interrupt_isolation
from pyvmm.machine import ExitKind, VirtualMachine, VmExit
from pyvmm.pci.platform import PciAddress
from pyvmm.vmplan import dry_run_report

__all__ = ["UNSAFE_INTERRUPTS_OPT_IN", "check_interrupt_isolation", "run_vm"]

if TYPE_CHECKING:
    from pyvmm.vfio.passthrough import ManagedBinding

log = logging.getLogger("pyvmm")


def run_vm(config: VmConfig, events: EventMonitor | None = None) -> int:
    events = events or EventMonitor(None)
    check_kernel_file(config)
    if config.dry_run:
        return _dry_run(config)
    with managed_devices(config) as managed:
        events.emit("vm", "booting")
        machine = build_vm(config, on_host_request=managed.host_asked_back)
        watch_removals(machine, events)
        try:
            # Everything is open and mapped: from here on each thread keeps to its allow-list
            # (docs/seccomp.md#when); the teardown below runs under the same filter.
            seccomp.install(config.seccomp)
            events.emit("vm", "booted")  # the vCPUs start next, as the API's vm.boot answers once they run
            result = machine.run()
        finally:
            managed.hold_signals()  # tearing down must not be interrupted: the give-back needs the fds closed
            machine.close()
            events.emit("vm", "shutdown")
    return exit_status(result)


def watch_removals(machine: VirtualMachine, events: EventMonitor) -> None:
    """`vm/device-removed {id, bdf}` each time the guest has ejected a device and it is released."""

    def removed(ident: str, address: PciAddress) -> None:
        events.emit("vm", "device-removed", {"id": ident, "bdf": str(address)})

    machine.hotplug.on_removed = removed


def check_kernel_file(config: VmConfig) -> None:
    """Refuse a file that is neither a bzImage nor a PVH ELF vmlinux before touching KVM (headers only)."""
    kernel = config.payload.kernel
    if kernel is None:  # the parser requires --kernel
        raise UsageError("--kernel: a kernel to boot is required")
    try:
        check_kernel(kernel, config.memory.size)
    except KernelImageError as exc:
        raise in_context(f"--kernel {kernel}", exc) from exc
    except OSError as exc:
        raise UsageError(f"--kernel {kernel}: {exc.strerror}") from exc


class _NoDevices:
    """What managed_devices yields for a VM without --device: nothing to bind, nothing to hold."""

    def hold_signals(self) -> None:
        pass

    def host_asked_back(self, name: str) -> None:
        pass


@contextlib.contextmanager
def managed_devices(config: VmConfig) -> Iterator[ManagedBinding | _NoDevices]:
    """--device ...,managed=on: bind their IOMMU groups before building, give them back on every way out."""
    if not config.devices:
        yield _NoDevices()
        return
    check_interrupt_isolation(config.platform.allow_unsafe_interrupts)
    check_unprivileged(config)
    from pyvmm.vfio.passthrough import managed_binding

    with managed_binding(config.devices, config.platform.allow_unsafe_interrupts) as managed:
        yield managed


def check_unprivileged(config: VmConfig) -> None:
    """Before anything is opened: managed=on needs root (it rebinds drivers), and VFIO must be able to pin
    all guest RAM under this process's RLIMIT_MEMLOCK (root has CAP_IPC_LOCK and no limit)."""
    managed = [dev for dev in config.devices if dev.managed]
    if managed and os.geteuid() != 0:
        raise UsageError(
            f"--device path={managed[0].path},managed=on: binding a device to vfio-pci and giving it back "
            f"needs root; run pyvmm as root, or bind it beforehand (`pyvmm-host bind BDF --owner USER`) "
            f"and drop managed=on"
        )
    memlock.check_vfio_pinning(config.memory.size)


def _dry_run(config: VmConfig) -> int:
    """Print where every segment's windows and every device's BARs go; opens neither KVM nor VFIO."""
    sys.stdout.write(dry_run_report(config))
    return 0


def exit_status(result: VmExit) -> int:
    if result.kind is ExitKind.ERROR:
        raise VmError(result.detail)
    if result.kind is ExitKind.RESET:
        log.warning("the guest asked for a reboot; pyvmm does not restart guests, it exits")
    if result.kind is ExitKind.SIGNAL:
        print(f"pyvmm: stopped by {result.detail}", file=sys.stderr)
    return 0
