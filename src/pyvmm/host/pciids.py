"""The pci.ids database (Debian's `pci.ids` / `hwdata` packages): vendor, device and class names."""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Where Debian's pci.ids (/usr/share/misc) and hwdata (/usr/share/hwdata) packages put the database.
SEARCH_PATHS = (
    Path("/usr/share/misc/pci.ids"),
    Path("/usr/share/hwdata/pci.ids"),
    Path("/usr/share/misc/pci.ids.gz"),
)


@dataclass
class PciIds:
    """Names by id; every lookup returns None when the database does not know the id."""

    vendors: dict[int, str] = field(default_factory=dict)
    devices: dict[tuple[int, int], str] = field(default_factory=dict)
    classes: dict[int, str] = field(default_factory=dict)
    subclasses: dict[tuple[int, int], str] = field(default_factory=dict)
    prog_ifs: dict[tuple[int, int, int], str] = field(default_factory=dict)

    def vendor_name(self, vendor: int) -> str | None:
        return self.vendors.get(vendor)

    def device_name(self, vendor: int, device: int) -> str | None:
        return self.devices.get((vendor, device))

    def class_name(self, class_code: int) -> str | None:
        """The most specific of subclass / class names for a 24-bit class code (as lspci shows it)."""
        base, sub = class_code >> 16 & 0xFF, class_code >> 8 & 0xFF
        return self.subclasses.get((base, sub)) or self.classes.get(base)


def parse_pci_ids(lines: Iterable[str]) -> PciIds:
    """Parse the text format: vendors at column 0, devices one tab in, subsystems two tabs in;
    a `C xx` line starts the class section, with subclasses one tab and programming interfaces two tabs in."""
    db = PciIds()
    vendor: int | None = None
    klass: int | None = None
    subclass: int | None = None
    in_classes = False
    for raw in lines:
        line = raw.rstrip("\n")
        if not line or line[0] == "#":
            continue
        try:
            if line[0] == "C" and line[1:2] == " ":
                in_classes = True
                klass, subclass = int(line[2:4], 16), None
                db.classes[klass] = line[4:].strip()
            elif line[0] != "\t":
                if line[0] in "0123456789abcdefABCDEF" and not in_classes:
                    vendor = int(line[:4], 16)
                    db.vendors[vendor] = line[4:].strip()
                else:
                    # Another section (e.g. "X" or "L" lists): nothing we name.
                    vendor = klass = subclass = None
            elif line[1] != "\t":
                if in_classes and klass is not None:
                    subclass = int(line[1:3], 16)
                    db.subclasses[(klass, subclass)] = line[3:].strip()
                elif vendor is not None:
                    db.devices[(vendor, int(line[1:5], 16))] = line[5:].strip()
            elif in_classes and klass is not None and subclass is not None:
                db.prog_ifs[(klass, subclass, int(line[2:4], 16))] = line[4:].strip()
            # Two-tab lines under a device are subsystems: not needed.
        except ValueError:
            continue  # a malformed line costs one name, not the listing
    return db


def find_database() -> Path | None:
    return next((p for p in SEARCH_PATHS if p.is_file()), None)


def load_pci_ids(path: Path | None = None) -> PciIds:
    """Load the installed database; an empty one (ids shown bare) when none is installed."""
    path = path or find_database()
    if path is None:
        return PciIds()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return parse_pci_ids(f)
