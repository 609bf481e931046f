"""pyvmm.vfio on the lab's real vfio-pci (issue 5): container/group/device, the device model on a KVM VM
without vCPUs, DMA into mapped guest RAM, interrupts reaching VFIO, refusals, and giving devices back.

One lab run carries the SD reader (00:03.0, INTx only), the NVMe drive (00:04.0, MSI-X) and the display +
audio pair of one IOMMU group (00:05.0 / 00:05.1)."""

from __future__ import annotations

import json

import pytest
from helpers.lab_script import sections

pytestmark = pytest.mark.lab

SCRIPT = r'''
import json, os, sys, time
from pyvmm import layout
from pyvmm.devices.bus import IoBus
from pyvmm.interrupts import MsiRouter
from pyvmm.kvm.memslots import KvmMemorySlots
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vfio_device import KvmVfioDevice
from pyvmm.memory import GuestMemory
from pyvmm.pci.apertures import mmio64_aperture, segment_windows
from pyvmm.pci.platform import PciPlatform
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.passthrough import VfioPassthrough

SD, NVME = "/sys/bus/pci/devices/0000:00:03.0/", "/sys/bus/pci/devices/0000:00:04.0"
RAM = 64 << 20


def interrupts(bdf):
    out = {}
    for line in open("/proc/interrupts"):
        if bdf in line:
            parts = line.split()
            out[parts[-1]] = sum(int(p) for p in parts[1:] if p.isdigit())
    return out


def facts(model):
    dev = model.device
    return {
        "regions": {i: [r.size, int(r.flags), r.msix_mappable, r.sparse_areas is not None]
                    for i, r in dev.regions.items() if r.size},
        "irqs": {i: q.count for i, q in dev.irqs.items()},
        "reset": (lambda r: r.kind.value if r.kind else None)(vfio.resets[dev.name]),
        "ids": hex(model.config_read(0, 4)),
        "header": model.config_read(0x0E, 1),
        "bars": [[b.index, b.kind.name, b.size] for b in model.bars()],
        "areas": [[a.bar, a.offset, a.size] for a in model.mapped_areas],
        "guest": [[gpa, size] for gpa, size, _ in model.guest_mappings()],
        "bar_regs": [hex(model.config_read(0x10 + 4 * i, 4)) for i in range(6)],
        "host_bar_regs": [hex(dev.read_config(0x10 + 4 * i, 4)) for i in range(6)],
        "intx": model.intx_gsi,
        "pin_line": hex(model.config_read(0x3C, 2)),
        "msix": None if model.msix is None else [model.msix.table_size, model.msix.table_bir,
                                                 model.msix.table_offset],
    }


kvm = Kvm()
vm = kvm.create_vm()
vm.create_irqchip()
memory = GuestMemory.for_size(RAM)
slots = KvmMemorySlots(vm)
for region in memory.regions:
    slots.map_memory(region.gpa, region.size, region.host_address)
router = MsiRouter(vm)
platform = PciPlatform(segment_windows([1], [1], mmio64_aperture(RAM, 39)), pio_bus=IoBus("pio", 1 << 16),
                       mmio_bus=IoBus("mmio"), memory_slots=slots)
vfio = VfioPassthrough(KvmVfioDevice(vm), vm, router, memory, slots, p2p_dma=True)
report = {}

sd, _ = vfio.add_device(SD, platform, allow_no_reset=True)  # it has no reset (checked below)
nvme, _ = vfio.add_device(NVME, platform)
report["groups"] = sorted(vfio.groups)
report["dma"] = {hex(k): hex(v) for k, v in vfio.container.mappings.items()}
report["sd"], report["nvme"] = facts(sd), facts(nvme)
report["irq_after_add"] = {"sd": interrupts("0000:00:03.0"), "nvme": interrupts("0000:00:04.0")}
report["sd_version"] = hex(sd.bar_read(0, 0xFE, 2))

# NVMe through the trapped path (pread/pwrite on the device fd) and through the mapping.
cap_trapped = nvme.bar_read(0, 0, 8)
import ctypes
(area,) = [a for a in nvme.mapped_areas if a.offset == 0]
cap_mapped = ctypes.c_uint64.from_address(area.host_address).value
report["nvme_cap_mapped_equals_trapped"] = cap_mapped == cap_trapped
report["nvme_version"] = hex(nvme.bar_read(0, 0x8, 4))

# MSI-X: program entry 0 (unmasked) to the local APIC window, then enable: VFIO allocates host vectors.
tbl = nvme.msix.table_offset
nvme.bar_write(0, tbl, 8, 0xFEE0_0000)
nvme.bar_write(0, tbl + 8, 4, 0x31)
nvme.bar_write(0, tbl + 12, 4, 0)
cap = [off for off, cid in nvme.caps.standard if cid == 0x11][0]
nvme.config_write(cap + 2, 2, 0x8000 | (nvme.config_read(cap + 2, 2) & 0x7FF))
report["irq_msix_on"] = interrupts("0000:00:04.0")

# Bus mastering on, then an Identify Controller through the admin queues in guest RAM (IOVA = GPA).
nvme.config_write(0x04, 2, nvme.config_read(0x04, 2) | 0x6)
asq, acq, buf = 0x10_0000, 0x11_0000, 0x12_0000
nvme.bar_write(0, 0x14, 4, 0)  # CC.EN = 0
deadline = time.time() + 10
while nvme.bar_read(0, 0x1C, 4) & 1 and time.time() < deadline:
    time.sleep(0.01)
nvme.bar_write(0, 0x24, 4, (1 << 16) | 1)  # AQA: 2-entry admin queues
nvme.bar_write(0, 0x28, 8, asq)
nvme.bar_write(0, 0x30, 8, acq)
nvme.bar_write(0, 0x14, 4, (4 << 20) | (6 << 16) | 1)  # IOCQES 16 B, IOSQES 64 B, enable
while not nvme.bar_read(0, 0x1C, 4) & 1 and time.time() < deadline:
    time.sleep(0.01)
sqe = bytearray(64)
sqe[0] = 0x06  # Identify
sqe[2] = 0x01  # command id 1
sqe[24:32] = buf.to_bytes(8, "little")  # PRP1
sqe[40:44] = (1).to_bytes(4, "little")  # CNS 1: controller
memory.write(asq, bytes(sqe))
before = interrupts("0000:00:04.0")
nvme.bar_write(0, 0x1000, 4, 1)  # admin SQ tail doorbell
while not memory.read_u32(acq + 12) >> 16 & 1 and time.time() < deadline:
    time.sleep(0.01)
time.sleep(0.2)
status = memory.read_u32(acq + 12) >> 17
ident = memory.read(buf, 4096)
report["identify"] = {
    "status": status,
    "serial": ident[4:24].decode(errors="replace").strip(),
    "model": ident[24:64].decode(errors="replace").strip(),
}
after = interrupts("0000:00:04.0")
report["msix_counts"] = {k: [before.get(k, 0), v] for k, v in after.items()}

# MSI-X off again: VFIO's vectors go, INTx is armed again.
nvme.config_write(cap + 2, 2, nvme.config_read(cap + 2, 2) & 0x7FF)
report["irq_msix_off"] = interrupts("0000:00:04.0")

def fresh():
    """Another VM (KVM allows one VFIO pseudo-device per VM) with its own container."""
    other = kvm.create_vm()
    return VfioPassthrough(KvmVfioDevice(other), other, MsiRouter(other))


# A second container cannot take the groups while this one holds them.
try:
    fresh().open_device(SD)
    report["busy"] = "opened twice"
except VfioError as e:
    report["busy"] = str(e)

vfio.close()
report["irq_after_close"] = {"sd": interrupts("0000:00:03.0"), "nvme": interrupts("0000:00:04.0")}
# Everything was released: the groups open again in a fresh container.
again = fresh()
report["reopen"] = [again.open_device(p).name for p in (SD, NVME)]
again.close()

# Refusals, each one line.
for key, path in (("not_vfio", "/sys/bus/pci/devices/0000:00:05.1/"), ("not_pci", "/sys/bus/pci"),
                  ("display_alone", "/sys/bus/pci/devices/0000:00:05.0/")):
    try:
        fresh().open_device(path)
        report[key] = "accepted"
    except VfioError as e:
        report[key] = str(e)
print("REPORT " + json.dumps(report))
print(json.dumps(report, indent=1))
'''

COMMAND = (
    r"""
sec() { echo "=== $1"; }
drv() { l=$(readlink "/sys/bus/pci/devices/$1/driver") && basename "$l" || echo none; }
cat > "$TMPDIR/vfio_host.py" <<'PY'
"""
    + SCRIPT
    + r"""
PY
pyvmm-host bind 0000:00:03.0 >/dev/null && pyvmm-host bind 0000:00:04.0 >/dev/null || echo bind-failed
# The display alone on vfio-pci by hand; its audio sibling stays on snd_hda_intel.
echo vfio-pci > /sys/bus/pci/devices/0000:00:05.0/driver_override
VGA=/sys/bus/pci/devices/0000:00:05.0
[ -e $VGA/driver ] && echo 0000:00:05.0 > $VGA/driver/unbind
echo 0000:00:05.0 > /sys/bus/pci/drivers_probe
sec run; python "$TMPDIR/vfio_host.py"; echo "rc=$?"
sec drivers; echo "$(drv 0000:00:05.0) $(drv 0000:00:05.1)"
sec give-back
echo > /sys/bus/pci/devices/0000:00:05.0/driver_override
echo 0000:00:05.0 > /sys/bus/pci/devices/0000:00:05.0/driver/unbind
pyvmm-host unbind 0000:00:03.0 >/dev/null; pyvmm-host unbind 0000:00:04.0 >/dev/null
echo "$(drv 0000:00:03.0) $(drv 0000:00:04.0)"
i=0
while { [ ! -b /dev/mmcblk0 ] || [ ! -b /dev/nvme0n1 ]; } && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "sd=$(sha256sum /dev/mmcblk0 | cut -d' ' -f1) want=$PYVMM_LAB_SD_SHA256"
echo "nvme=$(sha256sum /dev/nvme0n1 | cut -d' ' -f1) want=$PYVMM_LAB_NVME_SHA256"
"""
)


_RUN: list[tuple[dict, dict[str, str], str]] = []


@pytest.fixture
def lab_run(lab) -> tuple[dict, dict[str, str], str]:
    """One lab run shared by the tests of this module (each check reads its part of the report)."""
    if not _RUN:
        proc = lab(COMMAND, devices="sd,nvme,gpu-audio", timeout=600)
        out = sections(proc.stdout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
        assert lines and "rc=0" in out.get("run", ""), proc.stdout
        _RUN.append((json.loads(lines[-1][7:]), out, proc.stdout))
    return _RUN[0]


def test_sd_reader_is_intx_only_and_armed_with_an_irqfd(lab_run) -> None:
    report, _, log = lab_run
    sd = report["sd"]
    assert sd["ids"] == "0x71b36" and sd["header"] == 0
    assert sd["irqs"]["0"] == 1 and sd["irqs"]["1"] == 0 and sd["irqs"]["2"] == 0, sd
    assert sd["msix"] is None and sd["reset"] is None  # no reset mechanism, as QEMU also says
    assert sd["regions"]["0"][0] == 0x100 and sd["regions"]["7"][0] == 0x100
    # The 256-byte BAR is mmappable: one page mapped, at a page-aligned guest address.
    assert sd["areas"] == [[0, 0, 4096]] and sd["guest"][0][0] % 4096 == 0
    assert sd["intx"] in range(5, 13) and sd["pin_line"] == hex(0x100 | sd["intx"])
    assert any(name.startswith("vfio-intx") for name in report["irq_after_add"]["sd"]), log
    assert report["sd_version"] not in ("0xffff", "0x0")


def test_nvme_regions_msix_and_shadow_bars(lab_run) -> None:
    report, _, _log = lab_run
    nvme = report["nvme"]
    assert nvme["ids"] == "0x101b36" and nvme["reset"] == "function reset"
    assert nvme["irqs"]["2"] > 1 and nvme["msix"][0] == nvme["irqs"]["2"], nvme
    _size, _flags, msix_mappable, _sparse = nvme["regions"]["0"]
    assert msix_mappable and nvme["regions"]["7"][0] == 4096
    table = nvme["msix"][2]
    # Everything of BAR0 except the MSI-X pages is mapped into the guest.
    assert [0, 0, table] in nvme["areas"] and all(
        a[1] + a[2] <= table or a[1] >= table + 4096 for a in nvme["areas"]
    )
    # Guest BAR registers come from the shadow; the host's are untouched.
    assert nvme["bar_regs"] != nvme["host_bar_regs"]
    assert report["nvme_cap_mapped_equals_trapped"] is True
    assert report["nvme_version"] in ("0x10400", "0x10300", "0x10200", "0x20000")
    assert any("vfio-msix" in k for k in report["irq_msix_on"]), report["irq_msix_on"]
    assert not any("vfio-intx" in k for k in report["irq_msix_on"])
    assert any("vfio-intx" in k for k in report["irq_msix_off"]) and not any(
        "vfio-msix" in k for k in report["irq_msix_off"]
    )


def test_dma_into_guest_ram_and_msix_interrupt(lab_run) -> None:
    report, _, _log = lab_run
    # Guest RAM at IOVA 0, and every mapped BAR area at its guest address (peer-to-peer DMA).
    bar_areas = {hex(gpa): hex(size) for dev in ("sd", "nvme") for gpa, size in report[dev]["guest"]}
    assert report["dma"] == {"0x0": hex(64 << 20), **bar_areas}
    ident = report["identify"]
    assert ident["status"] == 0 and ident["serial"] == "lab0" and "QEMU NVMe" in ident["model"], ident
    fired = [v for k, v in report["msix_counts"].items() if "vfio-msix" in k]
    assert any(after > before for before, after in fired), report["msix_counts"]


def test_groups_are_exclusive_released_and_refusals_are_one_line(lab_run) -> None:
    report, out, _ = lab_run
    assert "cannot open IOMMU group" in report["busy"]
    assert not any("vfio" in k for d in report["irq_after_close"].values() for k in d)
    assert report["reopen"] == ["0000:00:03.0", "0000:00:04.0"]
    assert (
        report["not_vfio"] == "0000:00:05.1 is bound to snd_hda_intel, not vfio-pci: run `pyvmm-host bind "
        "0000:00:05.1` first"
    )
    assert "not a PCI function" in report["not_pci"]
    alone = report["display_alone"]
    assert "\n" not in alone and "not viable" in alone and "0000:00:05.1 is on snd_hda_intel" in alone
    assert "pyvmm-host bind --group 0000:00:05.0" in alone
    assert out["drivers"].split() == ["vfio-pci", "snd_hda_intel"]


def test_devices_work_on_their_native_drivers_afterwards(lab_run) -> None:
    _, out, _ = lab_run
    lines = out["give-back"].splitlines()
    assert lines[0] == "sdhci-pci nvme", out["give-back"]
    for line in lines[1:]:
        got, want = (part.split("=")[1] for part in line.split())
        assert got == want and len(want) == 64, line
