"""The emulated PCI devices a lab can carry, by name, and the QEMU options that create them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LabDevice:
    name: str
    stands_for: str
    native_driver: str
    functions: int = 1  # PCI functions in one slot (a multi-function device takes them all)


CATALOGUE: dict[str, LabDevice] = {
    d.name: d
    for d in (
        LabDevice("sd", "PCI SD/MMC card reader with a card (1b36:0007), INTx only", "sdhci-pci"),
        LabDevice(
            "sd-port",
            "the same card reader behind its own PCIe root port (bus 01, as on real hosts): it can be reset "
            "(a bus reset), unlike the reader on the root bus",
            "sdhci-pci",
        ),
        LabDevice(
            "gpu-audio",
            "GPU with its HDMI audio function: display 1234:1111 + audio 8086:293e in one IOMMU group",
            "bochs-drm (display), snd_hda_intel (audio)",
            functions=2,
        ),
        LabDevice("nvme", "NVMe drive (1b36:0010) with MSI-X", "nvme"),
        LabDevice("nic", "Intel 82574L NIC (8086:10d3, e1000e), MSI capability at 0xD0", "e1000e"),
        LabDevice("edu", "QEMU edu device (1234:11e8): MSI and a DMA engine", "none"),
        LabDevice("vga16", "display with a 16 MiB 32-bit prefetchable BAR0 (1234:1111)", "none"),
        LabDevice("vga128", "display with a 128 MiB 32-bit prefetchable BAR0 (1234:1111)", "none"),
        LabDevice("ivshmem", "shared memory device with a 64 MiB 64-bit prefetchable BAR2", "none"),
        LabDevice("testdev", "PCI test device with an I/O-port BAR (1b36:0005)", "none"),
    )
}

DEFAULT_DEVICES = ("sd", "gpu-audio", "nvme", "nic", "edu")

FIRST_DEVICE_SLOT = 3  # 00.0 host bridge, 01.0 free, 02.0 the lab's own virtio-9p root device
NINEP_SLOT = 2


class DeviceSpecError(ValueError):
    pass


def parse_device_spec(spec: str | None) -> list[str]:
    """`sd,nvme,vga16,vga16` -> names; `None` -> the default set; `none` or '' -> no devices."""
    if spec is None:
        return list(DEFAULT_DEVICES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in CATALOGUE:
            known = ", ".join(CATALOGUE)
            raise DeviceSpecError(f"--devices: unknown lab device {name!r} (known: {known})")
    return names


@dataclass
class QemuDeviceArgs:
    """QEMU options for the chosen devices, with slots assigned in order."""

    args: list[str] = field(default_factory=list)
    slots: dict[int, str] = field(default_factory=dict)  # slot -> device name


def qemu_device_args(names: list[str], sd_image: str, nvme_image: str) -> QemuDeviceArgs:
    """QEMU options for `names`; disk-backed devices use copy-on-write snapshots of the images."""
    out = QemuDeviceArgs()
    slot = FIRST_DEVICE_SLOT
    counts: dict[str, int] = {}
    for name in names:
        n = counts.get(name, 0)
        counts[name] = n + 1
        uid = f"{name.replace('-', '')}{n}"
        addr = f"addr={slot:#04x}.0"
        if name in ("sd", "sd-port"):
            drive = f"{name.replace('-', '')}img{n}"  # sdimg0, sdportimg0
            reader = f"sdhci-pci,id={uid},{addr}"
            if name == "sd-port":
                # Alone below a root port, the reader has a secondary bus reset (QEMU's sdhci-pci has no FLR
                # and no power management reset, so on the root bus it has none).
                out.args += ["-device", f"pcie-root-port,id={uid}p,chassis={10 + n},{addr}"]
                reader = f"sdhci-pci,id={uid},bus={uid}p,addr=0x0"
            out.args += [
                "-drive", f"file={sd_image},if=none,id={drive},format=raw,snapshot=on",
                "-device", reader,
                "-device", f"sd-card,drive={drive}",
            ]
        elif name == "gpu-audio":
            out.args += [
                "-device", f"secondary-vga,id={uid}v,{addr},multifunction=on",
                "-device", f"ich9-intel-hda,id={uid}a,addr={slot:#04x}.1",
            ]
        elif name == "nvme":
            drive = f"nvimg{n}"
            out.args += [
                "-drive", f"file={nvme_image},if=none,id={drive},format=raw,snapshot=on",
                "-device", f"nvme,drive={drive},serial=lab{n},id={uid},{addr}",
            ]
        elif name == "nic":
            # A hub port with nothing else on the hub: the NIC has a peer but no network at all.
            out.args += [
                "-netdev", f"hubport,id={uid}n,hubid={n}",
                "-device", f"e1000e,netdev={uid}n,id={uid},{addr}",
            ]
        elif name == "edu":
            out.args += ["-device", f"edu,dma_mask=0xffffffffffffffff,id={uid},{addr}"]
        elif name == "vga16":
            out.args += ["-device", f"secondary-vga,vgamem_mb=16,id={uid},{addr}"]
        elif name == "vga128":
            out.args += ["-device", f"secondary-vga,vgamem_mb=128,id={uid},{addr}"]
        elif name == "ivshmem":
            out.args += [
                "-object", f"memory-backend-ram,id={uid}m,size=64M",
                "-device", f"ivshmem-plain,memdev={uid}m,id={uid},{addr}",
            ]
        elif name == "testdev":
            out.args += ["-device", f"pci-testdev,id={uid},{addr}"]
        out.slots[slot] = name
        slot += 1
        if slot == 0x1F:  # q35's LPC/SATA/SMBus functions live in slot 0x1f
            raise DeviceSpecError("--devices: too many lab devices (at most 28)")
    return out
