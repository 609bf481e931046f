"""All VFIO devices of one VM: the KVM VFIO pseudo-device, one shared container, groups, device models.

Order (docs/vfio.md#host-setup-order): the KVM VFIO device exists before any group is added; for a new group:
open and check viability → join the container (the first group selects type1v2) → KVM_DEV_VFIO_FILE_ADD → only
then the device fd. Guest RAM is DMA-mapped when the container gets its first group, so it is in place before
any device model exists and long before the guest runs. Groups are shared by their devices; close() undoes
everything in reverse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pyvmm import pci_sysfs
from pyvmm.errors import ExitStatus
from pyvmm.hypervisor import Irqfds, MemorySlots, VfioGroupRegistry
from pyvmm.interrupts import MsiRouter
from pyvmm.memory import GuestMemory
from pyvmm.pci.platform import PciAddress, PciPlatform
from pyvmm.vfio.container import VfioContainer, VfioGroup
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.dma import map_guest_memory
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.pci import VfioPciDevice
from pyvmm.vfio.requests import DeviceRequests
from pyvmm.vfio.reset import ResetKind, ResetResult, reset_function

log = logging.getLogger(__name__)

VFIO_DRIVER = pci_sysfs.VFIO_DRIVER


class VfioConfigError(VfioError):
    """The --device list itself is at fault (a key not implemented, a group not given whole): exit 2."""

    exit_status = ExitStatus.USAGE


class VfioResetError(VfioConfigError):
    """A function that cannot be reset, given without x_allow_no_reset=on: exit 2, the command line must
    change (docs/vfio.md#reset-and-teardown)."""


class DeviceLike(Protocol):
    """The fields of config.DeviceConfig this module reads (read-only: the config is frozen)."""

    @property
    def path(self) -> Path: ...
    @property
    def id(self) -> str | None: ...
    @property
    def iommu(self) -> bool: ...
    @property
    def pci_segment(self) -> int: ...
    @property
    def pci_device_id(self) -> int | None: ...
    @property
    def x_nv_gpudirect_clique(self) -> int | None: ...
    @property
    def x_exclude_mmap_bars(self) -> tuple[int, ...]: ...
    @property
    def x_allow_no_reset(self) -> bool: ...
    @property
    def x_msix_relocation(self) -> bool: ...


@dataclass(frozen=True)
class HostFunction:
    """A host PCI function as found in sysfs."""

    name: str  # 0000:01:00.0
    group: int
    driver: str | None


def host_function(path: str | os.PathLike[str]) -> HostFunction:
    """Check that `path` is a PCI function bound to vfio-pci; one-line errors say how to fix it."""
    function = pci_sysfs.function_at(path)
    if function is None:
        raise VfioError(
            f"{path}: not a PCI function (expected /sys/bus/pci/devices/<domain:bus:dev.fn>/; "
            "see `pyvmm-host list`)"
        )
    name, driver = function.name, function.driver
    if driver != VFIO_DRIVER:
        now = f"is bound to {driver}" if driver else "has no driver"
        raise VfioError(f"{name} {now}, not vfio-pci: run `pyvmm-host bind {name}` first")
    if function.iommu_group is None:
        raise VfioError(
            f"{name} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on) "
            "(see `pyvmm-host check`)"
        )
    return HostFunction(name, function.iommu_group, driver)


class VfioPassthrough:
    """The VFIO side of one VM; `memory` (if given) is DMA-mapped when the container gets its first group.

    `registry` is the KVM VFIO device (created before the first group joins), `irqfds` and `router` carry
    the devices' interrupts, `memory_slots` maps their BAR areas into the guest.
    With `on_request`, every device gets a request eventfd (see pyvmm.vfio.requests): when the host takes
    a device away, `on_request(name, message)` runs once, on a watcher thread started by start_watching().
    """

    def __init__(
        self,
        registry: VfioGroupRegistry,
        irqfds: Irqfds,
        router: MsiRouter,
        memory: GuestMemory | None = None,
        memory_slots: MemorySlots | None = None,
        p2p_dma: bool = True,
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.irqfds = irqfds
        self.router = router
        self.memory = memory
        self.memory_slots = memory_slots
        self.p2p_dma = p2p_dma
        self.container: VfioContainer | None = None
        self.groups: dict[int, VfioGroup] = {}
        self.devices: list[VfioPciDevice] = []
        self._plugged: list[tuple[VfioPciDevice, PciPlatform, PciAddress]] = []  # unplugged by close()
        self._raw: list[VfioDevice] = []
        self._group_of: dict[str, int] = {}  # host function name -> its IOMMU group
        self.resets: dict[str, ResetResult] = {}  # host function name -> how it was reset before use
        self._bus_reset: set[pci_sysfs.Bdf] = set()  # functions a bus reset of ours already covered
        self.requests = DeviceRequests(on_request) if on_request is not None else None

    # ---- host side ------------------------------------------------------------------------------------

    def group(self, group_id: int, hint: str = "") -> VfioGroup:
        """The open, viable group `group_id` in the shared container, known to KVM (opened once)."""
        if group_id in self.groups:
            return self.groups[group_id]
        if self.container is None:
            self.container = VfioContainer()
        first = not self.container.groups
        group = VfioGroup(group_id, hint)
        try:
            self.container.attach(group)
            self.registry.add_group(group.fd)
        except VfioError:
            group.close()
            raise
        except OSError as e:  # the KVM VFIO device refused it
            group.close()
            raise VfioError(f"IOMMU group {group_id}: adding it to the KVM VFIO device failed: {e}") from e
        except BaseException:
            group.close()
            raise
        self.groups[group_id] = group
        if first and self.memory is not None:
            try:
                map_guest_memory(self.container, self.memory)
            except BaseException:  # no group stays without guest RAM mapped (a later device would reuse it)
                del self.groups[group_id]
                with contextlib.suppress(OSError):
                    self.registry.remove_group(group.fd)
                group.close()
                raise
        return group

    def open_device(self, path: str | os.PathLike[str]) -> VfioDevice:
        """The VFIO device of the host function at sysfs `path` (its group set up first; opened once)."""
        function = host_function(path)
        for opened in self._raw:
            if opened.name == function.name:
                return opened
        group = self.group(function.group, function.name)
        try:
            device = VfioDevice(group.get_device_fd(function.name), function.name)
        except BaseException:
            self._drop_group_if_unused(function.group)
            raise
        self._raw.append(device)
        self._group_of[device.name] = function.group
        if self.requests is not None:
            self.requests.watch(device)
        return device

    def reset(self, device: VfioDevice, allow_no_reset: bool = False) -> ResetResult:
        """Reset `device` before any model reads it (once), then check it still answers.

        A function reset when vfio-pci offers one; otherwise a bus reset when every group it affects is
        open here (open every device first to make that possible). A device that could not be reset is
        refused unless `allow_no_reset` (`x_allow_no_reset=on`); with it, a warning says so once. A device
        whose config space reads all-ones afterwards is refused either way.
        """
        if device.name in self.resets:
            return self.resets[device.name]
        address = pci_sysfs.Bdf.from_name(device.name)
        if address is not None and address in self._bus_reset:
            result = ResetResult(ResetKind.BUS)  # a bus reset for an earlier device reset this one too
        else:
            fds = {gid: group.fd for gid, group in self.groups.items()}
            result = reset_function(device.fd, device.flags, fds)
            self._bus_reset |= result.also_reset
        if not result.done:
            why = "; ".join(result.tried)
            if not allow_no_reset:
                raise VfioResetError(
                    f"{device.name} cannot be reset ({why}): what its last user left in it would reach the "
                    "guest; add x_allow_no_reset=on to its --device to pass it through anyway (SECURITY.md)"
                )
            log.warning("%s: not reset (%s); passed through as it is (x_allow_no_reset=on)", device.name, why)
        if device.read_config(0, 2) == 0xFFFF:  # vendor ID all-ones: the function does not answer
            after = f"after a {result.kind.value}" if result.kind else "(not reset)"
            raise VfioError(
                f"{device.name}: its config space reads all-ones {after}: the device does not answer; "
                "check it on the host (`lspci -s`, `dmesg`)"
            )
        log.info("%s: %s", device.name, result.kind.value if result.kind else "not reset")
        self.resets[device.name] = result
        return result

    def start_watching(self) -> None:
        """Start reporting the host's requests for the devices opened so far."""
        if self.requests is not None:
            self.requests.start()

    # ---- guest side -----------------------------------------------------------------------------------

    def add_device(
        self,
        path: str | os.PathLike[str],
        platform: PciPlatform,
        segment: int = 0,
        slot: int | None = None,
        name: str | None = None,
        exclude_mmap_bars: tuple[int, ...] = (),
        gpudirect_clique: int | None = None,
        allow_no_reset: bool = False,
        msix_relocation: bool = False,
    ) -> tuple[VfioPciDevice, PciAddress]:
        """Open the host function at `path`, reset it (unless reset() already did) and plug its device model
        into the platform."""
        device = self.open_device(path)
        self.reset(device, allow_no_reset)
        model = VfioPciDevice(
            device,
            self.irqfds,
            self.router,
            name=name or device.name,
            memory_slots=self.memory_slots,
            exclude_mmap_bars=exclude_mmap_bars,
            p2p_container=self.container if self.p2p_dma else None,
            gpudirect_clique=gpudirect_clique,
            msix_relocation=msix_relocation,
        )
        self.devices.append(model)
        address = platform.attach(model, segment, slot)
        self._plugged.append((model, platform, address))
        log.info("%s: host %s at %s", model.name, device.name, address)
        return model, address

    def opened(self) -> list[str]:
        """Host functions open here (whether or not plugged yet)."""
        return [device.name for device in self._raw]

    def plugged(self) -> list[tuple[VfioPciDevice, PciAddress]]:
        """Every device model on the platform, with its guest address (in plugging order)."""
        return [(model, address) for model, _platform, address in self._plugged]

    # ---- teardown -------------------------------------------------------------------------------------

    def release(self, name: str) -> None:
        """Take the host function `name` out of this VM while it runs (hot-unplug, or a failed hot-plug):
        off the platform (bus ranges, BARs, slot), its model closed (memslots, BAR mmaps, interrupt routes
        and irqfds, the device fd), its request eventfd, and its group when no other open device uses it
        (KVM FILE_DEL, out of the container: the last group takes the container's DMA mappings with it)."""
        for model in [m for m in self.devices if m.device.name == name]:
            self.devices.remove(model)
            try:
                for entry in [e for e in self._plugged if e[0] is model]:
                    self._plugged.remove(entry)
                    entry[1].detach(entry[2])
            finally:
                model.close()
        for device in list(self._raw):
            if device.name == name:
                self._raw.remove(device)
                device.close()
        if self.requests is not None:
            self.requests.forget(name)
        self.resets.pop(name, None)
        address = pci_sysfs.Bdf.from_name(name)
        if address is not None:
            self._bus_reset.discard(address)
        group_id = self._group_of.pop(name, None)
        if group_id is not None:
            self._drop_group_if_unused(group_id)

    def _drop_group_if_unused(self, group_id: int) -> None:
        if group_id in self._group_of.values():
            return
        group = self.groups.pop(group_id, None)
        if group is None:
            return
        if group.fd >= 0:
            with contextlib.suppress(OSError):
                self.registry.remove_group(group.fd)
        group.close()


    def close(self) -> None:
        """Devices (mappings, interrupts, fds), then groups (KVM FILE_DEL, unset container), container.
        Closing every fd of a device is what lets a removal the host started finish."""
        if self.requests is not None:
            self.requests.stop()
        for _model, platform, address in reversed(self._plugged):
            with contextlib.suppress(Exception):
                platform.detach(address)
        self._plugged.clear()
        for model in reversed(self.devices):
            with contextlib.suppress(Exception):
                model.close()
        self.devices.clear()
        for device in self._raw:
            device.close()
        self._raw.clear()
        self._group_of.clear()
        for group in reversed(list(self.groups.values())):
            if group.fd >= 0:
                with contextlib.suppress(OSError):
                    self.registry.remove_group(group.fd)
            group.close()
        self.groups.clear()
        if self.container is not None:
            self.container.close()
            self.container = None
        if self.requests is not None:
            self.requests.close()


# ---- the builder's entry point -----------------------------------------------------------------------------


def check_groups_complete(passthrough: VfioPassthrough, given: set[str]) -> None:
    """Every endpoint function of a group in use must be given to this guest (docs/vfio.md#iommu-groups; the
    rule is pyvmm.pci_sysfs.member_role, the one `pyvmm-host` uses)."""
    for group_id in sorted(passthrough.groups):
        missing = [m.name for m in pci_sysfs.left_out(pci_sysfs.SYSFS.group_members(group_id), given)]
        if missing:
            paths = " ".join(f"path=/sys/bus/pci/devices/{name}/" for name in missing)
            raise VfioConfigError(
                f"IOMMU group {group_id} also holds {', '.join(missing)}: all endpoint functions of a "
                f"group go to the same guest (add --device {paths}, bound with `pyvmm-host bind --group` or "
                "managed=on)"
            )


def attach_vfio_devices(
    devices: Iterable[DeviceLike],
    *,
    platform: PciPlatform,
    registry: VfioGroupRegistry,
    irqfds: Irqfds,
    router: MsiRouter,
    memory: GuestMemory,
    p2p_dma: bool = True,
    on_request: Callable[[str, str], None] | None = None,
) -> VfioPassthrough:
    """Open, DMA-map and plug every `--device` in command-line order; the caller closes the result.

    Raises VfioError (one line) for keys not implemented yet, functions not on vfio-pci, groups that are not
    viable or not wholly given, functions that cannot be reset (without x_allow_no_reset=on); on error
    everything opened so far is closed again. `on_request(name, message)` is called (from a watcher
    thread) when the host takes a device away while the VM has it.
    """
    configs = list(devices)
    for dev in configs:
        if dev.iommu:
            raise VfioConfigError(
                f"--device path={dev.path}: iommu=on needs virtio-iommu, which pyvmm does not have yet"
            )
    passthrough = VfioPassthrough(registry, irqfds, router, memory, platform.memory_slots, p2p_dma,
                                  on_request)
    try:
        # Every device (and so every group) is open before the first reset, so that a bus reset can see that
        # this VM holds all it touches; a group not given whole is refused before anything is reset; every
        # device is reset before the first model reads one (a bus reset would undo a model's setup).
        opened = [passthrough.open_device(dev.path) for dev in configs]
        check_groups_complete(passthrough, {device.name for device in opened})
        for dev, device in zip(configs, opened, strict=True):
            passthrough.reset(device, dev.x_allow_no_reset)
        for dev in configs:
            passthrough.add_device(
                dev.path,
                platform,
                dev.pci_segment,
                slot=dev.pci_device_id,
                name=dev.id,
                exclude_mmap_bars=tuple(dev.x_exclude_mmap_bars),
                gpudirect_clique=dev.x_nv_gpudirect_clique,
                allow_no_reset=dev.x_allow_no_reset,
                msix_relocation=dev.x_msix_relocation,
            )
        passthrough.start_watching()
    except BaseException:
        passthrough.close()
        raise
    return passthrough


# ---- managed=on: pyvmm binds the groups itself and gives them back ---------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _function_name(path: str | os.PathLike[str]) -> str:
    function = pci_sysfs.function_at(path)
    if function is None:
        raise VfioConfigError(
            f"{path}: not a PCI function (expected /sys/bus/pci/devices/<domain:bus:dev.fn>/; "
            "see `pyvmm-host list`)"
        )
    return function.name


class ManagedBinding:
    """The `managed=on` devices of one VM: their IOMMU groups bound to vfio-pci through pyvmm.host (which
    journals the original drivers under /run/pyvmm first) and given back on the way out.

    While binding and giving back, SIGINT and SIGTERM are held; between the two (building the VM) the first
    one stops pyvmm with SystemExit so that the give-back still runs (VirtualMachine.run installs its own
    handlers while the guest runs). A SIGKILL leaves the journal: `pyvmm-host restore --all` undoes it.
    """

    def __init__(self, devices: Iterable[DeviceLike], allow_unsafe_interrupts: bool = False) -> None:
        self.names = [_function_name(dev.path) for dev in devices if getattr(dev, "managed", False)]
        self.allow_unsafe_interrupts = allow_unsafe_interrupts  # --platform allow_unsafe_interrupts=on
        self.changed: list[str] = []
        self.asked_back: set[str] = set()  # functions the host asked back while the VM had them
        self._held: list[int] = []
        self._previous: dict[int, object] = {}

    def _hold(self, signum: int, frame: object) -> None:
        self._held.append(signum)

    def _stop(self, signum: int, frame: object) -> None:
        self.hold_signals()  # only the first signal interrupts: the way out must not be interrupted again
        raise _stopped_by(signum)

    def host_asked_back(self, name: str) -> None:
        """The host asked for `name` back (pyvmm.vfio.requests): it leaves vfio-pci once the VM has closed
        it, and is not given back by us (a removed device is gone; restore drops it from the journal)."""
        self.asked_back.add(name)

    def hold_signals(self) -> None:
        """From now on SIGINT and SIGTERM only get noted (call before tearing the VM down)."""
        if self._previous:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._hold)

    def bind(self) -> None:
        if not self.names:
            return
        self._previous = {sig: signal.signal(sig, self._hold) for sig in STOP_SIGNALS}
        try:
            self.changed = bind_groups(self.names, self.allow_unsafe_interrupts)
        except BaseException:
            self._restore_handlers()
            raise
        if self._held:
            self.give_back()
            raise _stopped_by(self._held[0])
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._stop)

    def give_back(self) -> None:
        """Return what bind() changed to the drivers the journal recorded; never raises."""
        if not self._previous:
            return
        self.hold_signals()
        try:
            if self.changed:
                give_back(self.changed, self.asked_back)
                self.changed = []
        finally:
            self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}


def bind_groups(names: list[str], allow_unsafe_interrupts: bool = False) -> list[str]:
    """Bind the IOMMU groups of the host functions `names` to vfio-pci through pyvmm.host (journalled under
    /run/pyvmm); the functions this changed, for give_back(). Signals are the caller's business."""
    from pyvmm import host  # the host layer is only needed for managed devices
    from pyvmm.host import restoring  # noqa: F401 - give_back() runs late, under the seccomp filter: load it now

    try:
        outcome = host.bind_to_vfio(names, group=True, allow_unsafe_interrupts=allow_unsafe_interrupts)
    except host.HostError as exc:
        raise VfioError(f"managed=on: {exc}") from exc
    changed = [str(bdf) for bdf in outcome.changed]
    for warning in outcome.warnings:
        log.warning("managed=on: %s", warning)
    log.info("managed=on: bound %s to vfio-pci", ", ".join(changed) or "nothing (already bound)")
    return changed


def give_back(changed: list[str], asked_back: set[str] | frozenset[str] = frozenset()) -> None:
    """Return the functions bind_groups() changed to the drivers the journal recorded, once every fd of
    them is closed; `asked_back` are those the host asked for (they leave vfio-pci first). Never raises."""
    from pyvmm import host

    _wait_for_removals(sorted(set(asked_back) & set(changed)))
    try:
        outcome = host.restore(changed)
    except host.HostError as exc:
        log.error("managed=on: giving %s back failed: %s; run `pyvmm-host restore --all`",
                  ", ".join(changed), exc)
    else:
        log.info("managed=on: %s", "; ".join(f"{d.bdf} {d.note}" for d in outcome.devices))


REMOVAL_WAIT_SECONDS = 30.0


def _wait_for_removals(names: list[str]) -> None:
    """Devices the host asked back (pyvmm.vfio.requests) leave vfio-pci once their fds are closed; wait for
    that before giving anything back, so the give-back does not race the kernel (a removed device is then
    gone, and restore drops it from the journal)."""
    from pyvmm.host import sysfs

    for name in names:

        def released(name: str = name) -> bool:
            return pci_sysfs.SYSFS.driver(name) != VFIO_DRIVER  # a removed device has no driver either

        with contextlib.suppress(OSError):
            if not sysfs.settle(released, REMOVAL_WAIT_SECONDS):
                log.warning("managed=on: %s is still on vfio-pci after the host asked for it", name)


def _stopped_by(signum: int) -> SystemExit:
    print(f"pyvmm: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    return SystemExit(0)


@contextlib.contextmanager
def managed_binding(
    devices: Iterable[DeviceLike], allow_unsafe_interrupts: bool = False
) -> Iterator[ManagedBinding]:
    """`with managed_binding(config.devices) as managed:` build and run the VM; see ManagedBinding."""
    managed = ManagedBinding(devices, allow_unsafe_interrupts)
    managed.bind()
    try:
        yield managed
    finally:
        managed.give_back()
