"""pyvmm.pci_sysfs: the one reader of /sys/bus/pci and /sys/kernel/iommu_groups, on fake sysfs trees, and
the one IOMMU-group rule that `pyvmm-host` and `pyvmm --device` share."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pyvmm import pci_sysfs
from pyvmm.host.errors import RefusedError
from pyvmm.host.groups import build_groups
from pyvmm.host.pciids import PciIds
from pyvmm.host.preflight import Problem, device_findings
from pyvmm.host.selection import select_targets
from pyvmm.pci_sysfs import Bdf, MemberRole, PciSysfs, member_role
from pyvmm.vfio.container import not_viable_message
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.passthrough import VfioConfigError, check_groups_complete, host_function

SRC = Path(pci_sysfs.__file__).resolve().parent
HOME = Path(pci_sysfs.__file__).resolve()

# A string that starts like one of these is a path into the PCI part of sysfs (or a piece to build one).
# (A bare "iommu_groups" is also a function's name, so only "iommu_groups/" counts.)
_PATH_PREFIXES = (
    "/sys/bus/pci", "/sys/kernel/iommu_groups", "bus/pci", "kernel/iommu_groups", "iommu_groups/",
)
_SYSFS_ROOTS = frozenset({"/sys", "/sys/", "/sys/bus", "/sys/bus/", "/sys/kernel", "/sys/kernel/"})


def _skipped(tree: ast.AST) -> set[int]:
    """Docstrings, and the pieces of f-strings (the f-string is judged whole)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
        if isinstance(node, ast.JoinedStr):
            ids.update(id(v) for v in node.values)
    return ids


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def sysfs_path_literals(path: Path) -> list[str]:
    """String literals in `path` that are sysfs PCI paths. Prose that mentions one (a message, a help text,
    `path=/sys/bus/pci/...` in an example) does not start with one and is not a reader."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _skipped(tree)
    found = []
    for node in ast.walk(tree):
        text = None if id(node) in skipped else _text(node)
        if text is None:
            continue
        stripped = text.strip()
        if stripped.startswith(_PATH_PREFIXES) or stripped in _SYSFS_ROOTS:
            where = path.relative_to(SRC) if path.is_relative_to(SRC) else path.name
            found.append(f"{where}:{getattr(node, 'lineno', 0)}: {stripped!r}")
    return found


def test_only_pci_sysfs_reads_the_pci_part_of_sysfs() -> None:
    """A fourth reader of /sys/bus/pci fails here: read through pyvmm.pci_sysfs (PciSysfs, function_at, ...)
    instead; writers (host binding) take their paths from it too."""
    offenders = [hit for py in sorted(SRC.rglob("*.py")) if py != HOME for hit in sysfs_path_literals(py)]
    assert offenders == []
    assert sysfs_path_literals(HOME), "the scan no longer finds the home module's own paths"


def test_the_scan_catches_a_new_reader(tmp_path: Path) -> None:
    reader = tmp_path / "reader.py"
    reader.write_text(
        '"""Mentions /sys/bus/pci/devices in a docstring: fine."""\n'
        "import os\n"
        'A = open(f"/sys/bus/pci/devices/{os.sep}/config")\n'
        'B = os.path.join("/sys", "kernel", "iommu_groups")\n'
        'D = Path("/sys/kernel") / "iommu_groups/3/devices"\n'
        "E = iommu_groups()\n"
        'C = "give path=/sys/bus/pci/devices/0000:01:00.0/"\n'
    )
    hits = sorted(h.split(": ", 1)[1] for h in sysfs_path_literals(reader))
    assert hits == ["'/sys'", "'/sys/bus/pci/devices/{}/config'", "'/sys/kernel'", "'iommu_groups/3/devices'"]


def test_device_checks_do_not_load_the_host_layer() -> None:
    code = ("import sys, pyvmm.vfio.passthrough, pyvmm.vfio.pci; "
            "print(sorted(m for m in sys.modules if m.startswith('pyvmm.host')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import sys, pyvmm.pci_sysfs; print(sorted(m for m in sys.modules if m.startswith('pyvmm.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pyvmm.pci_sysfs']"


# ---- fake sysfs trees -----------------------------------------------------------------------------------


class FakeSysfs:
    """A sysfs tree as the kernel lays it out: functions under devices/, symlinked from bus/pci/devices and
    kernel/iommu_groups/N/devices, driver links into bus/pci/drivers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "bus/pci/devices").mkdir(parents=True)
        (root / "bus/pci/drivers").mkdir(parents=True)
        (root / "kernel/iommu_groups").mkdir(parents=True)

    def add(self, name: str, driver: str | None = None, klass: int = 0x030000, header: int = 0,
            group: int | None = None, vendor: int = 0x1234) -> Path:
        directory = self.root / "devices/pci0000:00" / name
        directory.mkdir(parents=True)
        for attr, value in (("vendor", vendor), ("device", 0x1111), ("subsystem_vendor", 0x1af4),
                            ("subsystem_device", 0x1100), ("revision", 2)):
            (directory / attr).write_text(f"{value:#06x}\n")
        (directory / "class").write_text(f"{klass:#08x}\n")
        (directory / "driver_override").write_text("(null)\n")
        config = bytearray(64)
        config[0x0E] = header | 0x80  # multi-function bit set: must be masked off
        (directory / "config").write_bytes(bytes(config))
        (directory / "resource").write_text("0x00000000fe000000 0x00000000fe000fff 0x0000000000040200\n")
        if driver is not None:
            drv = self.root / "bus/pci/drivers" / driver
            drv.mkdir(exist_ok=True)
            (directory / "driver").symlink_to(drv)
        if group is not None:
            gdir = self.root / "kernel/iommu_groups" / str(group)
            (gdir / "devices").mkdir(parents=True, exist_ok=True)
            (directory / "iommu_group").symlink_to(gdir)
            (gdir / "devices" / name).symlink_to(directory)
        (self.root / "bus/pci/devices" / name).symlink_to(directory)
        return self.root / "bus/pci/devices" / name


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSysfs:
    tree = FakeSysfs(tmp_path / "sys")
    monkeypatch.setattr(pci_sysfs, "SYSFS", PciSysfs(tree.root))
    return tree


def test_functions_and_groups_read_from_a_fake_tree(fake: FakeSysfs) -> None:
    fake.add("0000:00:03.1", "snd_hda_intel", klass=0x040300, group=3)
    fake.add("0000:00:03.0", "vfio-pci", group=3)
    fake.add("0000:00:1c.0", "pcieport", klass=0x060400, header=1, group=1)
    (fake.root / "bus/pci/devices/not-a-function").mkdir()
    sysfs = pci_sysfs.SYSFS
    names = [f.name for f in sysfs.functions()]
    assert names == ["0000:00:03.0", "0000:00:03.1", "0000:00:1c.0"]
    audio = sysfs.function(Bdf(0, 0, 3, 1))
    assert audio is not None and audio.driver == "snd_hda_intel" and audio.iommu_group == 3
    assert audio.ids == "1234:1111" and audio.class_code == 0x040300 and audio.revision == 2
    assert audio.driver_override is None and audio.header_type == 0 and not audio.is_bridge
    port = sysfs.function(Bdf(0, 0, 0x1C, 0))
    assert port is not None and port.header_type == 1 and port.is_bridge
    assert sysfs.function(Bdf(0, 0, 4, 0)) is None
    assert [f.name for f in sysfs.group_members(3)] == ["0000:00:03.0", "0000:00:03.1"]
    assert sysfs.group_members(9) == [] and sysfs.group_numbers() == [1, 3]
    assert sysfs.driver("0000:00:03.0") == "vfio-pci"


def test_a_function_is_found_by_any_path_spelling(fake: FakeSysfs) -> None:
    link = fake.add("0000:00:05.0", "vfio-pci", group=4)
    for spelling in (link, f"{link}/", link.resolve()):
        function = pci_sysfs.function_at(spelling)
        assert function is not None and function.name == "0000:00:05.0" and function.iommu_group == 4
    assert pci_sysfs.function_at(fake.root / "bus/pci") is None
    assert pci_sysfs.function_at(fake.root / "nowhere/0000:00:05.0") is None


# ---- the rule -------------------------------------------------------------------------------------------

ROLES = [
    # (driver, class, header) -> role
    ("vfio-pci", 0x030000, 0, MemberRole.VFIO),
    ("mlx5_vfio_pci", 0x020000, 0, MemberRole.VFIO),
    (None, 0x040300, 0, MemberRole.IDLE),
    ("pci-stub", 0x040300, 0, MemberRole.IDLE),
    ("pcieport", 0x060400, 1, MemberRole.PORT),  # root and switch ports
    ("pcieport", 0x080700, 0, MemberRole.PORT),  # a root complex event collector: pcieport too
    (None, 0x060400, 1, MemberRole.PORT),  # a PCI-PCI bridge without a driver
    (None, 0x060100, 0, MemberRole.PORT),  # an ISA bridge without a driver
    ("snd_hda_intel", 0x040300, 0, MemberRole.DRIVEN),
    ("shpchp", 0x060400, 1, MemberRole.DRIVEN_BRIDGE),  # no bridge-header exemption since Linux 5.19
    ("lpc_ich", 0x060100, 0, MemberRole.DRIVEN_BRIDGE),
]


@pytest.mark.parametrize(("driver", "klass", "header", "role"), ROLES)
def test_member_roles(fake: FakeSysfs, driver: str | None, klass: int, header: int, role: MemberRole) -> None:
    function = pci_sysfs.function_at(fake.add("0000:00:04.0", driver, klass=klass, header=header, group=1))
    assert function is not None and member_role(function) is role
    assert role.blocks == (role in (MemberRole.DRIVEN, MemberRole.DRIVEN_BRIDGE))
    assert role.joins_guest == (role in (MemberRole.VFIO, MemberRole.IDLE))  # never a partial group


DB = PciIds()


def _both_sides(fake: FakeSysfs, group: int, given: set[str], hint: str) -> dict[str, Any]:
    """What `pyvmm-host` and `pyvmm --device` say about one group of the fake tree."""
    members = pci_sysfs.SYSFS.group_members(group)
    host_group = build_groups(pci_sysfs.SYSFS.functions())
    (host_view,) = [g for g in host_group if g.number == group]
    device = pci_sysfs.SYSFS.function(Bdf.from_name(hint) or Bdf(0, 0, 0, 0))
    assert device is not None
    findings = {f.problem for f in device_findings(device, host_view, [], DB)}
    try:
        check_groups_complete(SimpleNamespace(groups={group: None}), given)  # type: ignore[arg-type]
        complete = None
    except VfioConfigError as exc:
        complete = str(exc)
    return {
        "viable": host_view.viable,
        "blockers": [str(m.bdf) for m in host_view.blockers],
        "same_blockers": [m.name for m in pci_sysfs.blockers(members)]
        == [str(m.bdf) for m in host_view.blockers],
        "findings": findings,
        "complete": complete,
        "message": not_viable_message(group, hint),
    }


def test_endpoint_behind_an_idle_bridge_and_a_port(fake: FakeSysfs) -> None:
    fake.add("0000:00:1c.0", "pcieport", klass=0x060400, header=1, group=2)
    fake.add("0000:00:1e.0", None, klass=0x060401, header=1, group=2)
    fake.add("0000:01:00.0", "vfio-pci", klass=0x010802, group=2)
    seen = _both_sides(fake, 2, {"0000:01:00.0"}, "0000:01:00.0")
    assert seen["viable"] and seen["same_blockers"] and seen["complete"] is None
    assert not seen["findings"] & {Problem.GROUP_NOT_VIABLE, Problem.GROUP_WITH_BRIDGE, Problem.GROUP_MEMBERS}


def test_idle_endpoints_do_not_block_but_go_to_the_same_guest(fake: FakeSysfs) -> None:
    """No partial group: an endpoint with no driver or on pci-stub keeps the group viable, but the guest that
    gets one function gets it too (peer-to-peer DMA inside a group passes no IOMMU)."""
    fake.add("0000:00:03.0", "vfio-pci", group=3)
    fake.add("0000:00:03.1", None, klass=0x040300, group=3)
    fake.add("0000:00:03.2", "pci-stub", klass=0x0C0330, group=3)
    seen = _both_sides(fake, 3, {"0000:00:03.0"}, "0000:00:03.0")
    assert seen["viable"] and seen["blockers"] == []
    assert seen["complete"] is not None and "0000:00:03.1, 0000:00:03.2" in seen["complete"]
    assert "pyvmm-host bind --group" in seen["complete"]
    assert Problem.GROUP_MEMBERS in seen["findings"]
    whole = _both_sides(fake, 3, {"0000:00:03.0", "0000:00:03.1", "0000:00:03.2"}, "0000:00:03.0")
    assert whole["complete"] is None


def test_a_second_endpoint_on_its_native_driver_blocks_on_both_sides(fake: FakeSysfs) -> None:
    fake.add("0000:00:03.0", "vfio-pci", group=3)
    fake.add("0000:00:03.1", "snd_hda_intel", klass=0x040300, group=3)
    seen = _both_sides(fake, 3, {"0000:00:03.0"}, "0000:00:03.0")
    assert not seen["viable"] and seen["blockers"] == ["0000:00:03.1"] and seen["same_blockers"]
    assert Problem.GROUP_NOT_VIABLE in seen["findings"]
    assert "0000:00:03.1 is on snd_hda_intel" in seen["message"]
    assert "`pyvmm-host bind --group 0000:00:03.0`" in seen["message"]


def test_a_second_endpoint_on_vfio_pci_must_join_the_guest(fake: FakeSysfs) -> None:
    fake.add("0000:00:03.0", "vfio-pci", group=3)
    fake.add("0000:00:03.1", "vfio-pci", klass=0x040300, group=3)
    seen = _both_sides(fake, 3, {"0000:00:03.0"}, "0000:00:03.0")
    assert seen["viable"] and Problem.GROUP_MEMBERS in seen["findings"]
    assert seen["complete"] is not None and "0000:00:03.1" in seen["complete"]
    assert "--device path=/sys/bus/pci/devices/0000:00:03.1/" in seen["complete"]
    assert _both_sides(fake, 3, {"0000:00:03.0", "0000:00:03.1"}, "0000:00:03.0")["complete"] is None


def test_a_driven_bridge_makes_the_group_hopeless_on_both_sides(fake: FakeSysfs) -> None:
    fake.add("0000:00:1f.0", "lpc_ich", klass=0x060100, group=7)
    fake.add("0000:00:1f.2", "ahci", klass=0x010601, group=7)
    seen = _both_sides(fake, 7, {"0000:00:1f.2"}, "0000:00:1f.2")
    assert not seen["viable"] and seen["same_blockers"]
    assert Problem.GROUP_WITH_BRIDGE in seen["findings"]
    assert "0000:00:1f.0 is a bridge" in seen["message"] and "--group" not in seen["message"]
    functions = pci_sysfs.SYSFS.functions()
    with pytest.raises(RefusedError, match=r"bridge 0000:00:1f\.0"):
        select_targets([Bdf(0, 0, 0x1F, 2)], functions, True, DB)


def test_host_function_reads_through_the_home(fake: FakeSysfs) -> None:
    link = fake.add("0000:00:05.0", "vfio-pci", group=4)
    function = host_function(link)
    assert (function.name, function.group, function.driver) == ("0000:00:05.0", 4, "vfio-pci")
    with pytest.raises(VfioError, match=r"0000:00:06\.0 is bound to nvme, not vfio-pci: run `pyvmm-host"):
        host_function(fake.add("0000:00:06.0", "nvme"))
    with pytest.raises(VfioError, match="has no IOMMU group"):
        host_function(fake.add("0000:00:07.0", "vfio-pci"))
    with pytest.raises(VfioError, match="not a PCI function"):
        host_function(fake.root / "bus/pci")
