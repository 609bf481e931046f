"""Fuzz target: MSI-X programming all the way to the KVM GSI routing table and irqfds (pyvmm.interrupts).

The MsixMachine's guest actions drive a real IrqfdMsiVectors / MsiRouter pair whose Vm is a stand-in that
encodes every table with the real `kvm.routing.encode_routes` and tracks irqfd assignment. Invariants: the
table always starts with the default irqchip routes, every MSI route in it targets the MSI window, a GSI has
an irqfd exactly when it has a route, and each vector's route is the one the recording sink holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant

from fuzz.msi import MsixMachine
from fuzz.sinks import RecordingSink, in_msi_window
from pyvmm import layout
from pyvmm.interrupts import IrqfdMsiVectors, MsiRouter
from pyvmm.kvm.routing import MsiRoute, Route, default_irqchip_routes, encode_routes
from pyvmm.pci.msi import MsiMessage, MsixCapability


class FakeVm:
    """The two Vm calls MSI delivery makes, checked instead of issued."""

    def __init__(self) -> None:
        self.table: list[Route] = list(default_irqchip_routes(layout.IOAPIC_NUM_PINS))
        self.irqfds: dict[int, int] = {}  # gsi -> eventfd

    def set_gsi_routing(self, routes: Sequence[Route]) -> None:
        encode_routes(routes)  # the real ctypes encoding must accept whatever the guest programmed
        self.table = list(routes)

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        if deassign:
            assert self.irqfds.pop(gsi, None) == fd, f"deassigning irqfd of GSI {gsi} that is not assigned"
        else:
            assert gsi not in self.irqfds, f"GSI {gsi} gets a second irqfd"
            self.irqfds[gsi] = fd


class TeeSink:
    """Passes every call to the recording sink (checks) and to the real IrqfdMsiVectors."""

    def __init__(self, *sinks: object) -> None:
        self.sinks = sinks

    def vector_changed(self, vector: int, message: MsiMessage | None) -> None:
        for s in self.sinks:
            s.vector_changed(vector, message)  # type: ignore[attr-defined]

    def enable_changed(self, enabled: bool, count: int) -> None:
        for s in self.sinks:
            s.enable_changed(enabled, count)  # type: ignore[attr-defined]

    def signal(self, vector: int, message: MsiMessage) -> None:
        for s in self.sinks:
            s.signal(vector, message)  # type: ignore[attr-defined]


class KvmMsixMachine(MsixMachine):
    @initialize(table_size=st.integers(1, 40), bir=st.integers(0, 5))
    def build(self, table_size: int, bir: int) -> None:
        self.vm = FakeVm()
        self.vectors = IrqfdMsiVectors(MsiRouter(self.vm), self.vm, table_size)  # type: ignore[arg-type]
        self.sink = RecordingSink("msix")
        self.cap = MsixCapability(TeeSink(self.sink, self.vectors), table_size, bir, 0x2000, bir, 0x3000)
        self._model_init(table_size)

    @invariant()
    def kvm_table_matches(self) -> None:
        if self.cap is None:
            return
        table = self.vm.table
        default = default_irqchip_routes(layout.IOAPIC_NUM_PINS)
        assert table[: len(default)] == default, "the default irqchip routes were lost"
        msi = {r.gsi: r for r in table[len(default) :] if isinstance(r, MsiRoute)}
        assert len(msi) == len(table) - len(default)
        for route in msi.values():
            assert in_msi_window(route.address), f"GSI {route.gsi} routed to {route.address:#x}"
            assert layout.MSI_GSI_BASE <= route.gsi < layout.MSI_GSI_END
        assert set(self.vm.irqfds) == set(msi), "irqfds and MSI routes disagree"
        for vector, message in self.sink.routes.items():
            gsi = self.vectors._gsi[vector]
            assert gsi is not None and msi[gsi] == MsiRoute(gsi, message.address, message.data)
        assert len(msi) == len(self.sink.routes)

    def teardown(self) -> None:
        if self.cap is not None:
            self.vectors.close()
            assert not self.vm.irqfds and len(self.vm.table) == len(default_irqchip_routes(24))


__all__ = ["KvmMsixMachine"]
