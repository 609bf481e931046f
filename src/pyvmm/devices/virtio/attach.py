"""Plugging `--disk` devices into a VM: image, virtio-blk, transport, MSI-X vectors, PCI slot, MMIO range.

Kept here so the VM builder only calls `attach_disks` and closes what it returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

from pyvmm.config import DiskConfig
from pyvmm.devices.virtio.block import BlockParams, VirtioBlock
from pyvmm.devices.virtio.pci import (
    VIRTIO_BAR64_ALIGN,
    VIRTIO_BAR_INDEX,
    VIRTIO_BAR_SIZE,
    VirtioPciDevice,
    vector_count,
)
from pyvmm.interrupts import IrqfdMsiVectors, MsiRouter
from pyvmm.kvm.system import Vm
from pyvmm.memory import GuestMemory
from pyvmm.pci.bar import BarInfo, BarKind
from pyvmm.pci.bus import PciSegment
from pyvmm.pci.device import BarBusAdapter


class MmioBus(Protocol):
    def insert(self, base: int, length: int, device: BarBusAdapter) -> None: ...


def uses_64bit_bar(segment: int, hotplug: bool = False) -> bool:
    """docs/pci.md#virtio-blk-bars: only a boot-time virtio-blk on segment 0 gets a 32-bit BAR."""
    return segment != 0 or hotplug


def disk_bars(disk: DiskConfig) -> list[BarInfo]:
    """The BARs a --disk's virtio-blk asks for (what VirtioPciDevice declares), for planning."""
    if uses_64bit_bar(disk.pci_segment):
        return [BarInfo(VIRTIO_BAR_INDEX, BarKind.MEM64, VIRTIO_BAR_SIZE, align=VIRTIO_BAR64_ALIGN)]
    return [BarInfo(VIRTIO_BAR_INDEX, BarKind.MEM32, VIRTIO_BAR_SIZE)]


def attach_disks(
    disks: Sequence[DiskConfig],
    *,
    memory: GuestMemory,
    vm: Vm,
    router: MsiRouter,
    segments: Sequence[PciSegment],
    mmio_bus: MmioBus,
) -> list[VirtioPciDevice]:
    """Open every image (DiskImageError: missing, unreadable, locked) and plug one virtio-blk each.

    Explicit `pci_device_id` slots should already be reserved on their segments. On failure everything
    attached so far is closed again (images unlocked) before the exception propagates.
    """
    attached: list[VirtioPciDevice] = []
    try:
        for n, disk in enumerate(disks):
            params = BlockParams(num_queues=disk.num_queues, queue_size=disk.queue_size, serial=disk.serial)
            blk = VirtioBlock.open(str(disk.path), readonly=disk.readonly, direct=disk.direct, params=params)
            try:
                vectors = IrqfdMsiVectors(router, vm, vector_count(blk))
            except BaseException:
                blk.close()
                raise
            dev = VirtioPciDevice(blk, memory, vectors, bar64=uses_64bit_bar(disk.pci_segment), ioeventfds=vm,
                                  name=f"virtio-blk-{disk.id or n}")
            attached.append(dev)  # closed below if anything later fails
            segment = segments[disk.pci_segment]
            slot = segment.add_device(dev, disk.pci_device_id)
            for p in segment.placements(slot):
                mmio_bus.insert(p.address, p.size, BarBusAdapter(dev, p.index))
    except BaseException:
        for dev in reversed(attached):
            with contextlib.suppress(Exception):
                dev.close()
        raise
    return attached
