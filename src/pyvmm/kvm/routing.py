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


def encode_routes(routes: Sequence[Route]) -> ctypes.Structure:
    """A `struct kvm_irq_routing` holding `routes`; raises ValueError on out-of-range fields."""
    table = kvm_irq_routing_array(len(routes))()
    table.nr = len(routes)
    for entry, route in zip(table.entries, routes, strict=True):
        if not 0 <= route.gsi <= _U32:
            raise ValueError(f"GSI {route.gsi} out of range")
        entry.gsi = route.gsi
        if isinstance(route, IrqchipRoute):
            if not 0 <= route.pin <= _U32:
                raise ValueError(f"irqchip pin {route.pin} out of range for GSI {route.gsi}")
            entry.type = KvmIrqRouting.KVM_IRQ_ROUTING_IRQCHIP
            entry.u.irqchip.irqchip = route.irqchip
            entry.u.irqchip.pin = route.pin
        elif isinstance(route, MsiRoute):
            if not 0 <= route.address < 1 << 64 or not 0 <= route.data <= _U32:
                raise ValueError(f"MSI address {route.address:#x} / data {route.data:#x} out of range")
            entry.type = KvmIrqRouting.KVM_IRQ_ROUTING_MSI
            entry.u.msi.address_lo = route.address & _U32
            entry.u.msi.address_hi = route.address >> 32
            entry.u.msi.data = route.data
            if route.devid is not None:
                entry.flags = KVM_MSI_VALID_DEVID
                entry.u.msi.devid = route.devid
        else:
            raise TypeError(f"not a GSI route: {route!r}")
    return table
