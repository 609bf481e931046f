"""Kernel modules VFIO needs: are they loaded, built in, loadable, and their parameters."""

from __future__ import annotations

import os
import shutil
from enum import Enum
from pathlib import Path

SYS_MODULE = Path("/sys/module")
LIB_MODULES = Path("/lib/modules")

VFIO_PCI = "vfio_pci"
VFIO_IOMMU_TYPE1 = "vfio_iommu_type1"
UNSAFE_INTERRUPTS = "allow_unsafe_interrupts"


class ModuleState(Enum):
    LOADED = "loaded"
    BUILTIN = "built in"
    AVAILABLE = "not loaded"  # a .ko exists for the running kernel: modprobe can load it
    MISSING = "missing"

    @property
    def present(self) -> bool:
        return self in (ModuleState.LOADED, ModuleState.BUILTIN)


def canonical(name: str) -> str:
    # The kernel treats '-' and '_' in module names alike; sysfs uses '_'.
    return name.replace("-", "_")


def _listed(index: Path, name: str) -> bool:
    """Whether modules.builtin / modules.dep names `name` (entries are paths like kernel/.../vfio-pci.ko)."""
    try:
        text = index.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        path = line.split(":", 1)[0].strip()
        base = path.rsplit("/", 1)[-1]
        stem = base.split(".ko", 1)[0]
        if stem and canonical(stem) == name:
            return True
    return False


def module_state(name: str) -> ModuleState:
    name = canonical(name)
    directory = SYS_MODULE / name
    if (directory / "initstate").exists():
        return ModuleState.LOADED
    tree = LIB_MODULES / os.uname().release
    # Built-in code shows in /sys/module only when it has parameters, so also ask modules.builtin.
    if directory.is_dir() or _listed(tree / "modules.builtin", name):
        return ModuleState.BUILTIN
    if _listed(tree / "modules.dep", name):
        return ModuleState.AVAILABLE
    return ModuleState.MISSING


def param_path(module: str, param: str) -> Path:
    return SYS_MODULE / canonical(module) / "parameters" / param


def read_param(module: str, param: str) -> str | None:
    try:
        return param_path(module, param).read_text().strip()
    except OSError:
        return None


def is_true(value: str | None) -> bool:
    return value is not None and value.upper() in ("Y", "1")


def modprobe_argv(module: str, params: dict[str, str] | None = None) -> list[str]:
    return ["modprobe", module, *(f"{k}={v}" for k, v in (params or {}).items())]


def have_modprobe() -> bool:
    return shutil.which("modprobe") is not None
