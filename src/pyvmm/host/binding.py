"""Binding functions to vfio-pci, journalled before every change so that each can be undone."""

from __future__ import annotations

import errno
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import hostfacts, sysfs
from .actions import Changer, StepHook
from .bdf import Bdf
from .errors import HostError, HostUsageError, RefusedError
from .inuse import host_uses
from .journal import JOURNAL_DIR, BindMethod, DeviceRecord, Journal, NewIdRecord, open_journal
from .loading import ensure_vfio_modules
from .outcome import DeviceOutcome, Outcome
from .ownership import give_back_node, hand_over
from .pciids import load_pci_ids
from .restoring import drop_new_ids, give_back
from .selection import select_targets
from .sysfs import VFIO_DRIVER, PciFunction


def _vfio(attr: str) -> str:
    return sysfs.driver_attr(VFIO_DRIVER, attr)


def _record(fn: PciFunction, method: BindMethod) -> DeviceRecord:
    return DeviceRecord(str(fn.bdf), fn.driver, fn.driver_override, fn.ids, method)


def _unbind_native(changer: Changer, fn: PciFunction) -> None:
    if fn.driver is not None:
        changer.write(str(fn.bdf), sysfs.driver_attr(fn.driver, "unbind"), str(fn.bdf))


def _bind_by_override(changer: Changer, journal: Journal, fn: PciFunction) -> None:
    journal.record_device(_record(fn, BindMethod.DRIVER_OVERRIDE))
    changer.write(str(fn.bdf), sysfs.device_attr(fn.bdf, "driver_override"), VFIO_DRIVER)
    _unbind_native(changer, fn)
    changer.write(str(fn.bdf), sysfs.drivers_probe(), str(fn.bdf))


def _bind_by_new_id(
    changer: Changer, journal: Journal, pending: Sequence[PciFunction], functions: Sequence[PciFunction]
) -> list[str]:
    """The walkthrough's way: unbind, add the ids to vfio-pci's new_id (which binds the unbound device),
    bind further devices with the same ids through `bind`, then remove the id so nothing else is captured.
    Returns warnings about bystanders that new_id captured and that were released again."""
    warnings: list[str] = []
    by_ids: dict[tuple[int, int], list[PciFunction]] = {}
    for fn in pending:
        by_ids.setdefault((fn.vendor_id, fn.device_id), []).append(fn)
    taken = {fn.bdf for fn in pending}
    for (vendor, device), fns in by_ids.items():
        first, rest = fns[0], fns[1:]
        record = NewIdRecord(VFIO_DRIVER, vendor, device)
        # Unbound devices with these ids (and no override) are bound by new_id too: journal them first.
        bystanders = [
            f for f in functions
            if (f.vendor_id, f.device_id) == (vendor, device) and f.bdf not in taken
            and f.driver is None and f.driver_override is None
        ]
        for b in bystanders:
            journal.record_device(_record(b, BindMethod.NEW_ID))
        journal.record_device(_record(first, BindMethod.NEW_ID))
        _unbind_native(changer, first)
        journal.record_new_id(record)
        new_id = _vfio("new_id")
        added = changer.write(str(first.bdf), new_id, record.line, tolerate={errno.EEXIST})
        if added == errno.EEXIST:
            # Someone else put these ids there: not ours to remove; bind explicitly as the id will not probe.
            journal.forget_new_id(record)
            changer.write(str(first.bdf), _vfio("bind"), str(first.bdf), tolerate={errno.EBUSY})
        for fn in rest:
            journal.record_device(_record(fn, BindMethod.NEW_ID))
            if fn.driver is None and added != errno.EEXIST:
                continue  # unbound before new_id: new_id has bound it already
            _unbind_native(changer, fn)
            changer.write(str(fn.bdf), _vfio("bind"), str(fn.bdf), tolerate={errno.EBUSY})
        if added != errno.EEXIST:
            changer.write(str(first.bdf), _vfio("remove_id"), record.line)
            journal.forget_new_id(record)
        for b in bystanders:
            changer.write(str(b.bdf), _vfio("unbind"), str(b.bdf), tolerate={errno.ENODEV})
            journal.forget_device(str(b.bdf))
            warnings.append(f"{b.bdf}: new_id bound it to vfio-pci too (same ids {b.ids}); released it again")
    return warnings


def _bound_to_vfio(fn: PciFunction) -> bool:
    try:
        now = sysfs.read_function(fn.bdf)
    except HostUsageError:
        return False
    path = now.vfio_group_path
    return now.driver == VFIO_DRIVER and path is not None and path.exists()


UNSAFE_INTERRUPTS_FLAG = "--allow-unsafe-interrupts"


def _check_interrupt_isolation(facts: hostfacts.HostFacts, allow_unsafe_interrupts: bool) -> list[str]:
    """Without interrupt remapping a device's MSI writes are not isolated: refuse unless the caller accepted
    that by name (the flag, which also makes VFIO accept the device). Returns the warnings to show."""
    if facts.interrupt_remapping:
        return []
    if not allow_unsafe_interrupts:
        already = " (vfio_iommu_type1 allow_unsafe_interrupts is already on, set by someone else)" \
            if facts.unsafe_interrupts_allowed else ""
        raise RefusedError(
            f"no interrupt remapping on this host{already}: a guest could make its device inject interrupts "
            f"into the host; enable it (VT-d/AMD-Vi with intremap=on) or accept the risk with "
            f"{UNSAFE_INTERRUPTS_FLAG}"
        )
    return [f"no interrupt remapping on this host: unsafe interrupts allowed ({UNSAFE_INTERRUPTS_FLAG}); the "
            "guest is not isolated from the host's interrupts"]


def bind_to_vfio(
    devices: Iterable[str | Bdf],
    *,
    group: bool = False,
    method: BindMethod = BindMethod.DRIVER_OVERRIDE,
    allow_unsafe_interrupts: bool = False,
    force: bool = False,
    owner: int | None = None,
    dry_run: bool = False,
    on_step: StepHook | None = None,
    journal_dir: Path = JOURNAL_DIR,
) -> Outcome:
    """Bind the devices (with `group`, their whole IOMMU groups) to vfio-pci, journalling their original
    state first; already-bound devices are left alone. Raises HostUsageError for unknown devices, RefusedError
    for devices that must not be taken, HostError when a step or the final check fails.

    Everything from the scan on happens under the journal's lock: a second bind (or a managed VM) waits for
    the first and then sees its result (the device already on vfio-pci), never the state before it.

    With `owner` (a uid), each group's /dev/vfio/<group> is then handed to that user (ownership.py)."""
    requested = sysfs.resolve_all(devices)
    if not requested:
        raise HostUsageError("name at least one device")
    changer = Changer(dry_run, on_step)
    with open_journal(journal_dir, dry_run) as journal:
        functions = sysfs.scan()
        db = load_pci_ids()
        targets = select_targets(requested, functions, group, db)
        warnings: list[str] = []
        for fn in targets:
            uses = host_uses(fn.sysfs_path)
            if uses and not force:
                raise RefusedError(
                    f"{fn.bdf}: in use by the host: {'; '.join(str(u) for u in uses)}; stop that first, "
                    "or override with --force"
                )
            warnings += [f"{fn.bdf}: taken although in use by the host (--force): {u.detail}" for u in uses]
        warnings += _check_interrupt_isolation(hostfacts.gather(), allow_unsafe_interrupts)
        pending = [fn for fn in targets if fn.driver != VFIO_DRIVER]
        ensure_vfio_modules(changer, journal, allow_unsafe_interrupts)
        try:
            if method is BindMethod.NEW_ID:
                warnings += _bind_by_new_id(changer, journal, pending, functions)
            else:
                for fn in pending:
                    _bind_by_override(changer, journal, fn)
            if not dry_run:
                failed = [fn for fn in targets if not sysfs.settle(functools.partial(_bound_to_vfio, fn))]
                if failed:
                    raise HostError(_bind_failure(failed))
            if owner is not None:
                for number in sorted({str(fn.iommu_group) for fn in targets if fn.iommu_group is not None}):
                    hand_over(changer, journal, number, owner)
        except HostError as e:
            if dry_run:
                raise
            raise HostError(_rollback(e, pending, changer, journal)) from None
    outcomes = []
    for fn in targets:
        path = fn.vfio_group_path
        if fn.driver == VFIO_DRIVER:
            note = "already bound to vfio-pci, nothing to do"
        else:
            was = fn.driver or "no driver"
            note = f"{'would be bound' if dry_run else 'bound'} to vfio-pci (was {was})"
        outcomes.append(DeviceOutcome(
            fn.bdf, fn.driver, fn.driver if dry_run else VFIO_DRIVER, fn in pending, note,
            str(path) if path is not None else None,
        ))
    return Outcome(tuple(outcomes), tuple(changer.steps), tuple(warnings), dry_run)


def _bind_failure(failed: Sequence[PciFunction]) -> str:
    parts = []
    for fn in failed:
        now = sysfs.read_function(fn.bdf)
        where = f"on {now.driver}" if now.driver else "on no driver"
        if now.driver == VFIO_DRIVER:
            where = f"on vfio-pci but {now.vfio_group_path} did not appear"
        parts.append(f"{fn.bdf} is {where}")
    return "binding vfio-pci failed: " + "; ".join(parts) + " (the kernel log says why: dmesg | tail)"


def _rollback(error: HostError, pending: Sequence[PciFunction], changer: Changer, journal: Journal) -> str:
    """Give back what this bind changed; the message says whether that worked."""
    try:
        drop_new_ids(changer, journal)
        for group in list(journal.state.nodes):
            give_back_node(changer, journal, group)
        for fn in pending:
            record = journal.state.devices.get(str(fn.bdf))
            if record is not None:
                give_back(changer, journal, fn.bdf, record)
    except HostError as again:
        return f"{error}; giving the devices back failed too ({again}): run `pyvmm-host restore --all`"
    return f"{error}; the devices were given back to their drivers"
