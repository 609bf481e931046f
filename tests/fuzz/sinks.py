"""Recording stand-ins for what device models drive: MSI vector sinks and interrupt lines.

They check their own invariants as calls arrive (so a violation fails at the guest access that caused it)
and keep the current state for the state machines' invariants.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pyvmm import layout
from pyvmm.pci.msi import MsiMessage


def in_msi_window(address: int) -> bool:
    return layout.MSI_WINDOW_START <= address < layout.MSI_WINDOW_START + layout.MSI_WINDOW_SIZE


@dataclass
class RecordingSink:
    """An MsiVectorSink that records every call and refuses routes outside the MSI window."""

    name: str = "sink"
    routes: dict[int, MsiMessage] = field(default_factory=dict)
    enabled: bool = False
    count: int = 0
    signals: list[tuple[int, MsiMessage]] = field(default_factory=list)
    calls: int = 0

    def vector_changed(self, vector: int, message: MsiMessage | None) -> None:
        self.calls += 1
        assert isinstance(vector, int) and vector >= 0, f"{self.name}: bad vector {vector!r}"
        if message is None:
            self.routes.pop(vector, None)
            return
        assert in_msi_window(message.address), (
            f"{self.name}: vector {vector} routed to {message.address:#x}, outside the MSI window"
        )
        assert 0 <= message.data <= 0xFFFF_FFFF, f"{self.name}: data {message.data:#x} is not 32-bit"
        self.routes[vector] = message

    def enable_changed(self, enabled: bool, count: int) -> None:
        self.calls += 1
        assert count >= 0 and (enabled or count == 0), f"{self.name}: enable_changed({enabled}, {count})"
        self.enabled, self.count = enabled, count

    def signal(self, vector: int, message: MsiMessage) -> None:
        self.calls += 1
        assert in_msi_window(message.address), (
            f"{self.name}: pending vector {vector} released to {message.address:#x}, outside the MSI window"
        )
        assert self.routes.get(vector) == message, f"{self.name}: signal of vector {vector} without its route"
        self.signals.append((vector, message))


class RecordingLine:
    """An InterruptLine that records its level and how often it changed."""

    def __init__(self) -> None:
        self.level = False
        self.edges = 0
        self._lock = threading.Lock()

    def set_level(self, asserted: bool) -> None:
        with self._lock:
            assert isinstance(asserted, bool), f"set_level({asserted!r})"
            if asserted != self.level:
                self.edges += 1
            self.level = asserted
