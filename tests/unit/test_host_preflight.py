"""Verdict and finding rules, given plain data about a host and its functions (no sysfs)."""

from __future__ import annotations

import dataclasses

from pyvmm.host.bdf import parse_bdf
from pyvmm.host.groups import IommuGroup, blocks_group, build_groups
from pyvmm.host.hostfacts import HostFacts
from pyvmm.host.inuse import HostUse, UseKind
from pyvmm.host.modules import ModuleState
from pyvmm.host.pciids import PciIds
from pyvmm.host.preflight import Problem, Severity, Verdict, device_findings, host_findings, verdict
from pyvmm.host.sysfs import PciFunction

DB = PciIds(classes={0x04: "Multimedia controller", 0x06: "Bridge"},
            subclasses={(0x04, 0x03): "Audio device", (0x06, 0x01): "ISA bridge", (0x03, 0x00): "VGA"})
GOOD_HOST = HostFacts(
    iommu=True, vfio_pci=ModuleState.LOADED, vfio_iommu_type1=ModuleState.LOADED, interrupt_remapping=True,
    unsafe_interrupts_allowed=False, memlock_limit=64 << 10, can_lock_memory=True,
)


def fn(
    bdf: str, driver: str | None, klass: int = 0x010802, group: int | None = 1, header: int = 0
) -> PciFunction:
    return PciFunction(
        bdf=parse_bdf(bdf), vendor_id=0x1B36, device_id=0x10, subsystem_vendor_id=0, subsystem_device_id=0,
        class_code=klass, revision=2, header_type=header, driver=driver, driver_override=None,
        iommu_group=group, sysfs_path=f"/sys/devices/pci0000:00/{bdf}",
    )


def judge(f: PciFunction, members: list[PciFunction] | None = None, uses=(), host: HostFacts = GOOD_HOST,
          memory: int | None = None) -> tuple[Verdict, set[Problem]]:
    group = IommuGroup(f.iommu_group, tuple(members or [f])) if f.iommu_group is not None else None
    findings = host_findings(host, memory) + device_findings(f, group, list(uses), DB)
    return verdict(f, findings), {x.problem for x in findings if x.severity is Severity.ERROR}


def test_a_lone_endpoint_on_its_native_driver_is_ok() -> None:
    assert judge(fn("0000:00:05.0", "nvme")) == (Verdict.OK, set())


def test_a_device_on_vfio_pci_is_ready() -> None:
    assert judge(fn("0000:00:05.0", "vfio-pci"))[0] is Verdict.READY


def test_display_next_to_a_driven_audio_function_needs_its_group() -> None:
    display = fn("0000:00:04.0", "bochs-drm", klass=0x030000, group=3)
    audio = fn("0000:00:04.1", "snd_hda_intel", klass=0x040300, group=3)
    word, problems = judge(display, [display, audio])
    assert word is Verdict.GROUP and problems == {Problem.GROUP_NOT_VIABLE}
    group = IommuGroup(3, (display, audio))
    message = next(f.message for f in device_findings(display, group, [], DB))
    assert "0000:00:04.1 (Audio device, driver snd_hda_intel)" in message


def test_unbound_and_vfio_members_keep_a_group_viable() -> None:
    me = fn("0000:00:04.0", "bochs-drm", group=3)
    for other_driver in (None, "vfio-pci", "pci-stub"):
        other = fn("0000:00:04.1", other_driver, group=3)
        assert judge(me, [me, other])[0] is Verdict.OK


def test_ports_on_pcieport_do_not_block_but_driven_bridges_do() -> None:
    root_port = fn("0000:00:1c.0", "pcieport", klass=0x060400, header=1)
    idle_bridge = fn("0000:00:1e.0", None, klass=0x060401, header=1)
    # Since Linux 5.19 a bridge header exempts nothing: a driver without driver_managed_dma claims the group.
    other_port = fn("0000:00:1c.1", "shpchp", klass=0x060400, header=1)
    lpc = fn("0000:00:1f.0", "lpc_ich", klass=0x060100)
    assert not blocks_group(root_port) and not blocks_group(idle_bridge)
    assert blocks_group(other_port) and blocks_group(lpc)
    sata = fn("0000:00:1f.2", "ahci", klass=0x010601, group=7)
    word, problems = judge(sata, [lpc, sata])
    assert word is Verdict.SHARED and Problem.GROUP_WITH_BRIDGE in problems


def test_bridges_are_bridges() -> None:
    assert judge(fn("0000:00:00.0", None, klass=0x060000))[0] is Verdict.BRIDGE
    assert judge(fn("0000:00:1c.0", "pcieport", klass=0x060400, header=1))[0] is Verdict.BRIDGE


def test_host_use_outranks_the_group() -> None:
    me = fn("0000:00:02.0", "virtio-pci", group=1)
    other = fn("0000:00:02.1", "e1000e", group=1)
    use = HostUse(UseKind.NINEP, "its 9p filesystem 'hostroot' is mounted at /lower")
    word, problems = judge(me, [me, other], uses=[use])
    assert word is Verdict.IN_USE and {Problem.IN_USE, Problem.GROUP_NOT_VIABLE} <= problems


def test_no_iommu() -> None:
    host = dataclasses.replace(GOOD_HOST, iommu=False)
    word, problems = judge(fn("0000:00:05.0", "nvme", group=None), host=host)
    assert word is Verdict.NO_IOMMU and problems == {Problem.NO_IOMMU, Problem.NO_GROUP}


def test_missing_vfio_is_an_error_but_unloaded_vfio_only_a_warning() -> None:
    missing = dataclasses.replace(GOOD_HOST, vfio_pci=ModuleState.MISSING)
    assert judge(fn("0000:00:05.0", "nvme"), host=missing)[0] is Verdict.NO_VFIO
    unloaded = dataclasses.replace(GOOD_HOST, vfio_pci=ModuleState.AVAILABLE)
    findings = host_findings(unloaded)
    assert [(f.problem, f.severity) for f in findings] == [(Problem.VFIO_NOT_LOADED, Severity.WARNING)]
    assert "modprobe" in findings[0].fix


def test_without_interrupt_remapping_unsafe_interrupts_are_needed_and_the_risk_is_said() -> None:
    host = dataclasses.replace(GOOD_HOST, interrupt_remapping=False)
    assert judge(fn("0000:00:05.0", "nvme"), host=host)[0] is Verdict.UNSAFE
    finding = host_findings(host)[0]
    assert "inject interrupts" in finding.message and "--allow-unsafe-interrupts" in finding.fix
    allowed = dataclasses.replace(host, unsafe_interrupts_allowed=True)
    assert [(f.problem, f.severity) for f in host_findings(allowed)] == [
        (Problem.UNSAFE_INTERRUPTS, Severity.WARNING)
    ]
    # Someone else's parameter is no consent: bind and pyvmm still ask for the user's own (issue 19).
    assert "--platform allow_unsafe_interrupts=on" in host_findings(allowed)[0].fix
    assert "--platform allow_unsafe_interrupts=on" in finding.fix


def test_memlock_limit_against_guest_memory() -> None:
    limited = dataclasses.replace(GOOD_HOST, can_lock_memory=False, memlock_limit=64 << 20)
    word, _ = judge(fn("0000:00:05.0", "nvme"), host=limited, memory=512 << 20)
    assert word is Verdict.MEMLOCK
    message = host_findings(limited, 512 << 20)[0].message
    assert "64M" in message and "512M" in message
    assert judge(fn("0000:00:05.0", "nvme"), host=limited, memory=32 << 20)[0] is Verdict.OK
    assert judge(fn("0000:00:05.0", "nvme"), host=limited)[0] is Verdict.OK  # no --memory: not checked
    unlimited = dataclasses.replace(limited, memlock_limit=None)
    assert judge(fn("0000:00:05.0", "nvme"), host=unlimited, memory=1 << 40)[0] is Verdict.OK
    capable = dataclasses.replace(limited, can_lock_memory=True)  # CAP_IPC_LOCK: the limit does not apply
    assert judge(fn("0000:00:05.0", "nvme"), host=capable, memory=1 << 40)[0] is Verdict.OK


def test_build_groups_sorts_groups_and_members() -> None:
    a = fn("0000:00:04.1", "x", group=3)
    b = fn("0000:00:04.0", "y", group=3)
    c = fn("0000:00:02.0", "z", group=1)
    d = fn("0000:00:01.0", "w", group=None)
    groups = build_groups([a, b, c, d])
    assert [(g.number, [str(m.bdf) for m in g.members]) for g in groups] == [
        (1, ["0000:00:02.0"]), (3, ["0000:00:04.0", "0000:00:04.1"]),
    ]
    assert not groups[1].viable
    assert [str(m.bdf) for m in groups[1].blockers] == ["0000:00:04.0", "0000:00:04.1"]
