"""PCI segments: the shared BAR plan (pci/planning.py), exhaustion messages with their remedy, sysfs BARs
as VFIO will present them, and the GPUDirect clique's place (docs/pci.md#virtio-blk-bars,
#aperture-weights, #bar-allocation, #32-bit-exhaustion; docs/vfio.md#msi-x-table-relocation,
#gpudirect-clique-capability)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.config import DiskConfig
from pyvmm.devices.virtio.attach import disk_bars
from pyvmm.pci.bar import BarInfo, BarKind
from pyvmm.pci.bus import PciSegment
from pyvmm.pci.planning import PlanError, PlanItem, format_plan, plan_pci, plan_windows, planning_platform
from pyvmm.vfio import capabilities as caps
from pyvmm.vfio.pci import HostBar, guest_bar_layout, parse_resource, sysfs_function

MiB = 1 << 20
RAM = 512 * MiB
BITS = 40
VGA16 = (BarInfo(0, BarKind.MEM32, 16 * MiB, True), BarInfo(2, BarKind.MEM32, 4096))


def vga(n: int, segment: int = 1) -> PlanItem:
    return PlanItem(f"--device path=/sys/bus/pci/devices/0000:00:0{n}.0", segment, None, VGA16)


def test_two_to_one_windows() -> None:
    windows = plan_windows([(2, 1), (1, 1)], RAM, 46)
    assert (windows[0].mmio32.start, windows[0].mmio32.end) == (0xC000_0000, 0xDAAA_9FFF)
    assert (windows[1].mmio32.start, windows[1].mmio32.end) == (0xDAAA_A000, 0xE7FF_FFFF)
    assert (windows[0].mmio64.start, windows[0].mmio64.end) == (0x1_0000_0000, 0x1FFF_FFFF_FFFF)
    assert (windows[1].mmio64.start, windows[1].mmio64.end) == (0x2000_0000_0000, 0x3FFF_FFEE_FFFF)


def test_sixteen_segments_refuse_three_16m_bars_with_the_remedy() -> None:
    items = [vga(3), vga(4), vga(5)]
    with pytest.raises(PlanError) as info:
        plan_pci(items, [(1, 1)] * 16, RAM, BITS)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("--device path=/sys/bus/pci/devices/0000:00:04.0: BAR0 (32-bit memory, 16 MiB)")
    assert "32-bit window of PCI segment 1 [0xc2800000-0xc4ffffff] (40 MiB;" in text
    assert "largest free 16 MiB-aligned range: 16380 KiB at 0xc3000000" in text
    assert "--pci-segment pci_segment=1,mmio32_aperture_weight=2" in text
    assert "pci_segment=" in text.split("mmio32_aperture_weight=2", 1)[1]


def test_weight_4_fits_them_inside_segment_1() -> None:
    weights = [(1, 1)] * 16
    weights[1] = (4, 1)
    plan = plan_pci([vga(3), vga(4), vga(5)], weights, RAM, BITS)
    window = plan.windows[1].mmio32
    assert (window.start, window.end) == (0xC21A_F000, 0xCA86_AFFF)
    assert [d.bdf for d in plan.devices] == ["0001:00:00.0", "0001:00:01.0", "0001:00:02.0"]
    bar0 = [d.placements[0].address for d in plan.devices]
    assert bar0 == [0xC900_0000, 0xC800_0000, 0xC700_0000]  # top-down, naturally aligned
    for dev in plan.devices:
        for p in dev.placements:
            assert window.contains(p.address, p.size)
    report = format_plan(plan)
    assert "PCI segment 1: ECAM [0xe8100000-0xe81fffff]" in report
    assert "    BAR0 (32-bit memory, 16 MiB) at [0xc9000000-0xc9ffffff] in the 32-bit window" in report


def test_moving_to_another_segment_is_suggested_when_it_has_room() -> None:
    items = [vga(3, 1), vga(4, 1)]
    with pytest.raises(PlanError, match=r"put the device on another segment with pci_segment=0"):
        plan_pci(items, [(1, 1)] * 16, RAM, BITS)


def test_64bit_bars_never_take_32bit_space() -> None:
    big = PlanItem("--device big", 1, None, (BarInfo(0, BarKind.MEM64, 16 << 30, True),))
    plan = plan_pci([big, vga(4)], [(1, 1)] * 16, RAM, BITS)
    p = plan.devices[0].placements[0]
    assert (p.kind is BarKind.MEM64 and plan.windows[1].mmio64.contains(p.address, p.size) is False) or True
    assert plan.windows[1].mmio64.contains(p.address, p.size)
    assert not plan.windows[1].mmio32.contains(p.address)


def test_a_64bit_bar_too_big_for_its_window_names_the_64bit_weight() -> None:
    huge = PlanItem("--device huge", 0, None, (BarInfo(0, BarKind.MEM64, 1 << 39),))
    with pytest.raises(PlanError, match=r"64-bit window of PCI segment 0.*mmio64_aperture_weight"):
        plan_pci([huge], [(1, 1), (1, 1)], RAM, BITS)


def test_disks_32bit_only_on_segment_0() -> None:
    seg0 = disk_bars(DiskConfig(Path("a.img")))
    seg1 = disk_bars(DiskConfig(Path("b.img"), pci_segment=1))
    assert [(b.kind, b.size) for b in seg0] == [(BarKind.MEM32, 0x80000)]
    assert [(b.kind, b.size, b.align) for b in seg1] == [(BarKind.MEM64, 0x80000, 8 * MiB)]


def test_explicit_slots_are_reserved_before_automatic_placement() -> None:
    items = [PlanItem("--disk a", 1, None, ()), PlanItem("--device b", 1, 0, VGA16)]
    plan = plan_pci(items, [(1, 1), (1, 1)], RAM, BITS)
    assert [d.bdf for d in plan.devices] == ["0001:00:01.0", "0001:00:00.0"]


def test_the_platform_has_a_segment_per_plan_window() -> None:
    windows = plan_windows([(2, 1), (1, 1)], RAM, BITS)
    platform = planning_platform(windows)
    segments = platform.segments
    assert [s.id for s in segments] == [0, 1] and all(isinstance(s, PciSegment) for s in segments)
    assert segments[0].io is segments[1].io is platform.io  # one VM-wide I/O allocator


def test_too_many_segments_for_a_narrow_64bit_area() -> None:
    with pytest.raises(PlanError, match="num_pci_segments=96"):
        plan_windows([(1, 1)] * 96, RAM, 36)


# ---- BARs from sysfs, as VFIO will present them -----------------------------------------------------------

NIC_RESOURCE = """\
0x00000000feb80000 0x00000000feb9ffff 0x0000000000040200
0x00000000feba0000 0x00000000febbffff 0x0000000000040200
0x000000000000c080 0x000000000000c09f 0x0000000000040101
0x00000000febc4000 0x00000000febc7fff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000feb40000 0x00000000feb7ffff 0x0000000000046200
"""


def test_parse_resource_kinds_and_rom() -> None:
    bars = parse_resource(NIC_RESOURCE)
    assert [(b.index, b.kind, b.size) for b in bars] == [
        (0, BarKind.MEM32, 0x20000), (1, BarKind.MEM32, 0x20000), (2, BarKind.IO, 0x20),
        (3, BarKind.MEM32, 0x4000), (6, BarKind.ROM, 0x40000),
    ]
    nvme = parse_resource("0x00000000febc0000 0x00000000febc3fff 0x0000000000140204\n" + "0x0 0x0 0x0\n" * 6)
    assert [(b.kind, b.size) for b in nvme] == [(BarKind.MEM64, 0x4000)]


def test_guest_layout_raises_small_bars_and_sub_page_ones_to_a_page() -> None:
    out = guest_bar_layout([HostBar(0, BarKind.MEM32, 0x100), HostBar(2, BarKind.IO, 2),
                            HostBar(6, BarKind.ROM, 0x400)], None, 4096)
    assert [(b.index, b.size, b.align) for b in out] == [(0, 4096, 0), (2, 4, 0), (6, 2048, 0)]


def _config(caps_at: list[tuple[int, bytes]], bar0: int = 0x4) -> bytes:
    cfg = bytearray(256)
    cfg[0:4] = bytes([0x36, 0x1B, 0x10, 0x00])
    cfg[0x06] = caps.STATUS_CAP_LIST
    cfg[0x10:0x14] = bar0.to_bytes(4, "little")
    cfg[0x34] = caps_at[0][0]
    for n, (off, body) in enumerate(caps_at):
        cfg[off:off + len(body)] = body
        cfg[off + 1] = caps_at[n + 1][0] if n + 1 < len(caps_at) else 0
    return bytes(cfg)


def _function(tmp_path: Path, resource: str, config: bytes) -> Path:
    d = tmp_path / "0000:00:05.0"
    d.mkdir()
    (d / "resource").write_text(resource)
    (d / "config").write_bytes(config)
    (d / "vendor").write_text("0x1b36\n")
    return d


def test_sysfs_function_accounts_for_the_msix_relocation(tmp_path: Path) -> None:
    # MSI-X with 64 entries, table at 0x2800 of a 16 KiB 64-bit BAR0 (not page aligned): the guest BAR grows.
    msix = bytes([0x11, 0, 63, 0]) + (0x2800).to_bytes(4, "little") + (0x3800).to_bytes(4, "little")
    d = _function(tmp_path, "0x00000000febc0000 0x00000000febc3fff 0x0000000000140204\n",
                  _config([(0x40, msix)]))
    fn = sysfs_function(d)
    assert fn.name == "0000:00:05.0" and fn.vendor_device == "1b36:0010"
    assert [(b.kind, b.size) for b in fn.bars] == [(BarKind.MEM64, 0x8000)]
    assert fn.clique_problem is None


def test_sysfs_function_plans_a_forced_relocation(tmp_path: Path) -> None:
    # The table starts a page of a 64-bit BAR0: moved only with x_msix_relocation=on, as the model does.
    msix = bytes([0x11, 0, 63, 0]) + (0x2000).to_bytes(4, "little") + (0x3000).to_bytes(4, "little")
    d = _function(tmp_path, "0x00000000febc0000 0x00000000febc3fff 0x0000000000140204\n",
                  _config([(0x40, msix)]))
    assert [b.size for b in sysfs_function(d).bars] == [0x4000]
    fn = sysfs_function(d, msix_relocation=True)
    assert [b.size for b in fn.bars] == [0x8000] and fn.relocation_problem is None
    # In a 32-bit BAR it cannot apply: the planner refuses it (vmplan) instead of ignoring the key.
    (d / "resource").write_text("0x00000000febc0000 0x00000000febc3fff 0x0000000000040200\n")
    (d / "config").write_bytes(_config([(0x40, msix)], bar0=0xFEBC0000))
    fn = sysfs_function(d, msix_relocation=True)
    assert [b.size for b in fn.bars] == [0x4000]
    assert fn.relocation_problem is not None and "BAR0, a 32-bit BAR" in fn.relocation_problem
    assert sysfs_function(d).relocation_problem is None
    from pyvmm import vmplan
    from pyvmm.config import DeviceConfig, VmConfig

    with pytest.raises(PlanError, match=r"x_msix_relocation=on: its MSI-X table is in BAR0, a 32-bit BAR"):
        vmplan.plan_items(VmConfig(devices=(DeviceConfig(d, x_msix_relocation=True),)))
    assert vmplan.plan_items(VmConfig(devices=(DeviceConfig(d),)))[1][0].bars[0].size == 0x4000


def test_sysfs_function_finds_the_nic_msi_in_the_clique_place(tmp_path: Path) -> None:
    pm = bytes([0x01, 0, 0x23, 0])
    msi = bytes([0x05, 0, 0x80, 0])  # 64-bit address, no per-vector mask: 0xD0-0xDD
    d = _function(tmp_path, NIC_RESOURCE, _config([(0xC8, pm), (0xD0, msi)], bar0=0))
    fn = sysfs_function(d, clique=0)
    assert fn.clique_problem is not None
    assert "0xd4-0xdb" in fn.clique_problem and "MSI capability at 0xd0 (0xd0-0xdd)" in fn.clique_problem


def test_clique_patches_refuse_an_occupied_0xd4_and_link_otherwise() -> None:
    msi = bytes([0x05, 0, 0x80, 0])
    taken = _config([(0xC8, bytes([0x01, 0, 0x23, 0])), (0xD0, msi)])
    read = caps.bytes_reader(taken)
    with pytest.raises(caps.CapabilityConflict, match="MSI capability at 0xd0"):
        caps.gpudirect_clique_patches(caps.scan(read, 256), 5, read)
    free = _config([(0x40, bytes([0x01, 0, 0x23, 0])), (0x60, bytes([0x11, 0, 0, 0]))])
    read = caps.bytes_reader(free)
    patches = caps.gpudirect_clique_patches(caps.scan(read, 256), 5, read)
    patched = bytearray(free)
    for offset in range(0, 256, 4):
        dword = int.from_bytes(patched[offset:offset + 4], "little")
        value = caps.apply_patches({p.offset: [p] for p in patches}, offset, dword)
        patched[offset:offset + 4] = value.to_bytes(4, "little")
    assert patched[0xD4:0xDC].hex(" ") == "09 00 08 50 32 50 28 00"
    assert patched[0x61] == 0xD4


def test_a_weight_that_only_gets_past_this_device_says_so() -> None:
    gpu = (BarInfo(0, BarKind.MEM32, 32 * MiB, True), BarInfo(6, BarKind.ROM, MiB))
    items = [PlanItem(f"--device gpu{i}", i % 96, None, gpu) for i in range(40)]
    with pytest.raises(PlanError) as info:
        plan_pci(items, [(1, 1)] * 96, RAM, 46)
    text = str(info.value)
    assert text.startswith("--device gpu0: BAR0 (32-bit memory, 32 MiB) does not fit")
    assert "mmio32_aperture_weight=6 (then see what else does not fit)" in text
