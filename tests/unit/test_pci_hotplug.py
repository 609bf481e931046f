"""ACPI PCI hot-plug without a guest: the GED and hot-plug register semantics, their addresses, the DSDT
objects (bytes written out by hand, and executed by ACPICA's acpiexec where it is installed), and PciHotplug's
bookkeeping of ids, PCID/PCIU bits and ejects with a fake VFIO side. The guest's acpiphp using all of it is
tests/lab/test_hotplug.py."""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_acpi_dsdt import ACPIEXEC, SEGMENTS, buffer, evaluate, integers

from pyvmm import hotplug as hotplug_module
from pyvmm import layout, pci_sysfs
from pyvmm.acpi.platform import AcpiPciHotplug, AcpiPlatform, AcpiPlatformError
from pyvmm.acpi.tables import dsdt
from pyvmm.devices.acpi_hotplug import (
    AcpiGed,
    AcpiNotification,
    PciHotplugController,
    PciHotplugRegister,
)
from pyvmm.errors import UsageError
from pyvmm.hotplug import HotplugError, PciHotplug
from pyvmm.pci.bar import BarKind
from pyvmm.pci.platform import PciAddress

PCIU, PCID, B0EJ, PSEG = (int(r) for r in PciHotplugRegister)
PHYS_BITS = 46
HOTPLUG = AcpiPciHotplug(layout.pci_hotplug_base(PHYS_BITS), layout.ged_base(PHYS_BITS))


class Line:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, asserted: bool) -> None:
        self.levels.append(asserted)


# ---- the GED's event register ------------------------------------------------------------------------


def test_ged_reads_and_clears_the_pending_events_and_pulses_its_edge_line() -> None:
    line = Line()
    ged = AcpiGed(line)
    assert ged.read(0, 1) == 0
    ged.notify(AcpiNotification.PCI_DEVICES_CHANGED)
    ged.notify(AcpiNotification.POWER_BUTTON_CHANGED)
    assert line.levels == [True, False, True, False]  # one rising edge per notification
    assert ged.read(0, 2) == 0 and ged.read(1, 1) == 0  # one byte at offset 0 only; nothing consumed
    assert ged.read(0, 1) == 0b1100
    assert ged.read(0, 1) == 0  # read-to-clear
    ged.notify(AcpiNotification.PCI_DEVICES_CHANGED)
    ged.write(0, 1, 0xFF)  # writes are ignored
    assert ged.read(0, 1) == AcpiNotification.PCI_DEVICES_CHANGED


# ---- PCIU / PCID / B0EJ / PSEG ---------------------------------------------------------------------------


def test_pciu_and_pcid_are_per_segment_and_read_to_clear() -> None:
    regs = PciHotplugController(2, lambda seg, slot: None)
    regs.device_added(0, 3)
    regs.device_added(0, 5)
    regs.device_added(1, 0)
    regs.eject_requested(1, 31)
    assert regs.read(PSEG, 4) == 0
    assert regs.read(PCIU, 4) == (1 << 3) | (1 << 5)
    assert regs.read(PCIU, 4) == 0
    assert regs.read(PCID, 4) == 0
    regs.write(PSEG, 4, 1)
    assert regs.read(PSEG, 4) == 1
    assert regs.read(PCIU, 4) == 1
    assert regs.read(PCID, 4) == 1 << 31
    assert regs.read(PCID, 4) == 0
    regs.write(PSEG, 4, 2)  # no such segment: ignored
    assert regs.read(PSEG, 4) == 1
    with pytest.raises(ValueError):
        regs.device_added(2, 0)
    with pytest.raises(ValueError):
        regs.eject_requested(0, 32)


def test_only_dword_accesses_are_served() -> None:
    ejected: list[tuple[int, int]] = []
    regs = PciHotplugController(2, lambda seg, slot: ejected.append((seg, slot)))
    regs.device_added(0, 4)
    assert regs.read(PCIU, 2) == 0 and regs.read(PCIU, 1) == 0
    regs.write(PSEG, 2, 1)
    regs.write(B0EJ, 1, 0xFF)
    assert regs.read(PSEG, 4) == 0 and ejected == []
    assert regs.read(PCIU, 4) == 1 << 4  # the narrow reads did not clear it


def test_b0ej_ejects_each_slot_lowest_first_on_the_selected_segment(caplog: pytest.LogCaptureFixture) -> None:
    ejected: list[tuple[int, int]] = []

    def eject(seg: int, slot: int) -> None:
        ejected.append((seg, slot))
        if slot == 2:
            raise OSError("the device would not close")

    regs = PciHotplugController(3, eject)
    regs.write(PSEG, 4, 2)
    with caplog.at_level(logging.ERROR):
        regs.write(B0EJ, 4, (1 << 31) | (1 << 7) | (1 << 2))
    assert ejected == [(2, 2), (2, 7), (2, 31)]  # a failure is logged and the others still go
    assert "ejecting slot 2 of PCI segment 2 failed" in caplog.text
    assert regs.read(B0EJ, 4) == 0


# ---- addresses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phys_bits", [36, 40, 46, 52])
def test_registers_live_in_the_platform_area_above_the_64_bit_bars(phys_bits: int) -> None:
    start, end = layout.platform_area(phys_bits)
    assert end == (1 << phys_bits) - 64 * 1024 and end - start == 1 << 20
    regs, ged = layout.pci_hotplug_base(phys_bits), layout.ged_base(phys_bits)
    assert regs % 4096 == 0 and ged % 4096 == 0
    assert start <= ged < ged + layout.GED_SIZE <= regs < regs + layout.PCI_HOTPLUG_SIZE <= end
    assert layout.mmio64_area(512 << 20, phys_bits)[1] < start
    assert layout.GED_IRQ not in layout.PCI_INTX_IRQS and layout.GED_IRQ != layout.SERIAL_COM1_IRQ


def test_the_ged_irq_may_not_be_a_pci_intx_irq() -> None:
    with pytest.raises(AcpiPlatformError, match="GED IRQ 5"):
        AcpiPlatform(num_vcpus=1, segments=SEGMENTS, pci_hotplug=AcpiPciHotplug(0x1000, 0x2000, ged_irq=5))


# ---- the DSDT's objects, byte by byte --------------------------------------------------------------------


def _table(hotplug: AcpiPciHotplug | None = HOTPLUG) -> bytes:
    return dsdt(AcpiPlatform(num_vcpus=1, segments=SEGMENTS, pci_hotplug=hotplug))


def test_each_segment_has_32_slots_with_number_address_and_eject() -> None:
    table = _table()
    # _EJ0: Method, PkgLength 29, 1 argument + Serialized, \_SB_.PHPR.PCEJ(_SUN, _SEG)
    ej0 = b"\x14\x1d_EJ0\x09\x5c\x2f\x03_SB_PHPRPCEJ_SUN_SEG"
    slot5 = b"\x5b\x82\x34S005\x08_SUN\x0a\x05\x08_ADR\x0c\x00\x00\x05\x00" + ej0
    assert table.count(slot5) == 2  # one per segment
    for slot in range(32):  # per segment: the device, and DVNT's Notify of it
        assert table.count(f"S{slot:03d}".encode()) == 4
    assert b"S032" not in table
    assert table.count(ej0) == 64


def test_hotplug_registers_and_event_register_are_described_where_they_are() -> None:
    table = _table()
    regs, ged = struct.pack("<Q", HOTPLUG.registers), struct.pack("<Q", HOTPLUG.ged)
    # OperationRegion(PCST, SystemMemory, regs, 0x10) and its dword fields, written as zeros
    assert b"\x5b\x80PCST\x00\x0e" + regs + b"\x0a\x10" in table
    assert b"\x5b\x81\x1aPCST\x43PCIU\x20PCID\x20B0EJ\x20PSEG\x20" in table
    # OperationRegion(GDST, SystemMemory, ged, 1) and its byte field
    assert b"\x5b\x80GDST\x00\x0e" + ged + b"\x01" in table
    assert b"\x5b\x81\x0bGDST\x41GDAT\x08" in table
    # GED_: _HID "ACPI0013", an edge-triggered active-high exclusive consumer interrupt on GED_IRQ
    assert b"\x08_HID\x0dACPI0013\x00" in table
    assert b"\x89\x06\x00\x03\x01" + struct.pack("<I", layout.GED_IRQ) in table


def test_without_hotplug_the_dsdt_has_none_of_it() -> None:
    table = _table(None)
    for name in (b"PHPR", b"GED_", b"GEC_", b"S005", b"PCNT", b"DVNT", b"_EJ0"):
        assert name not in table


needs_acpiexec = pytest.mark.skipif(ACPIEXEC is None, reason="acpiexec (acpica-tools) is not installed")


@needs_acpiexec
def test_acpica_runs_the_eject_and_notify_methods(tmp_path: Path) -> None:
    """ACPICA keeps a SystemMemory region's bytes in memory: what the methods write is read back."""
    exprs = [
        "\\_SB.PC01.S007._ADR", "\\_SB.PC01.S007._SUN",
        "\\_SB.PC01.S007._EJ0 1", "\\_SB.PHPR.PSEG", "\\_SB.PHPR.B0EJ",  # eject slot 7 of segment 1
        "\\_SB.PHPR.PCEJ 0x1F 0", "\\_SB.PHPR.PSEG", "\\_SB.PHPR.B0EJ",
        "\\_SB.PC01.PCNT", "\\_SB.PHPR.PSEG",  # PCNT selects its own segment
        "\\_SB.GED._EVT 13",  # reads GDAT; the simulated region holds 0: nothing to scan
        "\\_SB.GED._HID", "\\_SB.GED._CRS", "\\_SB.PHPR._HID", "\\_SB.PHPR._STA", "\\_SB.PHPR._CRS",
        "\\_SB.GEC._CRS", "\\_SB.PWRB._HID",
    ]
    blocks = evaluate(_table(), exprs, tmp_path)
    out = dict(zip(exprs, blocks, strict=True))  # for the expressions evaluated once
    assert integers(blocks[0]) == [7 << 16] and integers(blocks[1]) == [7]
    assert integers(blocks[3]) == [1] and integers(blocks[4]) == [1 << 7]
    assert integers(blocks[6]) == [0] and integers(blocks[7]) == [1 << 31]
    assert integers(blocks[9]) == [1]
    assert "ACPI0013" in out["\\_SB.GED._HID"]
    assert buffer(out["\\_SB.GED._CRS"]).startswith(b"\x89\x06\x00\x03\x01" + struct.pack("<I", 13))
    assert integers(out["\\_SB.PHPR._HID"]) == [0x060AD041] and integers(out["\\_SB.PHPR._STA"]) == [0x0B]
    phpr = buffer(out["\\_SB.PHPR._CRS"])
    assert struct.unpack_from("<QQ", phpr, 14) == (HOTPLUG.registers, HOTPLUG.registers + 0xF)
    gec = buffer(out["\\_SB.GEC._CRS"])
    assert struct.unpack_from("<QQ", gec, 14) == (HOTPLUG.ged, HOTPLUG.ged)
    assert integers(out["\\_SB.PWRB._HID"]) == [0x0C0CD041]  # PNP0C0C, the power button ESCN notifies


# ---- PciHotplug with a fake VFIO side ----------------------------------------------------------------------


@dataclass
class FakeModel:
    device: Any


class FakeVfio:
    def __init__(self, plugged: list[tuple[str, PciAddress]]) -> None:
        self._plugged = [(FakeModel(SimpleNamespace(name=n)), a) for n, a in plugged]
        self.released: list[str] = []

    def plugged(self) -> list[tuple[FakeModel, PciAddress]]:
        return list(self._plugged)

    def release(self, name: str) -> None:
        self.released.append(name)


def _hotplug(vfio: FakeVfio) -> tuple[PciHotplug, Line]:
    line = Line()
    platform = SimpleNamespace(segments=[object(), object()], memory_slots=None)
    fake: Any = None
    hotplug = PciHotplug(platform=platform, ged=AcpiGed(line), memory=fake, router=fake, irqfds=fake,
                         registry=lambda: fake)
    configs = [SimpleNamespace(id="gpu"), SimpleNamespace(id=None)]
    hotplug.adopt(vfio, configs)  # type: ignore[arg-type]
    return hotplug, line


def test_boot_devices_are_removable_by_id_and_get_vfio_ids_when_they_have_none() -> None:
    vfio = FakeVfio([("0000:01:00.0", PciAddress(0, 3)), ("0000:02:00.0", PciAddress(1, 0))])
    hotplug, _line = _hotplug(vfio)
    assert hotplug.devices() == {"gpu": PciAddress(0, 3), "_vfio0": PciAddress(1, 0)}


def test_remove_asks_the_guest_and_the_eject_releases() -> None:
    vfio = FakeVfio([("0000:01:00.0", PciAddress(0, 3)), ("0000:02:00.0", PciAddress(1, 0))])
    hotplug, line = _hotplug(vfio)
    removed: list[tuple[str, PciAddress]] = []
    hotplug.on_removed = lambda ident, address: removed.append((ident, address))
    with pytest.raises(HotplugError, match=r"no device with id nic0 \(removable devices: _vfio0, gpu\)"):
        hotplug.remove_device("nic0")
    assert line.levels == []
    assert hotplug.remove_device("_vfio0") == PciAddress(1, 0)
    assert line.levels == [True, False]
    regs = hotplug.registers
    assert regs.read(PCID, 4) == 0  # segment 0: nothing
    regs.write(PSEG, 4, 1)
    assert regs.read(PCID, 4) == 1  # slot 0 of segment 1: eject request
    assert vfio.released == [] and "_vfio0" in hotplug.devices()  # still there until the guest ejects
    regs.write(B0EJ, 4, 1 << 5)  # nothing in slot 5 of segment 1: ignored
    assert vfio.released == []
    regs.write(B0EJ, 4, 1)
    assert vfio.released == ["0000:02:00.0"] and removed == [("_vfio0", PciAddress(1, 0))]
    assert hotplug.devices() == {"gpu": PciAddress(0, 3)}
    regs.write(B0EJ, 4, 1)  # a second eject of the same slot finds nothing
    assert vfio.released == ["0000:02:00.0"]
    # the guest may eject a device nobody asked it to remove (e.g. through /sys/bus/pci/slots/N/power)
    regs.write(PSEG, 4, 0)
    regs.write(B0EJ, 4, 1 << 3)
    assert vfio.released == ["0000:02:00.0", "0000:01:00.0"] and hotplug.devices() == {}


def test_add_refuses_iommu_and_missing_segments_before_touching_anything() -> None:
    vfio = FakeVfio([("0000:01:00.0", PciAddress(0, 3)), ("0000:02:00.0", PciAddress(1, 0))])
    hotplug, line = _hotplug(vfio)
    base = dict(path=Path("/sys/bus/pci/devices/0000:03:00.0"), id=None, iommu=False, pci_segment=0,
                managed=False)
    with pytest.raises(HotplugError, match="iommu=on needs virtio-iommu"):
        hotplug.add_vfio_device(SimpleNamespace(**{**base, "iommu": True}))  # type: ignore[arg-type]
    with pytest.raises(HotplugError, match="PCI segment 2 does not exist"):
        hotplug.add_vfio_device(SimpleNamespace(**{**base, "pci_segment": 2}))  # type: ignore[arg-type]
    with pytest.raises(HotplugError, match="no device given"):
        hotplug.add_vfio_devices([])
    assert line.levels == []


def test_a_request_that_fails_later_uses_up_no_id_and_plugs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    vfio = FakeVfio([("0000:01:00.0", PciAddress(0, 3)), ("0000:02:00.0", PciAddress(1, 0))])
    hotplug, line = _hotplug(vfio)
    monkeypatch.setattr(pci_sysfs, "function_at", lambda path: SimpleNamespace(name=Path(path).name))
    monkeypatch.setattr(hotplug_module, "check_interrupt_isolation", lambda allowed: None)

    def refuse(configs: object) -> None:
        raise HotplugError("IOMMU group 3 also holds 0000:00:04.1")

    monkeypatch.setattr(hotplug, "_plug", refuse)
    config = SimpleNamespace(path=Path("/sys/bus/pci/devices/0000:00:04.0"), id=None, iommu=False,
                             pci_segment=0, managed=False)
    with pytest.raises(HotplugError, match="also holds"):
        hotplug.add_vfio_device(config)  # type: ignore[arg-type]
    assert hotplug._new_id() == "_vfio1"  # _vfio0 went to the boot device without an id; nothing else used
    assert line.levels == [] and hotplug.registers.read(PCIU, 4) == 0
    with pytest.raises(HotplugError, match=r"0000:01:00\.0 is already passed through"):
        other = SimpleNamespace(**{**vars(config), "path": Path("/x/0000:01:00.0")})
        hotplug.add_vfio_device(other)  # type: ignore[arg-type]
    with pytest.raises(HotplugError, match="id gpu is already in use"):
        hotplug.add_vfio_device(SimpleNamespace(**{**vars(config), "id": "gpu"}))  # type: ignore[arg-type]


def test_add_checks_root_for_managed_and_the_memlock_limit_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a boot-time --device: managed=on without root, and a first device whose RAM pinning
    RLIMIT_MEMLOCK would refuse, are refused before anything is bound or opened."""
    from pyvmm import memlock

    line = Line()
    platform = SimpleNamespace(segments=[object()], memory_slots=None)
    fake: Any = None
    hotplug = PciHotplug(platform=platform, ged=AcpiGed(line), memory=SimpleNamespace(total_size=512 << 20),
                         router=fake, irqfds=fake, registry=lambda: fake)  # type: ignore[arg-type]
    monkeypatch.setattr(pci_sysfs, "function_at", lambda path: SimpleNamespace(name=Path(path).name))
    monkeypatch.setattr(hotplug_module, "check_interrupt_isolation", lambda allowed: None)

    def touched(*args: object) -> None:
        raise AssertionError("bound or plugged")

    monkeypatch.setattr(hotplug, "_plug", touched)
    monkeypatch.setattr(hotplug_module.os, "geteuid", lambda: 1000)
    config = SimpleNamespace(path=Path("/sys/bus/pci/devices/0000:00:04.0"), id=None, iommu=False,
                             pci_segment=0, managed=True)
    with pytest.raises(HotplugError, match=r"0000:00:04\.0/?,managed=on: binding .* needs root"):
        hotplug.add_vfio_device(config)  # type: ignore[arg-type]
    monkeypatch.setattr(memlock, "memlock_limit", lambda: 64 << 20)
    monkeypatch.setattr(memlock, "can_lock_memory", lambda: False)
    with pytest.raises(UsageError, match="RLIMIT_MEMLOCK allows 64 MiB: raise it to at least 524288 KiB"):
        hotplug.add_vfio_device(SimpleNamespace(**{**vars(config), "managed": False}))  # type: ignore[arg-type]
    assert line.levels == [] and hotplug._new_id() == "_vfio0"


# ---- virtio-blk disks: added, counted, ejected (a real platform and transport, a fake KVM VM) ------------


def test_a_hot_plugged_disk_takes_the_next_id_and_the_eject_releases_it(tmp_path: Path) -> None:
    from test_virtio_blk import FakeKvmVm, make_image

    from pyvmm.config import DiskConfig
    from pyvmm.devices.bus import IoBus
    from pyvmm.interrupts import MsiRouter
    from pyvmm.memory import GuestMemory
    from pyvmm.pci.apertures import mmio64_aperture, segment_windows
    from pyvmm.pci.platform import PciPlatform

    windows = segment_windows([1], [1], mmio64_aperture(1 << 30))
    platform = PciPlatform(windows, pio_bus=IoBus("pio", 1 << 16), mmio_bus=IoBus("mmio"))
    vm = FakeKvmVm()
    line = Line()
    fake: Any = None
    hotplug = PciHotplug(platform=platform, ged=AcpiGed(line), memory=GuestMemory([(0, 1 << 20)]),
                         router=MsiRouter(vm), irqfds=vm, ioeventfds=vm, registry=lambda: fake)
    hotplug.adopt(FakeVfio([("0000:01:00.0", PciAddress(0, 9))]), [SimpleNamespace(id=None)])
    removed: list[tuple[str, PciAddress]] = []
    hotplug.on_removed = lambda ident, address: removed.append((ident, address))
    image = make_image(tmp_path)
    with pytest.raises(HotplugError, match="id _vfio0 is already in use"):
        hotplug.add_disk(DiskConfig(path=image, id="_vfio0"))
    ident, address = hotplug.add_disk(DiskConfig(path=image))
    assert ident == "_disk1" and address == PciAddress(0, 1)  # one counter: _vfio0 went to the boot device
    assert line.levels == [True, False] and hotplug.registers.read(PCIU, 4) == 1 << 1
    transport: Any = platform.device(address)
    assert transport.name == "virtio-blk-_disk1" and [p.kind for p in platform.placements(address)] == [
        BarKind.MEM64]  # hot-plugged: a 64-bit BAR (docs/pci.md#virtio-blk-bars)
    assert hotplug.counters() == {
        "_disk1": {"read_bytes": 0, "write_bytes": 0, "read_ops": 0, "write_ops": 0}}
    with pytest.raises(Exception, match="in use"):  # the image is locked while the guest has it
        hotplug.add_disk(DiskConfig(path=image, id="again"))
    assert sorted(hotplug.devices()) == ["_disk1", "_vfio0"]
    assert len(vm.ioeventfds) == 1  # the queue's notify address
    hotplug.remove_device("_disk1")
    assert platform.device(address) is transport  # until the guest ejects it
    hotplug.registers.write(B0EJ, 4, 1 << 1)
    assert removed == [("_disk1", address)] and platform.device(address) is None
    assert transport.device.image.fd == -1 and transport.queue_eventfds == [] and vm.ioeventfds == {}
    assert sorted(hotplug.devices()) == ["_vfio0"] and hotplug.counters() == {}
    ident, _address = hotplug.add_disk(DiskConfig(path=image))  # the image was given back
    assert ident == "_disk2"
    second: Any = platform.device(_address)
    hotplug.close()
    assert second.device.image.fd == -1  # a hot-plugged disk closes with the VM


def test_a_managed_give_back_after_an_eject_runs_off_the_vcpu_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's eject arrives on a vCPU thread, whose seccomp filter may not write sysfs: it only wakes
    the thread started when the managed=on group was plugged, which gives the group back
    (docs/seccomp.md#hot-plug)."""
    from pyvmm.vfio import passthrough

    vfio = FakeVfio([("0000:01:00.0", PciAddress(0, 3)), ("0000:02:00.0", PciAddress(1, 0))])
    hotplug, _line = _hotplug(vfio)
    monkeypatch.setattr(pci_sysfs, "function_at", lambda path: SimpleNamespace(name=Path(path).name))
    monkeypatch.setattr(hotplug_module, "check_interrupt_isolation", lambda allowed: None)
    monkeypatch.setattr(passthrough, "bind_groups", lambda names, allow: [f"bound {n}" for n in names])
    given: list[tuple[list[str], str]] = []
    done = threading.Event()

    def give_back(changed: list[str], asked_back: set[str]) -> None:
        given.append((changed, threading.current_thread().name))
        done.set()

    monkeypatch.setattr(passthrough, "give_back", give_back)
    monkeypatch.setattr(hotplug, "_plug", lambda configs: [("0000:03:00.0", PciAddress(0, 4))])
    config = SimpleNamespace(path=Path("/sys/bus/pci/devices/0000:03:00.0"), id="sd", iommu=False,
                             pci_segment=0, managed=True)
    assert hotplug.add_vfio_device(config) == PciAddress(0, 4)  # type: ignore[arg-type]
    # its give-back thread is started here, by the plugging thread (so under that thread's filter)
    assert given == [] and "managed-give-back" in [t.name for t in threading.enumerate()]
    hotplug.remove_device("sd")
    vcpu = threading.Thread(target=hotplug.registers.write, args=(B0EJ, 4, 1 << 4), name="vcpu0")
    vcpu.start()
    vcpu.join()
    assert vfio.released == ["0000:03:00.0"]  # released on the vCPU thread, as the guest asked
    assert done.wait(5) and given == [(["bound 0000:03:00.0"], "managed-give-back")]
    hotplug.close()  # joins the give-back thread; nothing given back twice
    assert len(given) == 1


def test_close_gives_back_what_the_guest_never_ejected(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvmm.vfio import passthrough

    vfio = FakeVfio([("0000:01:00.0", PciAddress(0, 3)), ("0000:02:00.0", PciAddress(1, 0))])
    hotplug, _line = _hotplug(vfio)
    monkeypatch.setattr(pci_sysfs, "function_at", lambda path: SimpleNamespace(name=Path(path).name))
    monkeypatch.setattr(hotplug_module, "check_interrupt_isolation", lambda allowed: None)
    monkeypatch.setattr(passthrough, "bind_groups", lambda names, allow: [f"bound {n}" for n in names])
    given: list[list[str]] = []
    monkeypatch.setattr(passthrough, "give_back", lambda changed, asked_back: given.append(changed))
    monkeypatch.setattr(hotplug, "_plug", lambda configs: [("0000:03:00.0", PciAddress(0, 4))])
    config = SimpleNamespace(path=Path("/sys/bus/pci/devices/0000:03:00.0"), id=None, iommu=False,
                             pci_segment=0, managed=True)
    hotplug.add_vfio_device(config)  # type: ignore[arg-type]
    hotplug.close()
    assert vfio.released == ["0000:03:00.0"] and given == [["bound 0000:03:00.0"]]
