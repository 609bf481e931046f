"""Imports point downward: the layering docs/ARCHITECTURE.md describes, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pyvmm

SRC = Path(pyvmm.__file__).parent

def pyvmm_imports(path: Path) -> set[str]:
    """The pyvmm modules `path` imports, anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "pyvmm" or name.startswith("pyvmm.")}


def test_ioctl_imports_only_errors() -> None:
    assert pyvmm_imports(SRC / "ioctl.py") == {"pyvmm.errors", "pyvmm.errors.PyvmmError"}


@pytest.mark.parametrize("path", sorted((SRC / "kvm").glob("*.py")), ids=lambda p: p.name)
def test_kvm_imports_no_devices(path: Path) -> None:
    assert not {name for name in pyvmm_imports(path) if name.startswith("pyvmm.devices")}


@pytest.mark.parametrize("path", sorted((SRC / "kvm").glob("*.py")), ids=lambda p: p.name)
def test_kvm_imports_no_vfio(path: Path) -> None:
    assert not {name for name in pyvmm_imports(path) if name.startswith("pyvmm.vfio")}


@pytest.mark.parametrize("path", sorted((SRC / "vfio").glob("*.py")), ids=lambda p: p.name)
def test_vfio_imports_no_kvm_and_no_devices(path: Path) -> None:
    assert not {name for name in pyvmm_imports(path) if name.startswith(("pyvmm.kvm", "pyvmm.devices"))}


@pytest.mark.parametrize("path", sorted((SRC / "pci").glob("*.py")), ids=lambda p: p.name)
def test_pci_imports_nothing_above_it(path: Path) -> None:
    """pci/ is plain PCI: no hypervisor, no device models, no configuration (the planner lives above it)."""
    above = ("pyvmm.kvm", "pyvmm.vfio", "pyvmm.devices", "pyvmm.config", "pyvmm.boot", "pyvmm.builder")
    assert not {name for name in pyvmm_imports(path) if name.startswith(above)}


@pytest.mark.parametrize(
    "path",
    sorted([*(SRC / "vfio").glob("*.py"), *(SRC / "devices").rglob("*.py"), SRC / "interrupts.py"]),
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_device_models_do_not_take_the_kvm_vm(path: Path) -> None:
    """Device models reach the hypervisor through the small interfaces of pyvmm.hypervisor."""
    assert "pyvmm.kvm.system.Vm" not in pyvmm_imports(path)
