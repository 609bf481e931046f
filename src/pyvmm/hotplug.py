"""PCI hot-plug of passed-through functions, virtio-blk disks and virtio-net NICs into a running VM, and
their removal (docs/hotplug.md).

`PciHotplug` is built by the builder for every VM and exposed as `VirtualMachine.hotplug`. Another thread (the
API server) calls `add_vfio_device` / `add_disk` / `remove_device` while the vCPUs run. It also keeps the
VM's one id space (pyvmm.device_ids) for the disks and functions added at boot and since.

- add: the same rules and order as at boot (vfio/passthrough.py: whole IOMMU groups, reset, guest RAM
  DMA-mapped when the VM's container gets its first group, BARs placed in the segment's windows by
  `PciPlatform.attach`, MSI/MSI-X through the VM's router); then the slot's PCIU bit and the GED interrupt.
  The guest's acpiphp then scans the slot.
- remove: the slot's PCID bit and the GED interrupt; the device keeps working until the guest ejects the
  slot by writing B0EJ. That write is handled on the vCPU thread that made it (`_eject`): the device leaves
  the platform, its memslots, routes and fds are gone. A managed=on group is given back to its host drivers
  by a thread started when the group was plugged (on the calling thread, not on a vCPU thread), which
  waits for the last of its devices to leave: the guest need not wait for the host's driver probes, and
  the vCPU threads' seccomp filter need not allow sysfs writes (docs/seccomp.md#hot-plug). A disk leaves
  the platform and its transport closes (worker thread, ioeventfds, irqfds, image file) on the vCPU thread;
  a NIC the same way (vhost-net instances, its tap files, ioeventfds, irqfds and routes). A disk on a
  vhost-user backend (a qemu-storage-daemon pyvmm started, when guest RAM is shared: `disk_service`) joins
  the hang-up watch when it is plugged and leaves it before its socket closes (vhost/hangup.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvmm import memlock, pci_sysfs
from pyvmm.device_ids import DISK_PREFIX, NET_PREFIX, VFIO_PREFIX, DeviceIdError, DeviceIds, boot_ids
from pyvmm.devices.acpi_hotplug import AcpiGed, AcpiNotification, PciHotplugController
from pyvmm.errors import UsageError
from pyvmm.hypervisor import Ioeventfds, Irqfds, VfioGroupRegistry
from pyvmm.interrupts import MsiRouter
from pyvmm.irq_remapping import check_interrupt_isolation
from pyvmm.memory import GuestMemory
from pyvmm.pci.platform import PciAddress, PciPlatform

if TYPE_CHECKING:
    from pyvmm.config import DiskConfig, NetConfig
    from pyvmm.devices.virtio.pci import VirtioPciDevice
    from pyvmm.vfio.passthrough import DeviceLike, VfioPassthrough
    from pyvmm.vhost.hangup import HangupWatch
    from pyvmm.vhost.storage_daemon import DiskService

log = logging.getLogger(__name__)

VFIO_ID_PREFIX = VFIO_PREFIX  # ids given to devices that come without one, as cloud-hypervisor names them


class HotplugError(UsageError):
    """A hot-plug request that cannot be carried out as asked (unknown or taken id, a function already in
    the VM, an option hot-plug does not have): nothing was changed."""


@dataclass
class _Batch:
    """Devices plugged by one call, and what its managed=on binding changed on the host (given back when
    the last of them has left the guest)."""

    changed: list[str]
    ids: set[str] = field(default_factory=set)
    left: threading.Event = field(default_factory=threading.Event)  # the last of `ids` left the guest
    give_back: threading.Thread | None = None  # waits for `left`, then gives `changed` back


@dataclass
class _Plugged:
    id: str
    function: str  # the host function, 0000:01:00.0 (a disk: what the log calls it)
    address: PciAddress
    batch: _Batch | None  # None: a boot-time --device (its managed binding is vmm.run_vm's), or a disk
    removing: bool = False
    virtio: VirtioPciDevice | None = None  # a disk's or NIC's transport (it owns the image, or tap + vhost)
    boot: bool = False  # added by the builder (which closes a boot disk's transport with the VM)
    config: Any = None  # a hot-plugged device's DeviceLike / DiskConfig, its `id` filled in (vm.info, reboot)


@dataclass(frozen=True)
class BootDisk:
    """A --disk the builder plugged: its `id=` (None: it gets a generated one), transport and address."""

    id: str | None
    transport: VirtioPciDevice
    address: PciAddress


class PciHotplug:
    """The VM's hot-plug side: the PCI hot-plug registers (`registers`, on the MMIO bus) and the GED it
    raises, and the VFIO functions it may add and remove.

    `registry` creates the KVM VFIO device the first time a VM without boot-time --devices gets one.
    `on_host_request(name, message)` is what the builder does when the host asks a function back (stop the
    VM). `hangups`: the VM's vhost-user hang-up watch (None when guest RAM is private: no vhost-user device
    can be plugged). `disk_service(config)`: who serves a hot-plugged disk (None: the worker, or the
    user's vhost-user backend). `on_removed(id, address)`, when set, is told on the vCPU thread each time
    the guest has ejected a device and it is released (the `device-removed` event).
    """

    def __init__(
        self,
        *,
        platform: PciPlatform,
        ged: AcpiGed,
        memory: GuestMemory,
        router: MsiRouter,
        irqfds: Irqfds,
        registry: Callable[[], VfioGroupRegistry],
        ioeventfds: Ioeventfds | None = None,
        p2p_dma: bool = True,
        allow_unsafe_interrupts: bool = False,
        on_host_request: Callable[[str, str], None] | None = None,
        hangups: HangupWatch | None = None,
        disk_service: Callable[[DiskConfig], DiskService] | None = None,
    ) -> None:
        self.platform = platform
        self.registers = PciHotplugController(len(platform.segments), self._eject)
        self.ged = ged  # also the power button's (VirtualMachine.power_button)
        self._memory = memory
        self._router = router
        self._irqfds = irqfds
        self._ioeventfds = ioeventfds
        self._registry_factory = registry
        self._p2p_dma = p2p_dma
        self._allow_unsafe_interrupts = allow_unsafe_interrupts
        self._on_host_request = on_host_request
        self._hangups = hangups
        self._disk_service = disk_service
        self.on_removed: Callable[[str, PciAddress], None] | None = None
        self._lock = threading.Lock()
        self._vfio: VfioPassthrough | None = None
        self._owns_vfio = False
        self._devices: dict[str, _Plugged] = {}
        self._ids = DeviceIds()
        self._asked_back: set[str] = set()
        self._batches: list[_Batch] = []  # hot-plugged with managed=on, not yet given back

    # ---- boot-time devices -------------------------------------------------------------------------------

    def adopt(self, vfio: VfioPassthrough | None, devices: Sequence[DeviceLike],
              disks: Sequence[BootDisk] = (), nets: Sequence[BootDisk] = (),
              fs_ids: Sequence[str | None] = (), vsock_ids: Sequence[str | None] = ()) -> None:
        """The builder's devices: its --disks, --nets and its VFIO side (None without --device), whose
        `devices` are the --device configs in order. They get their ids (one space with what is hot-plugged
        later: pyvmm.device_ids) and can be removed like hot-plugged ones; hot-plugged functions join the
        VFIO side's container. The --fs and --vsock devices take their ids in the space (not removable)."""
        self._ids, names = boot_ids([d.id for d in disks], [n.id for n in nets], fs_ids, vsock_ids,
                                    [c.id for c in devices])
        virtio = list(zip(disks, names.disks, strict=True)) + list(zip(nets, names.nets, strict=True))
        for boot, ident in virtio:
            self._devices[ident] = _Plugged(ident, boot.transport.name, boot.address, None,
                                            virtio=boot.transport, boot=True)
        if vfio is None:
            return
        self._vfio = vfio
        for ident, (model, address) in zip(names.devices, vfio.plugged(), strict=True):
            self._devices[ident] = _Plugged(ident, model.device.name, address, None, boot=True)

    def host_asked_back(self, name: str) -> None:
        """The host asked for `name` back (the VM stops): a managed give-back must wait for its removal."""
        self._asked_back.add(name)

    def devices(self) -> dict[str, PciAddress]:
        """Every removable device by id (boot-time --devices and hot-plugged ones)."""
        with self._lock:
            return {ident: plugged.address for ident, plugged in self._devices.items()}

    def hot_plugged(self) -> list[tuple[str, Any]]:
        """The devices added while the VM runs and still in it, in the order they came: (id, config with
        that id). With the boot-time ones still present (`devices()`), what a reboot boots again."""
        with self._lock:
            return [(p.id, p.config) for p in self._devices.values() if p.config is not None and not p.boot]

    # ---- add ---------------------------------------------------------------------------------------------

    def add_vfio_device(self, config: DeviceLike) -> PciAddress:
        """Plug the host function `config` describes into the running guest; its address (segment, slot;
        bus 0, function 0). Raises a PyvmmError (one line) and changes nothing when it cannot."""
        return self.add_vfio_devices([config])[0]

    def add_vfio_devices(self, configs: Sequence[DeviceLike]) -> list[PciAddress]:
        """Plug several functions at once (e.g. every endpoint of one IOMMU group, which must come
        together, as at boot); one notification for all."""
        configs = list(configs)
        if not configs:
            raise HotplugError("add-device: no device given")
        with self._lock:
            mark = self._ids.mark()  # a refused request does not use up an id
            try:
                ids = self._check_request(configs)
                check_interrupt_isolation(self._allow_unsafe_interrupts)
                self._check_privileges(configs)
                from pyvmm.vfio.passthrough import bind_groups, give_back

                managed = [self._function_name(c) for c in configs if getattr(c, "managed", False)]
                changed = bind_groups(managed, self._allow_unsafe_interrupts) if managed else []
                try:
                    plugged = self._plug(configs)
                except BaseException:
                    if changed:
                        give_back(changed, self._asked_back)
                    raise
            except BaseException:
                self._ids.rollback(mark)
                raise
            batch = _Batch(changed, set(ids))
            if changed:
                self._batches.append(batch)
                self._wait_to_give_back(batch)
            for ident, config, (function, address) in zip(ids, configs, plugged, strict=True):
                self._devices[ident] = _Plugged(ident, function, address, batch,
                                                config=_with_id(config, ident))
                self.registers.device_added(address.segment, address.slot)
                log.info("%s: host %s hot-plugged at %s", ident, function, address)
        self.ged.notify(AcpiNotification.PCI_DEVICES_CHANGED)
        return [address for _function, address in plugged]

    def _new_id(self) -> str:
        return self._ids.new(VFIO_PREFIX)

    @staticmethod
    def _function_name(config: DeviceLike) -> str:
        function = pci_sysfs.function_at(config.path)
        if function is None:
            raise HotplugError(f"add-device path={config.path}: not a PCI function (expected "
                               "/sys/bus/pci/devices/<domain:bus:dev.fn>/; see `pyvmm-host list`)")
        return function.name

    def _check_request(self, configs: list[DeviceLike]) -> list[str]:
        """The ids the new devices get; refuses what the request gets wrong before anything is touched."""
        in_vm = {plugged.function for plugged in self._devices.values()}
        ids: list[str] = []
        names: set[str] = set()
        for config in configs:
            label = f"add-device path={config.path}"
            if config.iommu:
                raise HotplugError(f"{label}: iommu=on needs virtio-iommu, which pyvmm does not have yet")
            if not 0 <= config.pci_segment < len(self.platform.segments):
                raise HotplugError(f"{label}: PCI segment {config.pci_segment} does not exist (this VM has "
                                   f"{len(self.platform.segments)}: --platform num_pci_segments=N)")
            name = self._function_name(config)
            if name in in_vm or name in names:
                raise HotplugError(f"{label}: {name} is already passed through to this guest")
            names.add(name)
            if config.id is not None:
                try:
                    self._ids.check(config.id, ids)
                except DeviceIdError as exc:
                    raise HotplugError(f"{label}: {exc}") from None
                ids.append(config.id)
            else:
                ids.append("")
        return [self._ids.take(ident) if ident else self._new_id() for ident in ids]

    def _check_privileges(self, configs: list[DeviceLike]) -> None:
        """What a boot-time --device is checked for before anything is opened (vmm.check_unprivileged):
        managed=on needs root, and the first passed-through function makes VFIO pin all guest RAM."""
        managed = [config for config in configs if getattr(config, "managed", False)]
        if managed and os.geteuid() != 0:
            raise HotplugError(
                f"add-device path={managed[0].path},managed=on: binding a device to vfio-pci and giving it "
                "back needs root; run pyvmm as root, or bind it beforehand (`pyvmm-host bind BDF --owner "
                "USER`) and drop managed=on"
            )
        if self._vfio is None:
            memlock.check_vfio_pinning(self._memory.total_size)

    def _passthrough(self) -> VfioPassthrough:
        if self._vfio is None:
            from pyvmm.vfio.passthrough import VfioPassthrough

            registry = self._registry_factory()  # the KVM VFIO device, before the first group joins
            self._vfio = VfioPassthrough(registry, self._irqfds, self._router, self._memory,
                                         self.platform.memory_slots, self._p2p_dma, self._host_request)
            self._owns_vfio = True
        return self._vfio

    def _host_request(self, name: str, message: str) -> None:
        self.host_asked_back(name)
        if self._on_host_request is not None:
            self._on_host_request(name, message)

    def _plug(self, configs: list[DeviceLike]) -> list[tuple[str, PciAddress]]:
        """Open, check, reset and plug, as attach_vfio_devices does at boot; on failure every function it
        opened is released again."""
        from pyvmm.vfio.passthrough import check_groups_complete

        vfio = self._passthrough()
        new: list[str] = []
        try:
            opened = []
            for config in configs:
                device = vfio.open_device(config.path)
                new.append(device.name)
                opened.append(device)
            check_groups_complete(vfio, set(vfio.opened()))
            for config, device in zip(configs, opened, strict=True):
                vfio.reset(device, config.x_allow_no_reset)
            plugged = []
            for config in configs:
                model, address = vfio.add_device(
                    config.path,
                    self.platform,
                    config.pci_segment,
                    slot=config.pci_device_id,
                    name=config.id,
                    exclude_mmap_bars=tuple(config.x_exclude_mmap_bars),
                    gpudirect_clique=config.x_nv_gpudirect_clique,
                    allow_no_reset=config.x_allow_no_reset,
                    msix_relocation=config.x_msix_relocation,
                )
                plugged.append((model.device.name, address))
            vfio.start_watching()
        except BaseException:
            for name in reversed(new):
                with contextlib.suppress(Exception):
                    vfio.release(name)
            raise
        return plugged

    def add_disk(self, config: DiskConfig) -> tuple[str, PciAddress]:
        """Plug a virtio-blk disk over the image `config` names (opened and locked as for --disk) into the
        running guest; its id and address. Raises a PyvmmError (one line) and changes nothing when it
        cannot."""
        from pyvmm.devices.virtio.attach import open_disk

        label = f"add-disk path={config.path}"
        with self._lock:
            if not 0 <= config.pci_segment < len(self.platform.segments):
                raise HotplugError(f"{label}: PCI segment {config.pci_segment} does not exist (this VM has "
                                   f"{len(self.platform.segments)}: --platform num_pci_segments=N)")
            mark = self._ids.mark()
            try:
                try:
                    ident = self._ids.assign(DISK_PREFIX, config.id)
                except DeviceIdError as exc:
                    raise HotplugError(f"{label}: {exc}") from None
                service = self._disk_service(config) if self._disk_service is not None else None
                transport = open_disk(config, name=f"virtio-blk-{ident}", memory=self._memory,
                                      router=self._router, irqfds=self._irqfds, ioeventfds=self._ioeventfds,
                                      hotplug=True, service=service)
                try:
                    address = self.platform.attach(transport, config.pci_segment, config.pci_device_id)
                except BaseException:
                    with contextlib.suppress(Exception):
                        transport.close()
                    raise
                self._watch(transport)
            except BaseException:
                self._ids.rollback(mark)
                raise
            self._devices[ident] = _Plugged(ident, str(config.path), address, None, virtio=transport,
                                            config=_with_id(config, ident))
            self.registers.device_added(address.segment, address.slot)
            log.info("%s: disk %s hot-plugged at %s", ident, config.path, address)
        self.ged.notify(AcpiNotification.PCI_DEVICES_CHANGED)
        return ident, address

    def add_net(self, config: NetConfig) -> tuple[str, PciAddress]:
        """Plug a virtio-net NIC on vhost-net (its tap opened, created or adopted from `config.fds` as for
        --net) into the running guest; its id and address. The tap files are duplicated: the caller keeps
        its own. Raises a PyvmmError (one line) and changes nothing when it cannot."""
        from pyvmm.config import net_label
        from pyvmm.devices.virtio.attach import open_net

        label = net_label(config).replace("--net", "add-net", 1)
        with self._lock:
            if not 0 <= config.pci_segment < len(self.platform.segments):
                raise HotplugError(f"{label}: PCI segment {config.pci_segment} does not exist (this VM has "
                                   f"{len(self.platform.segments)}: --platform num_pci_segments=N)")
            mark = self._ids.mark()
            try:
                try:
                    ident = self._ids.assign(NET_PREFIX, config.id)
                except DeviceIdError as exc:
                    raise HotplugError(f"{label}: {exc}") from None
                transport = open_net(config, name=f"virtio-net-{ident}", memory=self._memory,
                                     router=self._router, irqfds=self._irqfds, ioeventfds=self._ioeventfds)
                try:
                    address = self.platform.attach(transport, config.pci_segment, config.pci_device_id)
                except BaseException:
                    with contextlib.suppress(Exception):
                        transport.close()
                    raise
            except BaseException:
                self._ids.rollback(mark)
                raise
            self._devices[ident] = _Plugged(ident, transport.name, address, None, virtio=transport,
                                            config=_with_id(config, ident))
            self.registers.device_added(address.segment, address.slot)
            log.info("%s: NIC hot-plugged at %s", ident, address)
        self.ged.notify(AcpiNotification.PCI_DEVICES_CHANGED)
        return ident, address

    def counters(self) -> dict[str, dict[str, int]]:
        """Each disk's I/O counters by id (vm.counters): the devices that keep any."""
        with self._lock:
            disks = [(p.id, p.virtio) for p in self._devices.values() if p.virtio is not None]
        out = {}
        for ident, transport in sorted(disks, key=lambda item: item[0]):
            counters = getattr(transport.device, "counters", None)
            if counters is not None:
                out[ident] = counters()
        return out

    # ---- remove ------------------------------------------------------------------------------------------

    def remove_device(self, ident: str) -> PciAddress:
        """Ask the guest to eject device `ident`; it is released when the guest's eject reaches B0EJ
        (the guest decides when: a guest without ACPI hot-plug never does). Its address."""
        with self._lock:
            plugged = self._devices.get(ident)
            if plugged is None:
                known = ", ".join(sorted(self._devices)) or "none"
                raise HotplugError(f"remove-device: no device with id {ident} (removable devices: {known})")
            plugged.removing = True
            address = plugged.address
            self.registers.eject_requested(address.segment, address.slot)
        self.ged.notify(AcpiNotification.PCI_DEVICES_CHANGED)
        return address

    def _eject(self, segment: int, slot: int) -> None:
        """The guest wrote B0EJ for `slot` of `segment` (on its vCPU thread): release what is there."""
        address = PciAddress(segment, slot)
        with self._lock:
            plugged = next((p for p in self._devices.values() if p.address == address), None)
            if plugged is None or (plugged.virtio is None and self._vfio is None):
                # guest-controlled (any slot, any number of times): not worth more than a debug line
                log.debug("the guest ejected PCI slot %s: nothing removable there, ignored", address)
                return
            if plugged.virtio is not None:
                self.platform.detach(address)
                # worker thread, ioeventfds, irqfds and routes; the image file, or vhost-net and the tap
                # files, or the backend's connection (and the daemon pyvmm started for it)
                self._close_virtio(plugged.virtio)
            else:
                assert self._vfio is not None
                self._vfio.release(plugged.function)
            del self._devices[plugged.id]
            self._ids.release(plugged.id)
            if plugged.batch is not None:
                plugged.batch.ids.discard(plugged.id)
                if not plugged.batch.ids:
                    plugged.batch.left.set()  # its give-back thread takes over
            log.info("%s: %s ejected by the guest and released", plugged.id, address)
        if self.on_removed is not None:
            self.on_removed(plugged.id, address)

    def _watch(self, transport: VirtioPciDevice) -> None:
        """A vhost-user device's backend joins the hang-up watch (a dead backend stops the VM)."""
        from pyvmm.devices.virtio.attach import backend_socket

        watched = backend_socket(transport)
        if watched is not None and self._hangups is not None:
            self._hangups.add(*watched)

    def _close_virtio(self, transport: VirtioPciDevice) -> None:
        """Close a disk's or NIC's transport; a vhost-user backend's socket leaves the hang-up watch first
        (closed while polled, it would read as a hang-up and stop the VM)."""
        from pyvmm.devices.virtio.attach import backend_socket

        watched = backend_socket(transport)
        if watched is not None and self._hangups is not None:
            self._hangups.remove(watched[0])
        transport.close()

    def _wait_to_give_back(self, batch: _Batch) -> None:
        """Started by the thread that plugged `batch` (under its filter, which may write sysfs): gives the
        batch's managed=on groups back once the guest has ejected its last device, or at close."""
        from pyvmm.vfio.passthrough import give_back

        def run() -> None:
            batch.left.wait()
            give_back(batch.changed, set(self._asked_back))

        batch.give_back = threading.Thread(target=run, name="managed-give-back", daemon=True)
        batch.give_back.start()

    # ---- teardown ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """With the VM (its vCPUs stopped): release the hot-plugged devices, then give their managed groups
        back; the boot-time VFIO side is closed by its owner."""
        with self._lock:
            for plugged in list(self._devices.values()):
                if plugged.virtio is not None and not plugged.boot:
                    with contextlib.suppress(Exception):
                        self._close_virtio(plugged.virtio)
                    del self._devices[plugged.id]
                    continue
                if plugged.batch is None:
                    continue
                if self._vfio is not None:
                    with contextlib.suppress(Exception):
                        self._vfio.release(plugged.function)
                del self._devices[plugged.id]
            if self._owns_vfio and self._vfio is not None:
                self._vfio.close()
            self._vfio = None
            batches, self._batches = self._batches, []
        for batch in batches:  # their devices are gone: the waiting threads give the groups back
            batch.left.set()
            if batch.give_back is not None:
                batch.give_back.join()


def _with_id(config: Any, ident: str) -> Any:
    """`config` with `id=ident` (as cloud-hypervisor writes a generated id into the VM's config)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.replace(config, id=ident)
    return config
