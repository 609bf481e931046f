"""Kernel modules of the lab kernel: find them, resolve their dependencies, stage subsets."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_MODINFO_FIELD = re.compile(rb"(?:^|\0)(depends|name)=([^\0]*)")


def canonical(name: str) -> str:
    """Module names treat '-' and '_' alike; the kernel reports them with '_'."""
    return name.replace("-", "_")


def modinfo_fields(ko: bytes) -> dict[str, str]:
    """The `name` and `depends` fields of a module's .modinfo section."""
    fields: dict[str, str] = {}
    for match in _MODINFO_FIELD.finditer(ko):
        fields.setdefault(match.group(1).decode(), match.group(2).decode())
    return fields


@dataclass
class ModuleTree:
    """The modules of one kernel release, as unpacked from its Debian package."""

    root: Path  # the directory holding lib/modules/<release>
    release: str

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def index(self) -> dict[str, Path]:
        return {canonical(p.name.removesuffix(".ko")): p for p in self.moddir.rglob("*.ko")}

    def builtin(self) -> set[str]:
        path = self.moddir / "modules.builtin"
        if not path.exists():
            return set()
        return {canonical(Path(line).name.removesuffix(".ko")) for line in path.read_text().split()}

    def closure(self, names: list[str]) -> list[Path]:
        """The modules `names` need, dependencies first; built-in modules are skipped."""
        index = self.index()
        builtin = self.builtin()
        ordered: list[Path] = []
        seen: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            key = canonical(name)
            if key in seen or key in builtin:
                return
            if key not in index:
                raise LookupError(f"kernel module {name!r} not found in {self.moddir}")
            seen.add(key)
            depends = modinfo_fields(index[key].read_bytes()).get("depends", "")
            for dep in filter(None, depends.split(",")):
                visit(dep, (*chain, key))
            ordered.append(index[key])

        for name in names:
            visit(name, ())
        return ordered

    def depmod(self) -> None:
        run_depmod(self.root, self.release)


def run_depmod(base: Path, release: str) -> None:
    """Write modules.dep, modules.alias, ... for the tree under `base` (kmod's depmod)."""
    depmod = shutil.which("depmod") or "/usr/sbin/depmod"
    if not Path(depmod).exists():
        raise RuntimeError("depmod not found: install Debian's kmod package")
    subprocess.run([depmod, "-b", str(base), release], check=True)
