"""The VM-wide MSI routing table (pyvmm.interrupts): in-place updates, one KVM call per change or batch,
nothing recorded that KVM refused, the GSI cap, and irqfd vectors that contain every routing failure."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

import pytest

from pyvmm import layout
from pyvmm.interrupts import MAX_MSI_ROUTES, GsiExhausted, IrqfdMsiVectors, MsiRouter
from pyvmm.kvm.routing import MsiRoute, RouteTable, default_irqchip_routes, encode_routes
from pyvmm.pci.msi import MsiMessage, MsixCapability

IRQCHIP = len(default_irqchip_routes(layout.IOAPIC_NUM_PINS))


@dataclass
class FakeKvm:
    """KVM_SET_GSI_ROUTING and irqfds; refuses tables longer than `limit` entries, as KVM does past 4096."""

    limit: int = 4096
    tables: list[list] = field(default_factory=list)
    irqfds: dict[int, int] = field(default_factory=dict)  # gsi -> fd

    def set_gsi_routing(self, routes) -> None:
        if len(routes) > self.limit or any(r.gsi >= 4096 for r in routes):
            raise OSError(errno.EINVAL, "Invalid argument")
        self.tables.append(list(routes))

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        if deassign:
            assert self.irqfds.pop(gsi) == fd
        else:
            assert gsi not in self.irqfds and any(getattr(r, "gsi", -1) == gsi for r in self.tables[-1])
            self.irqfds[gsi] = fd

    def msi(self) -> dict[int, tuple[int, int]]:
        return {r.gsi: (r.address, r.data) for r in self.tables[-1] if isinstance(r, MsiRoute)}


def msg(data: int) -> MsiMessage:
    return MsiMessage(0xFEE0_0000, data)


def test_route_table_updates_in_place() -> None:
    table = RouteTable(default_irqchip_routes(), 4)
    for gsi in (24, 25, 26):
        assert table.put(MsiRoute(gsi, 0xFEE0_0000, gsi)) is None
    assert table.remove(24) == MsiRoute(24, 0xFEE0_0000, 24)
    assert list(table[:IRQCHIP]) == default_irqchip_routes()  # the irqchip routes never move
    assert sorted(r.gsi for r in table[IRQCHIP:]) == [25, 26] and table.msi_count == 2
    assert table.put(MsiRoute(26, 0xFEE0_0000, 7)) == MsiRoute(26, 0xFEE0_0000, 26)
    assert table.get(26) == MsiRoute(26, 0xFEE0_0000, 7) and table.get(24) is None
    assert table.remove(24) is None
    for gsi in (27, 28):
        table.put(MsiRoute(gsi, 0xFEE0_0000, 1))
    with pytest.raises(ValueError):
        table.put(MsiRoute(29, 0xFEE0_0000, 1))  # capacity 4


def test_route_table_stays_encoded_as_kvm_takes_it() -> None:
    """After any mix of changes the kept `struct kvm_irq_routing` is byte for byte a fresh encoding."""
    import ctypes
    import random

    rng = random.Random(19)
    table = RouteTable(default_irqchip_routes(), 64)
    for _ in range(2000):
        gsi = rng.randrange(24, 88)
        if rng.random() < 0.4:
            table.remove(gsi)
        else:
            table.put(MsiRoute(gsi, 0xFEE0_0000 | rng.randrange(256) << 12, rng.randrange(1 << 32)))
    kept, fresh = table.encoded(), encode_routes(list(table))
    size = ctypes.sizeof(fresh)
    assert kept.nr == fresh.nr == len(table)
    assert ctypes.string_at(ctypes.addressof(kept), size) == ctypes.string_at(ctypes.addressof(fresh), size)


def test_router_calls_kvm_once_per_change_and_never_for_the_same_route() -> None:
    kvm = FakeKvm()
    router = MsiRouter(kvm)
    gsi = router.allocate_gsi()
    router.set_route(gsi, msg(0x41))
    router.set_route(gsi, msg(0x41))  # rewritten unchanged: no call
    router.set_route(gsi + 1, None)  # removing what is not there: no call
    assert router.kvm_calls == len(kvm.tables) == 1
    assert kvm.tables[0][:IRQCHIP] == default_irqchip_routes() and kvm.msi() == {gsi: (0xFEE0_0000, 0x41)}
    router.set_routes({router.allocate_gsi(): msg(n) for n in range(10)} | {gsi: None})
    assert router.kvm_calls == 2


def test_a_refused_table_is_undone() -> None:
    kvm = FakeKvm(limit=IRQCHIP + 2)
    router = MsiRouter(kvm)
    a, b, c = (router.allocate_gsi() for _ in range(3))
    router.set_route(a, msg(1))
    router.set_route(b, msg(2))
    with pytest.raises(OSError):
        router.set_route(c, msg(3))  # one too many for this KVM
    assert [r for r in router.routes if isinstance(r, MsiRoute)] == [MsiRoute(a, 0xFEE0_0000, 1),
                                                                      MsiRoute(b, 0xFEE0_0000, 2)]
    with pytest.raises(OSError):
        router.set_routes({a: msg(9), c: msg(3)})  # a batch is all or nothing
    assert kvm.msi() == {a: (0xFEE0_0000, 1), b: (0xFEE0_0000, 2)}
    router.set_route(b, None)
    router.set_route(c, msg(3))  # room again
    assert kvm.msi() == {a: (0xFEE0_0000, 1), c: (0xFEE0_0000, 3)}


def test_gsi_pool_is_capped_below_kvms_limit() -> None:
    router = MsiRouter(FakeKvm())
    gsis = [router.allocate_gsi() for _ in range(MAX_MSI_ROUTES)]
    assert min(gsis) == layout.MSI_GSI_BASE and max(gsis) < 4096 and IRQCHIP + MAX_MSI_ROUTES < 4096
    with pytest.raises(GsiExhausted):
        router.allocate_gsi()
    router.release_gsi(gsis[5])
    assert router.allocate_gsi() == gsis[5]
    with pytest.raises(ValueError):
        MsiRouter(FakeKvm(), max_routes=MAX_MSI_ROUTES + 1)


def test_full_table_fits_kvm() -> None:
    kvm = FakeKvm()
    router = MsiRouter(kvm)
    router.set_routes({router.allocate_gsi(): msg(n & 0xFF) for n in range(MAX_MSI_ROUTES)})
    assert len(kvm.tables[-1]) == IRQCHIP + MAX_MSI_ROUTES


def test_exhausted_pool_leaves_vectors_masked_with_one_warning(caplog) -> None:
    kvm = FakeKvm()
    router = MsiRouter(kvm, max_routes=4)
    vectors = IrqfdMsiVectors(router, kvm, 8, "dev0")
    with caplog.at_level(logging.DEBUG, logger="pyvmm.interrupts"):
        for v in range(8):
            vectors.vector_changed(v, msg(0x30 + v))
    assert [vectors.routed(v) for v in range(8)] == [True] * 4 + [False] * 4
    assert sorted(d for _, d in kvm.msi().values()) == [0x30, 0x31, 0x32, 0x33]
    assert len(kvm.irqfds) == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dev0" in warnings[0].message and "stays masked" in warnings[0].message
    other = IrqfdMsiVectors(router, kvm, 1, "dev1")  # another device: its own warning
    caplog.clear()
    other.vector_changed(0, msg(0x50))
    assert not other.routed(0) and len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    vectors.close()
    other.vector_changed(0, msg(0x50))  # GSIs given back: it routes now
    assert other.routed(0) and kvm.msi() == {next(iter(kvm.irqfds)): (0xFEE0_0000, 0x50)}
    other.close()


def test_kvm_refusal_leaves_no_route_and_no_irqfd() -> None:
    kvm = FakeKvm(limit=IRQCHIP + 2)
    router = MsiRouter(kvm)
    vectors = IrqfdMsiVectors(router, kvm, 4)
    assert vectors.vectors_changed([(v, msg(v)) for v in range(4)]) == [0, 1]  # batch refused, then 1 by 1
    assert len(kvm.msi()) == 2 and len(kvm.irqfds) == 2
    assert len([r for r in router.routes if isinstance(r, MsiRoute)]) == 2
    vectors.vector_changed(0, None)
    vectors.vector_changed(2, msg(2))  # room again for vector 2
    assert vectors.routed(2) and not vectors.routed(0) and len(kvm.msi()) == 2
    vectors.close()
    assert kvm.irqfds == {} and kvm.msi() == {}


def test_msix_enable_costs_one_routing_call() -> None:
    """A guest that fills its table while MSI-X is off and then enables it: one KVM_SET_GSI_ROUTING."""
    kvm = FakeKvm()
    router = MsiRouter(kvm)
    vectors = IrqfdMsiVectors(router, kvm, 256)
    msix = MsixCapability(vectors, 256)
    for v in range(256):
        msix.table_write(16 * v, 8, 0xFEE0_0000)
        msix.table_write(16 * v + 8, 8, 0x30 + (v & 0x7F))  # data, unmasked
    assert router.kvm_calls == 0
    msix.write(3, 1, 0x80)
    assert router.kvm_calls == 1 and len(kvm.msi()) == 256 and len(kvm.irqfds) == 256
    msix.write(3, 1, 0xC0)  # function mask: every irqfd off, routes out in one call
    assert router.kvm_calls == 2 and kvm.irqfds == {} and kvm.msi() == {}
    vectors.close()
