"""The VFIO ctypes layouts and ioctl numbers against <linux/vfio.h>, through a gcc-compiled probe."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.vfio import bindings as b

ENUMS = (
    b.VfioIoctl,
    b.VfioPciIoctl,
    b.VfioExtension,
    b.VfioGroupFlag,
    b.VfioDeviceFlag,
    b.VfioRegionInfoFlag,
    b.VfioRegionInfoCap,
    b.VfioIrqInfoFlag,
    b.VfioIrqSetFlag,
    b.VfioIommuInfoFlag,
    b.VfioIommuInfoCap,
    b.VfioDmaMapFlag,
    b.VfioDmaUnmapFlag,
    b.VfioPciRegion,
    b.VfioPciIrq,
)
PLAIN = ("VFIO_API_VERSION", "VFIO_TYPE", "VFIO_BASE", "VFIO_PCI_NUM_REGIONS", "VFIO_PCI_NUM_IRQS")


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/vfio.h>", "int main(void) {"]
    for struct in b.STRUCTS:
        name = struct.__name__
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        for field, *_ in struct._fields_:
            lines.append(f'printf("offsetof {name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    # Flexible arrays start where the kernel says.
    for name, field in (
        ("vfio_irq_set", "data"),
        ("vfio_region_info_cap_sparse_mmap", "areas"),
        ("vfio_iommu_type1_info_cap_iova_range", "iova_ranges"),
        ("vfio_pci_hot_reset_info", "devices"),
        ("vfio_pci_hot_reset", "group_fds"),
    ):
        lines.append(f'printf("offsetof {name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    for enum in ENUMS:
        for member in enum:
            lines.append(f'printf("value {member.name} %llu\\n", (unsigned long long)({member.name}));')
    for name in PLAIN:
        lines.append(f'printf("value {name} %llu\\n", (unsigned long long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    tmp: Path = tmp_path_factory.mktemp("vfio_probe")
    src = tmp / "probe.c"
    src.write_text(_c_program())
    exe = tmp / "probe"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        found[f"{kind} {key}"] = int(value)
    return found


@pytest.mark.parametrize("struct", b.STRUCTS, ids=lambda s: s.__name__)
def test_struct_layout_matches_header(probe: dict[str, int], struct: type[ctypes.Structure]) -> None:
    name = struct.__name__
    assert ctypes.sizeof(struct) == probe[f"sizeof {name}"]
    for field, *_ in struct._fields_:
        assert getattr(struct, field).offset == probe[f"offsetof {name}.{field}"], field


def test_flexible_arrays_start_where_the_header_says(probe: dict[str, int]) -> None:
    assert b.vfio_irq_set_eventfds(3).data.offset == probe["offsetof vfio_irq_set.data"]
    assert b.vfio_irq_set_bools(1).data.offset == probe["offsetof vfio_irq_set.data"]
    areas = b.vfio_region_info_cap_sparse_mmap_areas(2)
    assert areas.areas.offset == probe["offsetof vfio_region_info_cap_sparse_mmap.areas"]
    assert ctypes.sizeof(areas) == probe["sizeof vfio_region_info_cap_sparse_mmap"] + 2 * 16
    info = b.vfio_pci_hot_reset_info_devices(3)
    assert info.devices.offset == probe["offsetof vfio_pci_hot_reset_info.devices"]
    assert ctypes.sizeof(info) == probe["sizeof vfio_pci_hot_reset_info"] + 3 * 8
    fds = b.vfio_pci_hot_reset_group_fds(2)
    assert fds.group_fds.offset == probe["offsetof vfio_pci_hot_reset.group_fds"]


def test_constants_and_ioctl_numbers_match_header(probe: dict[str, int]) -> None:
    for enum in ENUMS:
        for member in enum:
            assert int(member) == probe[f"value {member.name}"], member.name
    for name in PLAIN:
        assert getattr(b, name) == probe[f"value {name}"], name


def test_ioctl_numbers_are_the_documented_ones() -> None:
    assert b.VfioIoctl.VFIO_GET_API_VERSION == 0x3B64
    assert b.VfioIoctl.VFIO_IOMMU_UNMAP_DMA == 0x3B72


def test_irq_set_helper_fills_argsz_count_and_data() -> None:
    flags = b.VfioIrqSetFlag.VFIO_IRQ_SET_DATA_EVENTFD | b.VfioIrqSetFlag.VFIO_IRQ_SET_ACTION_TRIGGER
    request = b.irq_set(b.VfioPciIrq.VFIO_PCI_MSIX_IRQ_INDEX, flags, data=[7, 8, -1])
    assert request.argsz == ctypes.sizeof(b.vfio_irq_set) + 12
    assert (request.index, request.start, request.count) == (2, 0, 3)
    assert list(request.data) == [7, 8, -1]
    none = b.VfioIrqSetFlag.VFIO_IRQ_SET_DATA_NONE
    disable = b.irq_set(0, none | b.VfioIrqSetFlag.VFIO_IRQ_SET_ACTION_TRIGGER)
    assert disable.argsz == ctypes.sizeof(b.vfio_irq_set) and disable.count == 0
    unmask = b.irq_set(0, b.VfioIrqSetFlag.VFIO_IRQ_SET_DATA_NONE, count=1)
    assert unmask.count == 1
