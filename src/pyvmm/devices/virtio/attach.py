"""Plugging virtio devices into a VM: `--disk` (image, virtio-blk), `--net` (tap + vhost-net), `--fs`
(vhost-user virtio-fs), `--console` and `--rng`; each gets its transport, MSI-X vectors, PCI slot and MMIO
range.

Kept here so the VM builder only calls `attach_disks` / `attach_virtio` and closes what they return.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.config import NET_DEFAULT_IP, NET_DEFAULT_MASK, DiskConfig, FsConfig, NetConfig, net_label
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.pci import (
    VIRTIO_BAR64_ALIGN,
    VIRTIO_BAR_INDEX,
    VIRTIO_BAR_SIZE,
    VirtioPciDevice,
    vector_count,
)
from pyvmm.hypervisor import Ioeventfds, Irqfds
from pyvmm.interrupts import IrqfdMsiVectors, MsiRouter
from pyvmm.memory import GuestMemory
from pyvmm.pci.bar import BarInfo, BarKind
from pyvmm.pci.platform import PciAddress, PciPlatform

if TYPE_CHECKING:
    from pyvmm.devices.virtio.vhost_user_blk import VhostUserBlock
    from pyvmm.vhost.storage_daemon import DiskService
    from pyvmm.vhost.user import VhostUserFrontend

log = logging.getLogger("pyvmm")


def uses_64bit_bar(segment: int, hotplug: bool = False) -> bool:
    """docs/pci.md#virtio-blk-bars: only a boot-time virtio-blk on segment 0 gets a 32-bit BAR."""
    return segment != 0 or hotplug


def disk_bars(disk: DiskConfig) -> list[BarInfo]:
    """The BARs a --disk's virtio-blk asks for (what VirtioPciDevice declares), for planning."""
    if uses_64bit_bar(disk.pci_segment):
        return [BarInfo(VIRTIO_BAR_INDEX, BarKind.MEM64, VIRTIO_BAR_SIZE, align=VIRTIO_BAR64_ALIGN)]
    return [BarInfo(VIRTIO_BAR_INDEX, BarKind.MEM32, VIRTIO_BAR_SIZE)]


def virtio_bars() -> list[BarInfo]:
    """The BAR of every other virtio device (console, rng): 64-bit, as cloud-hypervisor gives them
    (docs/pci.md#virtio-blk-bars)."""
    return [BarInfo(VIRTIO_BAR_INDEX, BarKind.MEM64, VIRTIO_BAR_SIZE, align=VIRTIO_BAR64_ALIGN)]


def attach_virtio(
    device: VirtioDevice,
    *,
    segment: int,
    slot: int | None,
    name: str,
    memory: GuestMemory,
    platform: PciPlatform,
    router: MsiRouter,
    irqfds: Irqfds,
    ioeventfds: Ioeventfds,
) -> VirtioPciDevice:
    """Plug `device` (which the transport then owns) with a 64-bit BAR; on failure it is closed again."""
    try:
        vectors = IrqfdMsiVectors(router, irqfds, vector_count(device))
    except BaseException:
        device.close()
        raise
    dev = VirtioPciDevice(device, memory, vectors, bar64=True, ioeventfds=ioeventfds, name=name)
    try:
        platform.attach(dev, segment, slot)
    except BaseException:
        with contextlib.suppress(Exception):
            dev.close()
        raise
    return dev


def open_disk(
    disk: DiskConfig,
    *,
    name: str,
    memory: GuestMemory,
    router: MsiRouter,
    irqfds: Irqfds,
    ioeventfds: Ioeventfds | None,
    hotplug: bool = False,
    service: DiskService | None = None,
) -> VirtioPciDevice:
    """Open and lock `disk`'s image (DiskImageError: missing, unreadable, locked), or connect to its
    vhost-user backend (VhostUserError), and put a virtio-blk transport over it, not yet plugged; the
    transport owns the image or the connection (and the daemon pyvmm started for it). `service`: who serves
    it (vhost/storage_daemon.py; None: the worker, or the user's vhost-user backend)."""
    # Imported here, not at the top: a VM without disks (its virtio-rng and console come through this
    # module) does not load the disk stack at start-up (docs/ARCHITECTURE.md#start-up).
    from pyvmm.devices.virtio.block import BlockParams, VirtioBlock
    from pyvmm.vhost.storage_daemon import DiskServer, DiskService, describe

    if service is None:
        if disk.vhost_user:
            service = DiskService(DiskServer.VHOST_USER)
        else:
            why = "a hot-plugged disk: pyvmm starts no program once the guest runs" if hotplug else ""
            service = DiskService(DiskServer.WORKER, why)
    blk: VirtioDevice
    log.info("%s: served by %s", disk.label, describe(disk, service))
    if disk.vhost_user:
        blk = _open_vhost_user(disk.socket, disk, memory)
    elif service.server is DiskServer.STORAGE_DAEMON:
        blk = _open_with_daemon(service, disk, memory)
    else:
        params = BlockParams(num_queues=disk.num_queues, queue_size=disk.queue_size, serial=disk.serial)
        blk = VirtioBlock.open(str(disk.path), readonly=disk.readonly, direct=disk.direct, params=params)
    try:
        vectors = IrqfdMsiVectors(router, irqfds, vector_count(blk), name)
    except BaseException:
        blk.close()
        raise
    try:
        return VirtioPciDevice(blk, memory, vectors, bar64=uses_64bit_bar(disk.pci_segment, hotplug),
                               ioeventfds=ioeventfds, name=name)
    except BaseException:
        blk.close()
        vectors.close()
        raise


def _open_with_daemon(service: DiskService, disk: DiskConfig, memory: GuestMemory) -> VirtioDevice:
    """Lock the image as the worker would (the same refusals), start a qemu-storage-daemon serving it and
    connect to it; the device owns the lock and the daemon (docs/virtio-blk.md#who-serves-a-disk)."""
    from pyvmm.devices.virtio.image import RawImage
    from pyvmm.vhost.spawner import start_daemon

    assert service.binary is not None
    image = RawImage(str(disk.path), readonly=disk.readonly, direct=disk.direct)
    try:
        supervised = start_daemon(service.binary, disk, disk.label, service.poll)
    except BaseException:
        image.close()
        raise
    try:
        device = _open_vhost_user(supervised.socket, disk, memory)
    except BaseException:
        supervised.close()
        image.close()
        raise
    device.hold(supervised, image, cause=supervised.hangup_cause)  # stopped, unlocked after the connection
    return device


def _open_vhost_user(socket: Path | None, disk: DiskConfig, memory: GuestMemory) -> VhostUserBlock:
    """Connect to the disk's backend on `socket` and negotiate (docs/virtio-blk.md#vhost-user-blk); errors
    name the disk."""
    from pyvmm.devices.virtio.vhost_user_blk import VhostUserBlkParams, VhostUserBlock
    from pyvmm.errors import in_context
    from pyvmm.vhost.user import VhostUserError

    try:
        frontend = _connect_vhost_user(socket, memory)
    except VhostUserError as exc:
        raise in_context(disk.label, exc) from None
    try:
        return VhostUserBlock(frontend, VhostUserBlkParams(disk.num_queues, disk.queue_size), disk.label)
    except BaseException as exc:
        frontend.close()
        if isinstance(exc, VhostUserError):
            raise in_context(disk.label, exc) from None
        raise


def _connect_vhost_user(socket: Path | None, memory: GuestMemory) -> VhostUserFrontend:
    """A connection to the backend listening on `socket`, when guest RAM can be handed to it."""
    from pyvmm.vhost.user import VhostUserError, VhostUserFrontend

    if any(region.fd is None for region in memory.regions):  # config.validate refuses it first
        raise VhostUserError("guest RAM is not shared memory: add --memory shared=on")
    return VhostUserFrontend.connect(str(socket))


def open_fs(fs: FsConfig, *, name: str, memory: GuestMemory, router: MsiRouter, irqfds: Irqfds,
            ioeventfds: Ioeventfds) -> VirtioPciDevice:
    """Connect to the `--fs` backend (virtiofsd), negotiate (VhostUserError, naming the option) and put a
    virtio-fs transport over it, not yet plugged; the transport owns the connection (docs/virtio-fs.md)."""
    from pyvmm.devices.virtio.vhost_user_fs import VhostUserFs, VhostUserFsParams
    from pyvmm.errors import in_context
    from pyvmm.vhost.user import VhostUserError

    log.info("%s: served by the vhost-user backend on %s (%d request queue(s) of %d; pyvmm sees no request)",
             fs.label, fs.socket, fs.num_queues, fs.queue_size)
    try:
        frontend = _connect_vhost_user(fs.socket, memory)
    except VhostUserError as exc:
        raise in_context(fs.label, exc) from None
    try:
        device = VhostUserFs(frontend, VhostUserFsParams(fs.tag, fs.num_queues, fs.queue_size), fs.label)
    except BaseException as exc:
        frontend.close()
        if isinstance(exc, VhostUserError):
            raise in_context(fs.label, exc) from None
        raise
    try:
        vectors = IrqfdMsiVectors(router, irqfds, vector_count(device), name)
    except BaseException:
        device.close()
        raise
    try:
        return VirtioPciDevice(device, memory, vectors, bar64=True, ioeventfds=ioeventfds, name=name)
    except BaseException:
        device.close()
        vectors.close()
        raise


def attach_fs(
    fses: Sequence[FsConfig],
    *,
    memory: GuestMemory,
    platform: PciPlatform,
    router: MsiRouter,
    irqfds: Irqfds,
    ioeventfds: Ioeventfds,
) -> list[VirtioPciDevice]:
    """Connect to every `--fs` backend and plug one virtio-fs each; on failure everything attached so far is
    unplugged and closed again."""
    attached: list[VirtioPciDevice] = []
    plugged: list[PciAddress] = []
    try:
        for n, fs in enumerate(fses):
            dev = open_fs(fs, name=f"virtio-fs-{fs.id or n}", memory=memory, router=router, irqfds=irqfds,
                          ioeventfds=ioeventfds)
            attached.append(dev)
            plugged.append(platform.attach(dev, fs.pci_segment, fs.pci_device_id))
    except BaseException:
        _unplug_and_close(platform, plugged, attached)
        raise
    return attached


def backend_socket(transport: VirtioPciDevice) -> tuple[int, Callable[[], str]] | None:
    """(socket fd, what stops the VM when the backend hangs up) of a vhost-user device (a disk or a file
    system), for the hang-up watch; None for any other device."""
    from pyvmm.devices.virtio.vhost_user import VhostUserDevice

    device = transport.device
    if not isinstance(device, VhostUserDevice):
        return None
    return device.backend.fileno(), device.hangup_message


def attach_disks(
    disks: Sequence[DiskConfig],
    *,
    memory: GuestMemory,
    platform: PciPlatform,
    router: MsiRouter,
    irqfds: Irqfds,
    ioeventfds: Ioeventfds,
    services: Sequence[DiskService] = (),
) -> list[tuple[VirtioPciDevice, PciAddress]]:
    """Open every image (DiskImageError: missing, unreadable, locked) and plug one virtio-blk each; each
    transport and where it went. `services`: who serves each disk (none: the worker, or the user's
    vhost-user backend).

    Explicit `pci_device_id` slots should already be reserved on the platform. On failure everything
    attached so far is unplugged and closed again (images unlocked) before the exception propagates.
    """
    attached: list[VirtioPciDevice] = []
    plugged: list[PciAddress] = []
    try:
        for n, disk in enumerate(disks):
            service = services[n] if services else None
            dev = open_disk(disk, name=f"virtio-blk-{disk.id or n}", memory=memory, router=router,
                            irqfds=irqfds, ioeventfds=ioeventfds, service=service)
            attached.append(dev)  # closed below if anything later fails
            plugged.append(platform.attach(dev, disk.pci_segment, disk.pci_device_id))
    except BaseException:
        _unplug_and_close(platform, plugged, attached)
        raise
    return list(zip(attached, plugged, strict=True))


def _unplug_and_close(platform: PciPlatform, plugged: list[PciAddress],
                      attached: list[VirtioPciDevice]) -> None:
    """Undo a partly done attach: unplug in reverse order, then close (errors on the way out are not the
    one the caller reports)."""
    for address in reversed(plugged):
        platform.detach(address)
    for dev in reversed(attached):
        with contextlib.suppress(Exception):
            dev.close()


def open_net(
    net: NetConfig,
    *,
    name: str,
    memory: GuestMemory,
    router: MsiRouter,
    irqfds: Irqfds,
    ioeventfds: Ioeventfds | None,
) -> VirtioPciDevice:
    """Open (or create, or adopt from `net.fds`) the NIC's tap, one /dev/vhost-net per queue pair, and put
    a virtio-net transport over them, not yet plugged; the transport owns them (closing it closes the tap
    files pyvmm holds, and a tap pyvmm created disappears). Errors name the NIC."""
    from pyvmm.devices.virtio.net import NetParams, VirtioNet
    from pyvmm.errors import in_context
    from pyvmm.host.tap import Tap, TapError, TapSetup
    from pyvmm.vhost.backend import VhostError
    from pyvmm.vhost.net import VhostNet

    setup = TapSetup(net.ip, net.mask, net.host_mac, net.mtu)
    try:
        if net.fds:  # someone else's tap: only what was asked for explicitly is applied
            tap = Tap.adopt(net.fds, setup)
        else:
            tap = Tap.open(net.tap, net.queue_pairs, setup, TapSetup(NET_DEFAULT_IP, NET_DEFAULT_MASK))
    except TapError as exc:
        raise in_context(net_label(net), exc) from exc
    vhosts: list[VhostNet] = []
    try:
        offloads = tap.supported_offloads()
        for _ in range(net.queue_pairs):
            vhosts.append(VhostNet.open("/dev/vhost-net"))
        params = NetParams(net.mac, net.queue_pairs, net.queue_size, net.mtu, net.offload_csum,
                           net.offload_tso, net.offload_ufo)
        device = VirtioNet(params, tap, vhosts, offloads)
    except BaseException as exc:
        for vhost in vhosts:
            vhost.close()
        tap.close()
        if isinstance(exc, (VhostError, TapError)):
            raise in_context(net_label(net), exc) from exc
        raise
    try:
        vectors = IrqfdMsiVectors(router, irqfds, vector_count(device), name)
    except BaseException:
        device.close()
        raise
    try:
        return VirtioPciDevice(device, memory, vectors, bar64=True, ioeventfds=ioeventfds, name=name)
    except BaseException:
        device.close()
        vectors.close()
        raise


def attach_nets(
    nets: Sequence[NetConfig],
    *,
    memory: GuestMemory,
    platform: PciPlatform,
    router: MsiRouter,
    irqfds: Irqfds,
    ioeventfds: Ioeventfds,
) -> list[tuple[VirtioPciDevice, PciAddress]]:
    """Plug one virtio-net per NIC (open_net); each transport and where it went. On failure everything
    attached so far is unplugged and closed (taps pyvmm created disappear)."""
    attached: list[VirtioPciDevice] = []
    plugged: list[PciAddress] = []
    try:
        for n, net in enumerate(nets):
            dev = open_net(net, name=f"virtio-net-{net.id or n}", memory=memory, router=router,
                           irqfds=irqfds, ioeventfds=ioeventfds)
            attached.append(dev)
            plugged.append(platform.attach(dev, net.pci_segment, net.pci_device_id))
    except BaseException:
        _unplug_and_close(platform, plugged, attached)
        raise
    return list(zip(attached, plugged, strict=True))
