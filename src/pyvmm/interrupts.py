"""MSI delivery without Python on the data path: one VM-wide GSI routing table plus one irqfd per vector.

Devices (virtio, VFIO) get an `IrqfdMsiVectors`, which implements `pci.msi.MsiVectorSink`: the guest's
MSI/MSI-X programming becomes KVM MSI routes, and each vector's eventfd is bound to its GSI with an irqfd.
Whoever raises the interrupt (the VFIO kernel driver, a virtio worker thread) just writes the eventfd.
"""

from __future__ import annotations

import contextlib
import os
import threading

from pyvmm import layout
from pyvmm.errors import PyvmmError
from pyvmm.hypervisor import GsiRouting, Irqfds
from pyvmm.kvm.routing import MsiRoute, Route, default_irqchip_routes
from pyvmm.pci.msi import MsiMessage, address_is_routable


class InterruptError(PyvmmError):
    pass


class MsiRouter:
    """The VM-wide GSI routing table: the default IOAPIC/PIC routes plus every unmasked MSI vector."""

    def __init__(self, routing: GsiRouting) -> None:
        self._routing = routing
        self._lock = threading.Lock()
        self._msi: dict[int, MsiRoute] = {}
        self._free = list(range(layout.MSI_GSI_END - 1, layout.MSI_GSI_BASE - 1, -1))

    def allocate_gsi(self) -> int:
        with self._lock:
            if not self._free:
                raise InterruptError("out of GSIs for MSI vectors")
            return self._free.pop()

    def release_gsi(self, gsi: int) -> None:
        with self._lock:
            self._msi.pop(gsi, None)
            self._free.append(gsi)

    def set_route(self, gsi: int, message: MsiMessage | None) -> None:
        """Install (or with None remove) the MSI route of `gsi` and push the whole table to KVM."""
        with self._lock:
            if message is None:
                if self._msi.pop(gsi, None) is None:
                    return
            else:
                self._msi[gsi] = MsiRoute(gsi, message.address, message.data)
            routes: list[Route] = [*default_irqchip_routes(layout.IOAPIC_NUM_PINS), *self._msi.values()]
            self._routing.set_gsi_routing(routes)


class IrqfdMsiVectors:
    """`count` MSI vectors, each an eventfd bound by irqfd to a GSI routed to the guest's message.

    Order (docs/interrupts.md#routing-and-irqfd-order): unmasking installs the route before assigning the
    irqfd; masking deassigns the irqfd before removing the route. While masked, signals accumulate in the
    eventfd and are delivered when the irqfd is assigned again.
    """

    def __init__(self, router: MsiRouter, irqfds: Irqfds, count: int) -> None:
        self._router = router
        self._irqfds = irqfds
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self._gsi: list[int | None] = [None] * count
        self._assigned = [False] * count
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.eventfds)

    def vector_changed(self, vector: int, message: MsiMessage | None) -> None:
        if not 0 <= vector < len(self.eventfds):
            return
        if message is not None and not address_is_routable(message.address):
            message = None  # guest-programmed address outside the MSI window: never routed
        with self._lock:
            gsi = self._gsi[vector]
            if message is None:
                if gsi is None:
                    return
                if self._assigned[vector]:
                    self._irqfds.irqfd(self.eventfds[vector], gsi, deassign=True)
                    self._assigned[vector] = False
                self._router.set_route(gsi, None)
                return
            if gsi is None:
                gsi = self._gsi[vector] = self._router.allocate_gsi()
            self._router.set_route(gsi, message)
            if not self._assigned[vector]:
                self._irqfds.irqfd(self.eventfds[vector], gsi)
                self._assigned[vector] = True

    def enable_changed(self, enabled: bool, count: int) -> None:
        """Nothing to do here: routes follow vector_changed; the device model acts on enable itself."""

    def signal(self, vector: int, message: MsiMessage) -> None:
        self.trigger(vector)

    def trigger(self, vector: int) -> None:
        """Raise `vector` (from a device thread): a plain eventfd write, delivered by KVM."""
        try:  # noqa: SIM105 - contextlib.suppress costs a context manager per interrupt
            os.eventfd_write(self.eventfds[vector], 1)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            for vector, gsi in enumerate(self._gsi):
                if gsi is None:
                    continue
                if self._assigned[vector]:
                    with contextlib.suppress(OSError):
                        self._irqfds.irqfd(self.eventfds[vector], gsi, deassign=True)
                    self._assigned[vector] = False
                with contextlib.suppress(OSError):
                    self._router.set_route(gsi, None)  # the route goes from KVM's table too
                self._router.release_gsi(gsi)
                self._gsi[vector] = None
            for fd in self.eventfds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.eventfds = []
