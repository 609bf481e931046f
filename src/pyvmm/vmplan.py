"""The PCI plan of one VmConfig: its devices as planning items (BAR sizes from sysfs, never from VFIO), and
the `--dry-run` report. Used by the builder (before it opens anything) and by `pyvmm --dry-run`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.boot import guest_phys_bits
from pyvmm.config import ConsoleMode, VmConfig, aperture_weights, net_label
from pyvmm.pci.planning import PciPlan, PlanError, PlanItem, format_plan, plan_pci

if TYPE_CHECKING:
    from pyvmm.vfio.pci import SysfsFunction

CPUINFO = Path("/proc/cpuinfo")


def device_label(path: Path) -> str:
    return f"--device path={path}"


CONSOLE_LABEL = "--console"
RNG_LABEL = "--rng"


def plan_items(config: VmConfig) -> tuple[list[PlanItem], list[SysfsFunction]]:
    """The builder's order, as cloud-hypervisor's (docs/pci.md#slot-assignment): the virtio-console (unless
    --console off), disks, nets, the virtio-rng, the virtio-fs devices (--fs), the virtio-vsock (--vsock),
    then devices in command-line order, with the BARs each asks for.

    A device whose sysfs files cannot be read, or whose config space has no room for the GPUDirect clique
    capability it asks for, is a PlanError.
    """
    # Imported here: a VM without devices starts without loading the VFIO stack.
    from pyvmm.devices.virtio.attach import disk_bars, virtio_bars

    items: list[PlanItem] = []
    console = config.console
    if console.mode is not ConsoleMode.OFF:
        items.append(PlanItem(CONSOLE_LABEL, console.pci_segment, console.pci_device_id, tuple(virtio_bars()),
                              "virtio-console"))
    items += [
        PlanItem(d.label, d.pci_segment, d.pci_device_id, tuple(disk_bars(d)), "virtio-blk")
        for d in config.disks
    ]
    items += [
        PlanItem(net_label(n), n.pci_segment, n.pci_device_id, tuple(virtio_bars()), "virtio-net")
        for n in config.nets
    ]
    items.append(PlanItem(RNG_LABEL, 0, None, tuple(virtio_bars()), "virtio-rng"))
    items += [PlanItem(f.label, f.pci_segment, f.pci_device_id, tuple(virtio_bars()), "virtio-fs")
              for f in config.fs]
    if config.vsock is not None:
        vsock = config.vsock
        items.append(PlanItem(f"--vsock socket={vsock.socket}", vsock.pci_segment, vsock.pci_device_id,
                              tuple(virtio_bars()), "virtio-vsock"))
    functions: list[SysfsFunction] = []
    if config.devices:
        from pyvmm.vfio.pci import sysfs_function
    for dev in config.devices:
        label = device_label(dev.path)
        try:
            fn = sysfs_function(dev.path, dev.x_nv_gpudirect_clique, msix_relocation=dev.x_msix_relocation)
        except OSError as exc:
            raise PlanError(f"{label}: cannot read the function's BARs from sysfs: {exc}") from exc
        if fn.clique_problem is not None:
            clique = dev.x_nv_gpudirect_clique
            raise PlanError(f"{label}: x_nv_gpudirect_clique={clique}: {fn.clique_problem}")
        if fn.relocation_problem is not None:
            raise PlanError(f"{label}: x_msix_relocation=on: {fn.relocation_problem}; remove the key")
        functions.append(fn)
        items.append(PlanItem(label, dev.pci_segment, dev.pci_device_id, fn.bars,
                              f"host {fn.name} {fn.vendor_device}"))
    return items, functions


def vm_plan(config: VmConfig, phys_bits: int) -> PciPlan:
    """Where the guest will see every BAR, for a guest with `phys_bits` physical address bits."""
    items, _ = plan_items(config)
    return plan_pci(items, aperture_weights(config), config.memory.size, phys_bits)


def host_phys_bits_from_cpuinfo(cpuinfo: Path | None = None) -> int | None:
    """The host's physical address width (`address sizes : N bits physical`), without opening KVM."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    match = re.search(r"^address sizes\s*:\s*(\d+) bits physical", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def dry_run_report(config: VmConfig) -> str:
    """What `pyvmm --dry-run` prints; PlanError when the layout cannot be built."""
    host_bits = host_phys_bits_from_cpuinfo()
    phys_bits = guest_phys_bits(host_bits, config.cpus.max_phys_bits)
    items, functions = plan_items(config)
    plan = plan_pci(items, aperture_weights(config), config.memory.size, phys_bits)

    def header() -> list[str]:
        lines = [
            "pyvmm --dry-run: the command line is valid; nothing was started (no KVM, no VFIO).",
            f"guest physical address bits: {phys_bits} (host: {host_bits or 'unknown'}, "
            f"--cpus max_phys_bits={config.cpus.max_phys_bits})",
        ]
        for dev, fn in zip(config.devices, functions, strict=True):
            if fn.driver != "vfio-pci" and not dev.managed:
                driver = fn.driver or "no driver"
                lines.append(f"note: {device_label(dev.path)}: {fn.name} is bound to {driver}; "
                             f"run `pyvmm-host bind {fn.name}` (or add managed=on) before starting the VM")
            if not fn.full_config:
                lines.append(f"note: {device_label(dev.path)}: only 64 bytes of config space are readable "
                             "(not root): MSI-X relocation and capability checks were skipped")
        return lines

    return format_plan(plan, header)
