"""Imports point downward: the layering docs/ARCHITECTURE.md describes, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pyvmm

SRC = Path(pyvmm.__file__).parent

# vfio modules that still reach into kvm/ (being rewritten; they take a Vm).
VFIO_ON_KVM = {"passthrough.py", "pci.py", "slots.py"}


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


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (SRC / "vfio").glob("*.py") if p.name not in VFIO_ON_KVM),
    ids=lambda p: p.name,
)
def test_vfio_imports_no_kvm(path: Path) -> None:
    assert not {name for name in pyvmm_imports(path) if name.startswith("pyvmm.kvm")}
