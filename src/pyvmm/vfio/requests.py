"""The host asking for a passed-through device back (VFIO_PCI_REQ_IRQ_INDEX).

When the host takes a device away from vfio-pci — it is removed from the bus (`echo 1 >
/sys/bus/pci/devices/BDF/remove`, a hot-unplug) or unbound from vfio-pci — the kernel signals the eventfd
the device's user registered for the request IRQ, then waits (repeating the request every 10 s) until every
fd of the device is closed. Without such an eventfd the removal blocks until the VMM happens to exit.

DeviceRequests waits on those eventfds in one thread and reports each device once, with a one-line message;
the VMM stops the VM on it and closing the VM's VFIO side lets the removal finish. The VMM also tells its
managed=on binding (ManagedBinding.host_asked_back), so that it does not give back a device the host is
removing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

from pyvmm.vfio.bindings import VfioPciIrq
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError

log = logging.getLogger(__name__)

_REQ = VfioPciIrq.VFIO_PCI_REQ_IRQ_INDEX

def removal_message(name: str) -> str:
    return (
        f"{name}: the host removed the device while the guest had it (hot-unplug, or unbound from "
        "vfio-pci); the VM was stopped"
    )


class DeviceRequests:
    """Request eventfds of VFIO devices, watched by one thread; `on_request(name, message)` runs once per
    device, on that thread."""

    def __init__(self, on_request: Callable[[str, str], None]) -> None:
        self._on_request = on_request
        self._names: dict[int, str] = {}  # eventfd -> device name
        self._reported: set[str] = set()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None

    def add(self, name: str, eventfd: int) -> None:
        """Watch `eventfd` (already registered with the kernel) for device `name`; while watching (a device
        hot-plugged), the watcher restarts with it."""
        running = self._thread is not None
        self.stop()
        self._names[eventfd] = name
        if running:
            self.start()

    def forget(self, name: str) -> None:
        """Stop watching device `name` and close its eventfd (after its device fd is closed: hot-unplug)."""
        fds = [fd for fd, watched in self._names.items() if watched == name]
        if not fds:
            return
        running = self._thread is not None
        self.stop()
        for fd in fds:
            del self._names[fd]
            with contextlib.suppress(OSError):
                os.close(fd)
        self._reported.discard(name)
        if running:
            self.start()

    def watch(self, device: VfioDevice) -> bool:
        """Register a request eventfd for `device`; False when its vfio-pci offers no request IRQ."""
        if device.irq_count(_REQ) < 1:
            log.info("%s: no request IRQ: a host removal waits for pyvmm to exit", device.name)
            return False
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            device.enable_eventfds(_REQ, [fd])
        except VfioError as exc:
            os.close(fd)
            log.warning("%s (a host removal will wait for pyvmm to exit)", exc)
            return False
        self.add(device.name, fd)
        return True

    @property
    def watched(self) -> list[str]:
        return list(self._names.values())

    def start(self) -> None:
        if self._thread is None and self._names:
            self._thread = threading.Thread(target=self._run, name="vfio-requests", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        for fd in self._names:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _events in poller.poll():
                if fd == self._stop_fd:
                    return
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
                name = self._names[fd]
                if name in self._reported:
                    continue  # the kernel repeats its request until the device is released
                self._reported.add(name)
                try:
                    self._on_request(name, removal_message(name))
                except Exception:  # the watcher must go on for the other devices
                    log.exception("%s: handling the host's request failed", name)

    def stop(self) -> None:
        """Stop watching (the eventfds stay open until close())."""
        thread, self._thread = self._thread, None
        if thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            thread.join()
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._stop_fd)  # a later start() must not stop at once

    def close(self) -> None:
        """Stop and close the eventfds; call after the device fds are closed (the kernel drops its
        reference to an eventfd when the device is released)."""
        self.stop()
        for fd in list(self._names):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._names.clear()
        if self._stop_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._stop_fd)
            self._stop_fd = -1
