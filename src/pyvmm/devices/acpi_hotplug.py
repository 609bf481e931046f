"""The two MMIO devices of ACPI PCI hot-plug: the Generic Event Device (GED) and the PCI hot-plug registers.

The guest learns of a change through the GED: its interrupt runs the DSDT's `_EVT`, which reads the event
register (read-to-clear) and, for a PCI change, has every segment's `PCNT` read that segment's PCIU and PCID
bitmaps (read-to-clear) and notify the slots. The guest ejects a slot by writing its bit to B0EJ. Register
semantics are cloud-hypervisor's (docs/hotplug.md#registers); the AML is in pyvmm.acpi.dsdt.

Both are called on vCPU threads (guest accesses) and on the thread that asks for a change (the API), so
their state is kept under a lock; the eject callback runs outside it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from enum import IntEnum, IntFlag

from pyvmm.devices.bus import InterruptLine

log = logging.getLogger(__name__)

SLOTS_PER_SEGMENT = 32


class AcpiNotification(IntFlag):
    """Bits of the GED's event register: what changed (the DSDT's ESCN tests them)."""

    CPU_DEVICES_CHANGED = 1
    MEMORY_DEVICES_CHANGED = 2
    PCI_DEVICES_CHANGED = 4
    POWER_BUTTON_CHANGED = 8


class AcpiGed:
    """The Generic Event Device's one-byte event register: a read returns the pending events and clears
    them; writes are ignored. `notify` adds events and pulses the (edge-triggered) interrupt line."""

    def __init__(self, irq: InterruptLine) -> None:
        self._irq = irq
        self._lock = threading.Lock()
        self._pending = AcpiNotification(0)

    def notify(self, events: AcpiNotification) -> None:
        with self._lock:
            self._pending |= events
        self._irq.set_level(True)
        self._irq.set_level(False)

    @property
    def pending(self) -> AcpiNotification:
        return self._pending

    def read(self, offset: int, size: int) -> int:
        if offset != 0 or size != 1:
            log.debug("GED read %#x+%d ignored", offset, size)
            return 0
        with self._lock:
            value, self._pending = self._pending, AcpiNotification(0)
        return int(value)

    def write(self, offset: int, size: int, value: int) -> None:
        log.debug("GED write %#x+%d ignored", offset, size)


class PciHotplugRegister(IntEnum):
    """Offsets in the 16-byte PCI hot-plug register block (each a 32-bit little-endian register)."""

    PCIU = 0x0  # slots added on the selected segment (read-to-clear)
    PCID = 0x4  # slots the guest is asked to eject (read-to-clear)
    B0EJ = 0x8  # write: eject the slots whose bits are set (reads 0)
    PSEG = 0xC  # the selected segment


EjectCallback = Callable[[int, int], None]


class PciHotplugController:
    """PCIU/PCID/B0EJ/PSEG for `num_segments` segments. Only 4-byte accesses are served (others read 0,
    writes are dropped). A B0EJ write calls `on_eject(segment, slot)` for each set bit, lowest first, on the
    writing vCPU's thread; a failure there is logged, never reported to the guest."""

    def __init__(self, num_segments: int, on_eject: EjectCallback) -> None:
        if num_segments < 1:
            raise ValueError("the PCI hot-plug registers need at least one segment")
        self._on_eject = on_eject
        self._lock = threading.Lock()
        self._up = [0] * num_segments
        self._down = [0] * num_segments
        self._selected = 0

    @property
    def num_segments(self) -> int:
        return len(self._up)

    def _check(self, segment: int, slot: int) -> None:
        if not 0 <= segment < len(self._up) or not 0 <= slot < SLOTS_PER_SEGMENT:
            raise ValueError(f"no hot-plug slot {segment}:{slot}")

    def device_added(self, segment: int, slot: int) -> None:
        """Tell the guest (at its next PCNT) that `slot` of `segment` has a new device."""
        self._check(segment, slot)
        with self._lock:
            self._up[segment] |= 1 << slot

    def eject_requested(self, segment: int, slot: int) -> None:
        """Ask the guest (at its next PCNT) to eject `slot` of `segment`."""
        self._check(segment, slot)
        with self._lock:
            self._down[segment] |= 1 << slot

    def read(self, offset: int, size: int) -> int:
        if size != 4:
            log.debug("PCI hot-plug register read %#x+%d ignored", offset, size)
            return 0
        with self._lock:
            seg = self._selected
            if offset == PciHotplugRegister.PCIU:
                value, self._up[seg] = self._up[seg], 0
                return value
            if offset == PciHotplugRegister.PCID:
                value, self._down[seg] = self._down[seg], 0
                return value
            if offset == PciHotplugRegister.PSEG:
                return seg
        return 0  # B0EJ and anything else

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            log.debug("PCI hot-plug register write %#x+%d ignored", offset, size)
            return
        if offset == PciHotplugRegister.PSEG:
            with self._lock:
                if value < len(self._up):
                    self._selected = value
                    return
            log.debug("guest selected PCI segment %d for hot-plug: there are %d", value, len(self._up))
        elif offset == PciHotplugRegister.B0EJ:
            with self._lock:
                segment = self._selected
            bits = value & ((1 << SLOTS_PER_SEGMENT) - 1)
            while bits:
                slot = (bits & -bits).bit_length() - 1
                bits &= bits - 1
                try:
                    self._on_eject(segment, slot)
                except Exception:
                    log.exception("ejecting slot %d of PCI segment %d failed", slot, segment)
        else:
            log.debug("PCI hot-plug register write %#x ignored", offset)
