"""The pci.ids parser: vendors, devices, classes and subclasses from the database's text format."""

from __future__ import annotations

import pytest

from pyvmm.host.pciids import PciIds, find_database, load_pci_ids, parse_pci_ids

SAMPLE = """\
# comment
#\tdevice  device_name

1b36  Red Hat, Inc.
\t0007  PCI SD Card Host Controller Interface
\t0010  QEMU NVM Express Controller
\t\t1af4 1100  QEMU Virtual Machine
8086  Intel Corporation
\t293e  82801I (ICH9 Family) HD Audio Controller
\t\t1af4 1100  QEMU Virtual Machine

# List of known device classes
C 03  Display controller
\t00  VGA compatible controller
\t\t00  VGA controller
C 08  Generic system peripheral
\t05  SD Host controller
C 06  Bridge
\t00  Host bridge
\t04  PCI bridge
\t\t00  Normal decode
"""


def test_vendor_and_device_names() -> None:
    db = parse_pci_ids(SAMPLE.splitlines(keepends=True))
    assert db.vendor_name(0x1B36) == "Red Hat, Inc."
    assert db.device_name(0x1B36, 0x0010) == "QEMU NVM Express Controller"
    assert db.device_name(0x8086, 0x293E) == "82801I (ICH9 Family) HD Audio Controller"


def test_subsystem_lines_do_not_become_devices() -> None:
    db = parse_pci_ids(SAMPLE.splitlines())
    assert set(db.devices) == {(0x1B36, 0x0007), (0x1B36, 0x0010), (0x8086, 0x293E)}


def test_class_names_prefer_the_subclass() -> None:
    db = parse_pci_ids(SAMPLE.splitlines())
    assert db.class_name(0x080501) == "SD Host controller"
    assert db.class_name(0x060400) == "PCI bridge"
    assert db.class_name(0x03FF00) == "Display controller"  # unknown subclass: the class name
    assert db.prog_ifs[(0x06, 0x04, 0x00)] == "Normal decode"


def test_unknown_ids_are_none() -> None:
    db = parse_pci_ids(SAMPLE.splitlines())
    assert db.vendor_name(0x1234) is None
    assert db.device_name(0x1B36, 0xFFFF) is None
    assert db.class_name(0xFF0000) is None
    assert PciIds().vendor_name(0x8086) is None


def test_class_section_does_not_leak_into_vendors() -> None:
    db = parse_pci_ids(SAMPLE.splitlines())
    assert 0x03 not in db.vendors and 0x08 not in db.vendors


def test_malformed_lines_cost_only_themselves() -> None:
    db = parse_pci_ids(
        ["zzzz  Not hex\n", "1af4  Red Hat, Inc.\n", "\tqqqq  broken\n", "\t1009  Virtio filesystem\n"]
    )
    assert db.device_name(0x1AF4, 0x1009) == "Virtio filesystem"


@pytest.mark.skipif(find_database() is None, reason="Debian's pci.ids/hwdata not installed")
def test_installed_database_names_the_lab_devices() -> None:
    db = load_pci_ids()
    assert db.vendor_name(0x8086) == "Intel Corporation"
    assert db.class_name(0x010802) == "Non-Volatile memory controller"
    assert db.device_name(0x1AF4, 0x1009) == "Virtio filesystem"
