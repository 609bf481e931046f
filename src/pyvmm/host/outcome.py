"""What a bind or a give-back did, device by device, and the steps it took."""

from __future__ import annotations

from dataclasses import dataclass

from .actions import Step
from .bdf import Bdf


@dataclass(frozen=True)
class DeviceOutcome:
    bdf: Bdf
    driver_before: str | None
    driver_after: str | None
    changed: bool
    note: str  # one phrase: "bound to vfio-pci (was sdhci-pci)", "already bound to vfio-pci", ...
    vfio_group: str | None = None  # /dev/vfio/<group> once on vfio-pci


@dataclass(frozen=True)
class Outcome:
    devices: tuple[DeviceOutcome, ...]
    steps: tuple[Step, ...]
    warnings: tuple[str, ...] = ()
    dry_run: bool = False

    @property
    def changed(self) -> list[Bdf]:
        return [d.bdf for d in self.devices if d.changed]
