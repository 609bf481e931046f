"""PCI addresses: the DEVICE spellings users type, normalised to one `Bdf` value."""

from __future__ import annotations

import re

from pyvmm.pci_sysfs import Bdf

from .errors import HostUsageError

__all__ = ["Bdf", "parse_bdf"]

# Domains are 4 hex digits normally, 5 behind Intel VMD; buses 2, devices 2 (< 32), functions 1 (< 8).
_BDF = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)


def parse_bdf(text: str) -> Bdf:
    """Parse `01:00.0`, `0000:01:00.0` or a sysfs path ending in one (trailing `/` allowed)."""
    spelled = text.strip()
    # A sysfs path names the device by its last component; strip a trailing slash first.
    name = spelled.rstrip("/").rsplit("/", 1)[-1] if "/" in spelled else spelled
    match = _BDF.match(name)
    if match is None:
        raise HostUsageError(
            f"{text!r} is not a PCI device: write it as 01:00.0, 0000:01:00.0 or "
            "/sys/bus/pci/devices/0000:01:00.0/"
        )
    device = int(match["dev"], 16)
    if device > 0x1F:
        raise HostUsageError(f"{text!r}: PCI device number {device:#x} is above 0x1f")
    return Bdf(int(match["domain"] or "0", 16), int(match["bus"], 16), device, int(match["fn"]))
