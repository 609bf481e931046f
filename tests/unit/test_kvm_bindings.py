"""The ctypes bindings against the system's kernel headers, via a gcc-compiled probe.

The probe is generated from the bindings themselves so that it covers every bound struct, field (nested
ones included, by offsetof with a member designator), ioctl number and constant.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from enum import IntEnum
from pathlib import Path

import pytest

from pyvmm.kvm import bindings as b

# Names newer than the installed headers, with the older name of the same value.
ALIASES = {
    "KVM_DEV_VFIO_FILE": "KVM_DEV_VFIO_GROUP",
    "KVM_DEV_VFIO_FILE_ADD": "KVM_DEV_VFIO_GROUP_ADD",
    "KVM_DEV_VFIO_FILE_DEL": "KVM_DEV_VFIO_GROUP_DEL",
}


def _fields(cls: type[ctypes.Structure | ctypes.Union], prefix: str, base: int) -> list[tuple[str, int, int]]:
    """(C member designator, offset, size) for every field, recursing into nested structs/unions."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    out = []
    for name, ftype, *_ in cls._fields_:
        descriptor = getattr(cls, name)
        path = prefix if name in anonymous else f"{prefix}{name}."
        offset = base + descriptor.offset
        if name not in anonymous:
            out.append((path[:-1], offset, descriptor.size))
        if issubclass(ftype, ctypes.Structure | ctypes.Union):
            out += _fields(ftype, path, offset)
    return out


def _constants() -> dict[str, int]:
    values: dict[str, int] = {}
    for obj in vars(b).values():
        if isinstance(obj, type) and issubclass(obj, IntEnum) and obj.__module__ == b.__name__:
            values.update({m.name: int(m) for m in obj})
    values.update({k: v for k, v in vars(b).items() if k.startswith("KVM") and type(v) is int})
    for flag in (b.KvmMemFlag, b.KvmIrqfdFlag, b.KvmIoeventfdFlag):
        values.update({m.name: int(m) for m in flag if m.name})
    values["SYNC_REGS_SIZE_BYTES"] = b.SYNC_REGS_SIZE_BYTES
    return values


def _probe_source(constants: dict[str, int]) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for struct in b.KERNEL_STRUCTS:
        c = f"struct {struct.__name__}"
        lines.append(f'printf("S {struct.__name__} %zu\\n", sizeof({c}));')
        for path, _, _ in _fields(struct, "", 0):
            lines.append(
                f'printf("O {struct.__name__}.{path} %zu %zu\\n", '
                f"offsetof({c}, {path}), sizeof((({c} *)0)->{path}));"
            )
    for name in constants:
        alias = ALIASES.get(name, name)
        lines += [
            f"#if defined({name})",
            f'printf("C {name} %llu\\n", (unsigned long long)({name}));',
            f"#elif defined({alias})",
            f'printf("C {name} %llu\\n", (unsigned long long)({alias}));',
            "#else",
            f'printf("U {name}\\n");',
            "#endif",
        ]
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    work: Path = tmp_path_factory.mktemp("kvm_probe")
    (work / "probe.c").write_text(_probe_source(_constants()))
    subprocess.run([gcc, "-Wall", "-o", str(work / "probe"), str(work / "probe.c")], check=True)
    out = subprocess.run([str(work / "probe")], check=True, capture_output=True, text=True).stdout
    result: dict[str, list[str]] = {}
    for line in out.splitlines():
        kind, name, *rest = line.split()
        result[f"{kind} {name}"] = rest
    return result


@pytest.mark.parametrize("struct", b.KERNEL_STRUCTS, ids=lambda s: s.__name__)
def test_struct_layout_matches_headers(probe: dict[str, list[str]], struct: type[ctypes.Structure]) -> None:
    assert int(probe[f"S {struct.__name__}"][0]) == ctypes.sizeof(struct)
    for path, offset, size in _fields(struct, "", 0):
        c_offset, c_size = map(int, probe[f"O {struct.__name__}.{path}"])
        assert (c_offset, c_size) == (offset, size), f"{struct.__name__}.{path}"


def test_constants_and_ioctl_numbers_match_headers(probe: dict[str, list[str]]) -> None:
    constants = _constants()
    assert len(constants) > 150  # every enum and module constant was collected
    undefined = [name for name in constants if f"U {name}" in probe]
    assert undefined == []
    wrong = {
        name: (value, int(probe[f"C {name}"][0]))
        for name, value in constants.items()
        if int(probe[f"C {name}"][0]) != value
    }
    assert wrong == {}


def test_flexible_array_helpers_append_entries() -> None:
    msrs = b.kvm_msrs_array(3)
    assert ctypes.sizeof(msrs) == ctypes.sizeof(b.kvm_msrs) + 3 * ctypes.sizeof(b.kvm_msr_entry)
    assert msrs.entries.offset == ctypes.sizeof(b.kvm_msrs)
    cpuid = b.kvm_cpuid2_array(2)
    assert cpuid.entries.offset == 8 and ctypes.sizeof(cpuid) == 8 + 2 * 40
    routing = b.kvm_irq_routing_array(5)
    assert ctypes.sizeof(routing) == 8 + 5 * ctypes.sizeof(b.kvm_irq_routing_entry)
    assert b.kvm_msr_list_array(4).indices.offset == 4
    assert b.kvm_msrs_array(3) is msrs  # cached: one type per length
    with pytest.raises(ValueError, match="negative"):
        b.kvm_msrs_array(-1)
