"""The VMM behind the API: at most one VM configuration and one running VM, changed only on the main
thread, one API call at a time (as cloud-hypervisor hands every call to its single VMM thread).

`ApiVmm.submit(request)` is what the server thread calls: it queues the request for the main thread and
waits for its response. `ApiVmm.run()` is the main thread's loop: it answers calls, notices the guest
stopping (pyvmm then exits, as cloud-hypervisor does) and signals (docs/api.md#lifecycle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pyvmm.api.http import Request, Response, error_response
from pyvmm.config import DiskConfig, NetConfig, VmConfig, check_paths
from pyvmm.errors import PyvmmError
from pyvmm.events import EventMonitor
from pyvmm.machine import ExitKind, VirtualMachine, VmExit

log = logging.getLogger("pyvmm.api")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_SECONDS = 0.2  # how soon the main thread notices a guest that stopped by itself or a signal


class VmState(Enum):
    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"


class ApiCallError(Exception):
    """A call the VMM refuses: answered with `status` and ["Error from API", context, reason]."""

    def __init__(self, status: int, context: str, reason: str) -> None:
        super().__init__(f"{context}: {reason}")
        self.status = status
        self.context = context
        self.reason = reason

    def response(self) -> Response:
        return error_response(self.status, ["Error from API", self.context, self.reason])


# The reasons of VMM-side refusals; cloud-hypervisor answers all of them with 500 (the release Kata uses).
NOT_CREATED = "VM is not created"
ALREADY_CREATED = "VM is already created"
NOT_RUNNING = "VM is not running"
ALREADY_RUNNING = "VM is already running"


SHUTTING_DOWN = error_response(500, ["Error from API", "The VMM is shutting down"])


@dataclass
class _Call:
    request: Request
    reply: queue.Queue[Response] = field(default_factory=lambda: queue.Queue(maxsize=1))


class ApiVmm:
    def __init__(self, verbosity: int = 0, events: EventMonitor | None = None) -> None:
        self.verbosity = verbosity
        self.events = events or EventMonitor(None)  # --event-monitor (docs/api.md#event-monitor)
        self.config: VmConfig | None = None
        self.machine: VirtualMachine | None = None
        self._teardown: contextlib.ExitStack | None = None
        self._calls: queue.Queue[_Call] = queue.Queue()
        self._exit: VmExit | None = None  # set: the VMM leaves its loop
        self._paused = False
        self._finished = False  # run() has ended: calls are no longer taken
        self._serving = False  # run() is answering calls (its signal handlers are in place)
        # Tap queue files (--net fd=[...], vm.add-net's SCM_RIGHTS) the VMM holds while a config has their
        # NIC: a VM works on duplicates, so vm.reboot reopens the same tap (docs/api.md#vmadd-net).
        self._fds: set[int] = set()

    # --- server thread ------------------------------------------------------------------------------------

    def submit(self, request: Request) -> Response:
        call = _Call(request)
        self._calls.put(call)
        while True:
            try:
                return call.reply.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self._finished:  # the loop ended before it took this call
                    return SHUTTING_DOWN

    # --- main thread --------------------------------------------------------------------------------------

    @property
    def state(self) -> VmState | None:
        if self.config is None:
            return None
        if self.machine is None:
            return VmState.CREATED
        return VmState.PAUSED if self._paused else VmState.RUNNING

    def request_exit(self, why: VmExit) -> None:
        """Leave the loop after the current call (vmm.shutdown, a signal)."""
        if self._exit is None:
            self._exit = why

    def run(self, handle_signals: bool = True) -> VmExit:
        """Answer calls until vmm.shutdown, a signal, or the guest stopping; then tear the VM down.
        `handle_signals=False` (tests) runs it off the main thread, without SIGINT/SIGTERM handlers."""
        from pyvmm.api.endpoints import route

        previous = (
            {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS} if handle_signals else {}
        )
        self._serving = handle_signals
        try:
            while self._exit is None:
                try:
                    call = self._calls.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    call = None
                if call is not None:
                    call.reply.put(self._answer(route, call.request))
                if self._fds:
                    self._release_fds()  # of NICs the guest has ejected
                machine = self.machine
                if machine is not None and machine.latch.wait(0):
                    # the guest powered off or reset, or the VM failed: pyvmm exits, as cloud-hypervisor does
                    self.request_exit(self._stop_vm())
        finally:
            self._stop_vm()
            self.set_config(None)
            self._serving = False
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._finished = True
            self._refuse_waiting()
        assert self._exit is not None
        return self._exit

    def _on_signal(self, signum: int, frame: object) -> None:
        self.request_exit(VmExit(ExitKind.SIGNAL, signal.Signals(signum).name))

    def _answer(self, route: Callable[[ApiVmm, Request], Response], request: Request) -> Response:
        try:
            return route(self, request)
        except ApiCallError as exc:
            return exc.response()
        except Exception as exc:  # a bug must not end the VMM: this call fails, the next is answered
            log.exception("API call %s %s failed", request.method, request.path)
            return error_response(500, ["Error from API", f"internal error: {type(exc).__name__}: {exc}"])

    def _refuse_waiting(self) -> None:
        """Calls that arrived while the VMM was leaving get an answer rather than a hung connection."""
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call.reply.put(SHUTTING_DOWN)

    # --- the tap fds the VMM holds -------------------------------------------------------------------------

    def set_config(self, config: VmConfig | None) -> None:
        """Store `config` (None: forget it); the VMM holds its NICs' tap fds from now on, and closes those
        no config has any more."""
        self.config = config
        if config is not None:
            self._fds.update(fd for net in config.nets for fd in net.fds)
        self._release_fds()

    def keep_fds(self, fds: list[int]) -> None:
        """A hot-plugged NIC's tap fds: held while the running VM has it (current_config)."""
        self._fds.update(fds)

    def close_unowned(self, fds: list[int]) -> None:
        """Close the fds of a refused call (those the VMM does not hold)."""
        for fd in fds:
            if fd not in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _release_fds(self) -> None:
        config = self.current_config()
        live = set() if config is None else {fd for net in config.nets for fd in net.fds}
        for fd in self._fds - live:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds &= live

    # --- the calls ----------------------------------------------------------------------------------------

    def create(self, config: VmConfig) -> None:
        if self.config is not None:
            raise ApiCallError(500, "The VM could not be created", ALREADY_CREATED)
        self.set_config(config)

    def boot(self) -> None:
        """Check, build and start the VM of the stored config (as `pyvmm` does with its command line)."""
        context = "The VM could not boot"
        if self.config is None:
            raise ApiCallError(500, context, "VM has no configuration: send vm.create first")
        if self.machine is not None:
            raise ApiCallError(500, context, ALREADY_RUNNING)
        self.events.emit("vm", "booting")
        try:
            self._boot(self.config)
        except PyvmmError as exc:
            raise ApiCallError(500, context, str(exc)) from exc
        except OSError as exc:  # as cli.main: a host failure no layer foresaw
            where = f"{exc.filename}: " if exc.filename else ""
            raise ApiCallError(500, context, f"{where}{exc.strerror or exc}") from exc

    def _boot(self, config: VmConfig) -> None:
        # Imported here: a VMM waiting for vm.create needs neither KVM nor ctypes set up.
        from pyvmm.builder import build_vm
        from pyvmm.vmm import check_kernel_file, managed_devices, watch_removals

        check_paths(config)
        check_kernel_file(config)
        teardown = contextlib.ExitStack()
        try:
            managed = teardown.enter_context(managed_devices(config))
            machine = build_vm(config, on_host_request=managed.host_asked_back)
            watch_removals(machine, self.events)
            teardown.callback(machine.close)
            teardown.callback(machine.stop)
            # tearing down must not be interrupted: the give-back of managed devices needs the fds closed
            teardown.callback(managed.hold_signals)
            machine.start()
        except BaseException:
            teardown.close()
            raise
        if self._serving:  # managed=on binding leaves its own handlers, which end the process
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._on_signal)
        self.machine, self._teardown = machine, teardown
        self.events.emit("vm", "booted")
        log.info("VM booted")

    def _stop_vm(self) -> VmExit:
        """Stop and tear down the running VM, if any; why it stopped."""
        machine, teardown = self.machine, self._teardown
        if machine is None or teardown is None:
            return VmExit(ExitKind.REQUESTED)
        machine.request_stop(ExitKind.REQUESTED)  # the first reason given wins: a guest's own stays
        self.machine = self._teardown = None
        self._paused = False
        teardown.close()
        self.events.emit("vm", "shutdown")
        return machine.latch.exit

    def shutdown(self) -> None:
        if self.machine is None:
            raise ApiCallError(500, "The VM could not shutdown", NOT_RUNNING)
        # What vm.boot boots next: the VM as it was, hot-plugged devices in, ejected ones out (as in CH);
        # a NIC the guest ejected, its tap fds closed already, does not come back.
        self.set_config(self.current_config())
        self._stop_vm()

    def remove_from_config(self, ident: str) -> None:
        """vm.remove-device before boot: the device with that id leaves the stored config, as in CH (only
        ids in the config count: ones the user gave, or ones a VM that ran filled in)."""
        context = "The device could not be removed from the VM"
        if self.config is None:
            raise ApiCallError(500, context, NOT_CREATED)
        changes: dict[str, Any] = {}
        for item in dataclasses.fields(self.config):
            value = getattr(self.config, item.name)
            if isinstance(value, tuple) and any(getattr(v, "id", None) == ident for v in value):
                changes[item.name] = tuple(v for v in value if getattr(v, "id", None) != ident)
        if not changes:
            raise ApiCallError(500, context, f"no device with id {ident!r} in the VM's configuration")
        self.set_config(dataclasses.replace(self.config, **changes))  # a NIC's tap fds are closed

    def current_config(self) -> VmConfig | None:
        """The stored config with its disks and devices as the running VM has them: boot-time ones the
        guest ejected gone, hot-plugged ones in, each with its id (as cloud-hypervisor keeps its config).
        What vm.info shows and what vm.reboot boots."""
        config, machine = self.config, self.machine
        if config is None or machine is None:
            return config
        from pyvmm.device_ids import vm_boot_ids

        _ids, names = vm_boot_ids(config)
        present = machine.hotplug.devices()
        disks = [dataclasses.replace(d, id=n) for d, n in zip(config.disks, names.disks, strict=True)
                 if n in present]
        devices = [dataclasses.replace(d, id=n) for d, n in zip(config.devices, names.devices, strict=True)
                   if n in present]
        nets = [dataclasses.replace(d, id=n) for d, n in zip(config.nets, names.nets, strict=True)
                if n in present]
        # --fs and --vsock stay for the VM's life; they show their ids as CH's config does
        fs = tuple(dataclasses.replace(f, id=n) for f, n in zip(config.fs, names.fs, strict=True))
        vsock = (dataclasses.replace(config.vsock, id=names.vsock[0]) if config.vsock is not None
                 else None)
        for _ident, added in machine.hotplug.hot_plugged():
            if isinstance(added, DiskConfig):
                disks.append(added)
            elif isinstance(added, NetConfig):
                nets.append(added)
            else:
                devices.append(added)
        return dataclasses.replace(config, disks=tuple(disks), devices=tuple(devices), nets=tuple(nets),
                                   fs=fs, vsock=vsock)

    def reboot(self) -> None:
        if self.machine is None:
            raise ApiCallError(500, "The VM could not reboot", NOT_RUNNING)
        self.set_config(self.current_config())  # hot-plugged devices come back after the reboot, as in CH
        self.events.emit("vm", "rebooting")
        self._stop_vm()
        self.boot()
        self.events.emit("vm", "rebooted")

    def pause(self) -> None:
        if self.machine is None:
            raise ApiCallError(500, "The VM could not be paused", NOT_RUNNING)
        if self._paused:
            raise ApiCallError(500, "The VM could not be paused", "VM is already paused")
        self.events.emit("vm", "pausing")
        self.machine.pause()
        self._paused = True
        self.events.emit("vm", "paused")

    def resume(self) -> None:
        if self.machine is None:
            raise ApiCallError(500, "The VM could not resume", NOT_RUNNING)
        if not self._paused:
            raise ApiCallError(500, "The VM could not resume", "VM is not paused")
        self.events.emit("vm", "resuming")
        self.machine.resume()
        self._paused = False
        self.events.emit("vm", "resumed")

    def delete(self) -> None:
        """Shut the VM down if it runs and forget its configuration (fine when there is none)."""
        self._stop_vm()
        self.set_config(None)
        self.events.emit("vm", "deleted")

    def shutdown_vmm(self) -> None:
        self.delete()
        self.request_exit(VmExit(ExitKind.REQUESTED))


def report_exit(result: VmExit) -> int:
    """The exit status of a VMM that served the API, as `pyvmm` ends a VM (pyvmm.vmm.exit_status)."""
    from pyvmm.vmm import exit_status

    if result.kind is ExitKind.REQUESTED:
        return 0
    if result.kind is ExitKind.SIGNAL:
        print(f"pyvmm: stopped by {result.detail}", file=sys.stderr)
        return 0
    return exit_status(result)
