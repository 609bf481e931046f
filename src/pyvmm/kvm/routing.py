"""GSI routing entries for KVM_SET_GSI_ROUTING.

KVM_SET_GSI_ROUTING replaces the whole table, including the routes of GSIs 0-23 to the in-kernel PIC and
IOAPIC that KVM installs by default. A table that adds MSI routes must therefore start from
`default_irqchip_routes()`, or legacy lines (serial, PCI INTx) stop reaching the guest.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.kvm.bindings import KVM_MSI_VALID_DEVID, KvmIrqchip, KvmIrqRouting, kvm_irq_routing_array

_U32 = 0xFFFF_FFFF


@dataclass(frozen=True)
class IrqchipRoute:
    """GSI `gsi` drives `pin` of an in-kernel interrupt controller."""

    gsi: int
    irqchip: KvmIrqchip
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """GSI `gsi` delivers the MSI message (`address`, `data`); `devid` only where KVM_CAP_MSI_DEVID."""

    gsi: int
    address: int
    data: int
    devid: int | None = None


Route = IrqchipRoute | MsiRoute


def default_irqchip_routes(ioapic_pins: int = 24) -> list[IrqchipRoute]:
    """The table KVM installs at KVM_CREATE_IRQCHIP: GSI n -> IOAPIC pin n, and GSI 0-15 also -> PIC."""
    routes: list[IrqchipRoute] = []
    for gsi in range(ioapic_pins):
        routes.append(IrqchipRoute(gsi, KvmIrqchip.KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < 16:
            pic = KvmIrqchip.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KvmIrqchip.KVM_IRQCHIP_PIC_SLAVE
            routes.append(IrqchipRoute(gsi, pic, gsi % 8))
    return routes


def _encode_entry(entry: ctypes.Structure, route: Route) -> None:
    """Fill one `struct kvm_irq_routing_entry` (zeroed first); ValueError on out-of-range fields."""
    if not 0 <= route.gsi <= _U32:
        raise ValueError(f"GSI {route.gsi} out of range")
    if isinstance(route, IrqchipRoute):
        if not 0 <= route.pin <= _U32:
            raise ValueError(f"irqchip pin {route.pin} out of range for GSI {route.gsi}")
    elif isinstance(route, MsiRoute):
        if not 0 <= route.address < 1 << 64 or not 0 <= route.data <= _U32:
            raise ValueError(f"MSI address {route.address:#x} / data {route.data:#x} out of range")
    else:
        raise TypeError(f"not a GSI route: {route!r}")
    ctypes.memset(ctypes.addressof(entry), 0, ctypes.sizeof(entry))
    entry.gsi = route.gsi
    if isinstance(route, IrqchipRoute):
        entry.type = KvmIrqRouting.KVM_IRQ_ROUTING_IRQCHIP
        entry.u.irqchip.irqchip = route.irqchip
        entry.u.irqchip.pin = route.pin
    else:
        entry.type = KvmIrqRouting.KVM_IRQ_ROUTING_MSI
        entry.u.msi.address_lo = route.address & _U32
        entry.u.msi.address_hi = route.address >> 32
        entry.u.msi.data = route.data
        if route.devid is not None:
            entry.flags = KVM_MSI_VALID_DEVID
            entry.u.msi.devid = route.devid


def encode_routes(routes: Sequence[Route]) -> ctypes.Structure:
    """A `struct kvm_irq_routing` holding `routes`; raises ValueError on out-of-range fields."""
    if isinstance(routes, RouteTable):
        return routes.encoded()
    table = kvm_irq_routing_array(len(routes))()
    table.nr = len(routes)
    for entry, route in zip(table.entries, routes, strict=True):
        _encode_entry(entry, route)
    return table


class RouteTable(Sequence[Route]):
    """A routing table kept encoded as KVM takes it, updated in place: O(1) per change, nothing to pack.

    The fixed routes (the irqchip ones) come first and never move; an MSI route's place is kept per GSI, and
    a removed route's place is taken by the last one. `encoded()` is the `struct kvm_irq_routing` to hand to
    KVM_SET_GSI_ROUTING as it is (KVM reads `nr` entries; the array has room for `capacity` more).
    """

    def __init__(self, fixed: Sequence[Route], capacity: int) -> None:
        self._routes: list[Route] = list(fixed)
        self._where: dict[int, int] = {}  # MSI GSI -> index
        self._encoded = kvm_irq_routing_array(len(self._routes) + capacity)()
        self._size = len(self._routes) + capacity
        for i, route in enumerate(self._routes):
            _encode_entry(self._encoded.entries[i], route)

    def __len__(self) -> int:
        return len(self._routes)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]  # Sequence's int/slice overloads
        return self._routes[index]

    @property
    def msi_count(self) -> int:
        return len(self._where)

    def encoded(self) -> ctypes.Structure:
        self._encoded.nr = len(self._routes)
        return self._encoded

    def get(self, gsi: int) -> MsiRoute | None:
        at = self._where.get(gsi)
        return None if at is None else self._msi_at(at)

    def _msi_at(self, at: int) -> MsiRoute:
        route = self._routes[at]
        assert isinstance(route, MsiRoute)
        return route

    def put(self, route: MsiRoute) -> MsiRoute | None:
        """Install or replace the route of `route.gsi`; returns the route it replaced (ValueError: no room
        or a field out of range, nothing changed)."""
        at = self._where.get(route.gsi)
        if at is None:
            at = len(self._routes)
            if at >= self._size:
                raise ValueError(f"routing table full ({self._size} entries)")
            _encode_entry(self._encoded.entries[at], route)
            self._where[route.gsi] = at
            self._routes.append(route)
            return None
        old = self._msi_at(at)
        _encode_entry(self._encoded.entries[at], route)
        self._routes[at] = route
        return old

    def remove(self, gsi: int) -> MsiRoute | None:
        at = self._where.pop(gsi, None)
        if at is None:
            return None
        old = self._msi_at(at)
        last = self._routes.pop()
        if at < len(self._routes):
            self._routes[at] = last
            self._where[last.gsi] = at
            ctypes.memmove(ctypes.addressof(self._encoded.entries[at]),
                           ctypes.addressof(self._encoded.entries[len(self._routes)]),
                           ctypes.sizeof(self._encoded.entries[at]))
        return old

    def apply(self, gsi: int, route: MsiRoute | None) -> MsiRoute | None:
        return self.remove(gsi) if route is None else self.put(route)
