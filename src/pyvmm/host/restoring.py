"""Giving devices back: to the driver and override the journal recorded, or by reprobing; removing
leftover dynamic ids; restoring module parameters."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from pathlib import Path

from . import modules, sysfs
from .actions import Changer, StepHook
from .bdf import Bdf, parse_bdf
from .errors import HostError, HostUsageError
from .journal import JOURNAL_DIR, DeviceRecord, Journal, open_journal
from .outcome import DeviceOutcome, Outcome
from .ownership import give_back_node
from .sysfs import VFIO_DRIVER


def give_back(changer: Changer, journal: Journal, bdf: Bdf, record: DeviceRecord | None) -> DeviceOutcome:
    """Return one device to the journalled driver (reprobe when none was recorded) and its override."""
    fn = sysfs.read_function(bdf)
    subject = str(bdf)
    if record is None:
        if fn.driver != VFIO_DRIVER and fn.driver_override != VFIO_DRIVER:
            return DeviceOutcome(bdf, fn.driver, fn.driver, False, "not bound to vfio-pci, nothing to do")
        if fn.driver == VFIO_DRIVER:
            changer.write(subject, sysfs.driver_attr(VFIO_DRIVER, "unbind"), subject)
        if fn.driver_override == VFIO_DRIVER:
            changer.write(subject, sysfs.device_attr(bdf, "driver_override"), "\n")
        changer.write(subject, sysfs.drivers_probe(), subject)
        after = None if changer.dry_run else sysfs.read_function(bdf).driver
        return DeviceOutcome(bdf, fn.driver, after, True, f"reprobed ({after or 'no driver'} took it)")
    if fn.driver is not None and fn.driver != record.driver:
        changer.write(subject, sysfs.driver_attr(fn.driver, "unbind"), subject)
    if fn.driver_override != record.driver_override:
        changer.write(subject, sysfs.device_attr(bdf, "driver_override"), record.driver_override or "\n")
    if record.driver is None:
        changer.write(subject, sysfs.drivers_probe(), subject)
    elif fn.driver != record.driver:
        bind = sysfs.driver_attr(record.driver, "bind")
        if changer.dry_run or Path(bind).exists():
            failed = changer.write(subject, bind, subject, tolerate={errno.ENODEV, errno.EINVAL, errno.EBUSY})
        else:
            failed = errno.ENOENT
        if failed is not None:
            changer.write(subject, sysfs.drivers_probe(), subject)  # the driver will not take it by name
    if (not changer.dry_run and record.driver is not None
            and not sysfs.settle(lambda: sysfs.read_function(bdf).driver == record.driver)):
        now = sysfs.read_function(bdf).driver
        raise HostError(
            f"{bdf}: giving it back to {record.driver} failed, it is on {now or 'no driver'} "
            "(is the driver module loaded? dmesg | tail); the journal keeps its record"
        )
    journal.forget_device(subject)
    after = record.driver if not changer.dry_run else fn.driver
    if record.driver:
        note = f"{'would go' if changer.dry_run else 'given'} back to {record.driver}"
    else:
        note = "reprobed (it had no driver before)"
    return DeviceOutcome(bdf, fn.driver, after, fn.driver != record.driver or changer.dry_run, note)


def drop_new_ids(changer: Changer, journal: Journal) -> None:
    for record in list(journal.state.new_ids):
        remove_id = sysfs.driver_attr(record.driver, "remove_id")
        changer.write(record.driver, remove_id, record.line, tolerate={errno.ENODEV})
        journal.forget_new_id(record)


def restore_params(changer: Changer, journal: Journal) -> None:
    for record in list(journal.state.params):
        path = modules.param_path(record.module, record.name)
        # A module we loaded with the parameter set had the kernel default (off) before.
        original = record.original if record.original is not None else "N"
        if changer.dry_run or path.exists():
            changer.write(record.module, str(path), original)
        journal.forget_param(record)


def _gone_from_host(journal: Journal, name: str | Bdf) -> Bdf | None:
    """A device the journal holds that is no longer on the host (removed, hot-unplugged): forgotten."""
    try:
        bdf = name if isinstance(name, Bdf) else parse_bdf(name)
    except HostUsageError:
        return None
    if str(bdf) not in journal.state.devices or sysfs.device_dir(bdf).is_dir():
        return None
    journal.forget_device(str(bdf))
    return bdf


def restore(
    devices: Iterable[str | Bdf] | None = None,
    *,
    dry_run: bool = False,
    on_step: StepHook | None = None,
    journal_dir: Path = JOURNAL_DIR,
) -> Outcome:
    """Give devices back: the named ones, or (None) everything the journal holds. A named device that the
    journal does not know but that sits on vfio-pci is unbound and reprobed. Dynamic ids the journal holds
    (left by an interrupted new_id bind) go first, so no reprobe lands on vfio-pci again; once the journal
    holds no device, module parameters are restored."""
    changer = Changer(dry_run, on_step)
    outcomes: list[DeviceOutcome] = []
    with open_journal(journal_dir, dry_run) as journal:
        drop_new_ids(changer, journal)
        if devices is None:
            bdfs = []
            for recorded in list(journal.state.devices):
                try:
                    bdfs.append(sysfs.resolve(recorded))
                except HostUsageError:
                    journal.forget_device(recorded)  # gone (hot-unplugged): nothing to give back
        else:
            bdfs = []
            for name in devices:
                gone = _gone_from_host(journal, name)
                if gone is not None:
                    note = "gone from the host, nothing to give back"
                    outcomes.append(DeviceOutcome(gone, None, None, False, note))
                    continue
                bdf = sysfs.resolve(name)
                if bdf not in bdfs:
                    bdfs.append(bdf)
        for bdf in bdfs:
            group = sysfs.read_function(bdf).iommu_group
            if group is not None:  # the node first: it disappears with the group's last vfio-pci device
                give_back_node(changer, journal, str(group))
            outcomes.append(give_back(changer, journal, bdf, journal.state.devices.get(str(bdf))))
        if devices is None:
            for left in list(journal.state.nodes):  # groups whose devices are gone
                give_back_node(changer, journal, left)
        if not journal.state.devices:
            restore_params(changer, journal)
    return Outcome(tuple(outcomes), tuple(changer.steps), (), dry_run)


def unbind(
    devices: Iterable[str | Bdf],
    *,
    dry_run: bool = False,
    on_step: StepHook | None = None,
    journal_dir: Path = JOURNAL_DIR,
) -> Outcome:
    """Give the named devices back to their original drivers (see `restore`)."""
    names = list(devices)
    if not names:
        raise HostUsageError("name at least one device")
    return restore(names, dry_run=dry_run, on_step=on_step, journal_dir=journal_dir)
