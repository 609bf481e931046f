"""MSI delivery without Python on the data path: one VM-wide GSI routing table plus one irqfd per vector.

Devices (virtio, VFIO) get an `IrqfdMsiVectors`, which implements `pci.msi.MsiVectorSink`: the guest's
MSI/MSI-X programming becomes KVM MSI routes, and each vector's eventfd is bound to its GSI with an irqfd.
Whoever raises the interrupt (the VFIO kernel driver, a virtio worker thread) just writes the eventfd.

A routing failure (the GSI pool is empty, KVM refuses the table) never leaves the device model: the vector
stays masked and a warning is logged (docs/interrupts.md#routing-failures).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence

from pyvmm import layout
from pyvmm.errors import PyvmmError
from pyvmm.hypervisor import GsiRouting, Irqfds
from pyvmm.kvm.routing import MsiRoute, Route, RouteTable, default_irqchip_routes
from pyvmm.pci.msi import MsiMessage, address_is_routable

log = logging.getLogger(__name__)

# KVM refuses a table of more than KVM_MAX_IRQ_ROUTES (4096) entries and any GSI >= 4096. pyvmm routes at
# most half of that for MSI (plus the 40 IOAPIC/PIC entries): room to spare below KVM's limit, and every
# table KVM_SET_GSI_ROUTING copies stays small (docs/interrupts.md#routing-failures).
MAX_MSI_ROUTES = layout.MSI_ROUTES_MAX


class InterruptError(PyvmmError):
    pass


class GsiExhausted(InterruptError):
    """No GSI left in the VM's MSI pool."""


class MsiRouter:
    """The VM-wide GSI routing table: the default IOAPIC/PIC routes plus every unmasked MSI vector.

    A change is recorded only once KVM has accepted the table holding it; a refused table is undone, so the
    table always equals what KVM has. Rewriting a route with what it already holds calls nothing.
    """

    def __init__(self, routing: GsiRouting, max_routes: int = MAX_MSI_ROUTES) -> None:
        if not 1 <= max_routes <= min(MAX_MSI_ROUTES, layout.MSI_GSI_END - layout.MSI_GSI_BASE):
            raise ValueError(f"MSI route cap {max_routes} out of range 1..{MAX_MSI_ROUTES}")
        self._routing = routing
        self._lock = threading.Lock()
        self._table = RouteTable(default_irqchip_routes(layout.IOAPIC_NUM_PINS), max_routes)
        self._free = list(range(layout.MSI_GSI_BASE + max_routes - 1, layout.MSI_GSI_BASE - 1, -1))
        self.max_routes = max_routes
        self.kvm_calls = 0  # KVM_SET_GSI_ROUTING calls made (for tests and measurements)

    @property
    def routes(self) -> Sequence[Route]:
        """The table as KVM has it (read-only view)."""
        return tuple(self._table)

    def allocate_gsi(self) -> int:
        with self._lock:
            if not self._free:
                raise GsiExhausted(f"all {self.max_routes} GSIs for MSI vectors are in use")
            return self._free.pop()

    def release_gsi(self, gsi: int) -> None:
        with self._lock:
            self._table.remove(gsi)  # the caller removed the route from KVM first (or it never got there)
            self._free.append(gsi)

    def set_route(self, gsi: int, message: MsiMessage | None) -> None:
        """Install (or with None remove) the MSI route of `gsi` (OSError from KVM: nothing changed)."""
        self.set_routes({gsi: message})

    def set_routes(self, changes: dict[int, MsiMessage | None]) -> None:
        """Apply several route changes with one KVM_SET_GSI_ROUTING; all or none (OSError: none)."""
        with self._lock:
            undo: list[tuple[int, MsiRoute | None]] = []
            try:
                for gsi, message in changes.items():
                    route = None if message is None else MsiRoute(gsi, message.address, message.data)
                    if self._table.get(gsi) == route:
                        continue
                    undo.append((gsi, self._table.apply(gsi, route)))
                if not undo:
                    return
                self.kvm_calls += 1
                self._routing.set_gsi_routing(self._table)  # the table itself: KVM gets it as it is
            except BaseException:
                for gsi, old in reversed(undo):
                    self._table.apply(gsi, old)
                raise


class IrqfdMsiVectors:
    """`count` MSI vectors, each an eventfd bound by irqfd to a GSI routed to the guest's message.

    Order (docs/interrupts.md#routing-and-irqfd-order): unmasking installs the route before assigning the
    irqfd; masking deassigns the irqfd before removing the route. While masked, signals accumulate in the
    eventfd and are delivered when the irqfd is assigned again. A vector that cannot be routed stays masked
    (no irqfd) and the device model carries on; each kind of failure is logged once per device.
    """

    def __init__(self, router: MsiRouter, irqfds: Irqfds, count: int, name: str = "device") -> None:
        self._router = router
        self._irqfds = irqfds
        self.name = name
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self._gsi: list[int | None] = [None] * count
        self._assigned = [False] * count
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.eventfds)

    def routed(self, vector: int) -> bool:
        """Whether `vector` has its route and irqfd now."""
        return 0 <= vector < len(self._assigned) and self._assigned[vector]

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        # Once per device and kind: a guest unmasking thousands of vectors must not cost a line each.
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, msg, *args)

    def vector_changed(self, vector: int, message: MsiMessage | None) -> None:
        self.vectors_changed([(vector, message)])

    def vectors_changed(self, changes: Sequence[tuple[int, MsiMessage | None]]) -> list[int]:
        """Apply several vector changes with one KVM_SET_GSI_ROUTING when all succeed; never raises.

        Returns the vectors among `changes` that have a route and an irqfd afterwards.
        """
        count = len(self.eventfds)
        with self._lock:
            removals: dict[int, MsiMessage | None] = {}
            installs: dict[int, MsiMessage | None] = {}
            wanted: list[tuple[int, int]] = []  # (vector, GSI) to be routed
            for vector, message in changes:
                if not 0 <= vector < count:
                    continue
                if message is not None and not address_is_routable(message.address):
                    message = None  # guest-programmed address outside the MSI window: never routed
                gsi = self._gsi[vector]
                if message is None:
                    if gsi is not None:
                        self._deassign(vector, gsi)
                        removals[gsi] = None
                    continue
                if gsi is None:
                    try:
                        gsi = self._gsi[vector] = self._router.allocate_gsi()
                    except GsiExhausted as e:
                        self._warn("gsi", "%s: MSI vector %d stays masked: %s", self.name, vector, e)
                        continue
                installs[gsi] = message
                wanted.append((vector, gsi))
            failed = self._commit({**removals, **installs})
            routed: list[int] = []
            for vector, gsi in wanted:
                if gsi in failed:
                    self._deassign(vector, gsi)  # refused new message: the old one must not stay either
                    with contextlib.suppress(OSError, ValueError):
                        self._router.set_route(gsi, None)
                    continue
                if not self._assigned[vector]:
                    try:
                        self._irqfds.irqfd(self.eventfds[vector], gsi)
                    except OSError as e:
                        self._warn("irqfd", "%s: MSI vector %d stays masked: irqfd failed: %s", self.name,
                                   vector, e)
                        with contextlib.suppress(OSError, ValueError):
                            self._router.set_route(gsi, None)
                        continue
                    self._assigned[vector] = True
                routed.append(vector)
            return routed

    def _deassign(self, vector: int, gsi: int) -> None:
        if self._assigned[vector]:
            try:
                self._irqfds.irqfd(self.eventfds[vector], gsi, deassign=True)
            except OSError as e:
                log.warning("%s: deassigning the irqfd of MSI vector %d failed: %s", self.name, vector, e)
            self._assigned[vector] = False

    def _commit(self, changes: dict[int, MsiMessage | None]) -> set[int]:
        """Send `changes` to KVM, together if it takes them, else one by one; the GSIs it refused."""
        if not changes:
            return set()
        try:
            self._router.set_routes(changes)
            return set()
        except (OSError, ValueError) as e:
            if len(changes) == 1:
                self._warn("kvm", "%s: KVM refused an MSI route, the vector stays masked: %s", self.name, e)
                return set(changes)
        failed: set[int] = set()
        for gsi, message in changes.items():
            try:
                self._router.set_route(gsi, message)
            except (OSError, ValueError) as e:
                failed.add(gsi)
                self._warn("kvm", "%s: KVM refused an MSI route, the vector stays masked: %s", self.name, e)
        return failed

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

    def eventfd(self, vector: int) -> int:
        """The eventfd bound to `vector` (a kernel backend signals it itself)."""
        return self.eventfds[vector]

    def close(self) -> None:
        with self._lock:
            for vector, gsi in enumerate(self._gsi):
                if gsi is None:
                    continue
                if self._assigned[vector]:
                    with contextlib.suppress(OSError):
                        self._irqfds.irqfd(self.eventfds[vector], gsi, deassign=True)
                    self._assigned[vector] = False
                with contextlib.suppress(OSError, ValueError):
                    self._router.set_route(gsi, None)  # the route goes from KVM's table too
                self._router.release_gsi(gsi)
                self._gsi[vector] = None
            for fd in self.eventfds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.eventfds = []


