"""Binding functions to vfio-pci and giving them back, journalled so that every change can be undone."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from . import hostfacts, modules, sysfs
from .actions import Changer, Step, StepHook
from .bdf import Bdf
from .errors import HostError, RefusedError, UsageError
from .groups import blocks_group, group_of
from .inuse import host_uses
from .journal import JOURNAL_DIR, BindMethod, DeviceRecord, Journal, NewIdRecord, ParamRecord, read_state
from .modules import ModuleState
from .pciids import PciIds, load_pci_ids
from .preflight import describe
from .sysfs import VFIO_DRIVER, PciFunction

SETTLE_SECONDS = 5.0  # how long a driver link or /dev/vfio node may take to appear


@dataclass(frozen=True)
class DeviceOutcome:
    bdf: Bdf
    driver_before: str | None
    driver_after: str | None
    changed: bool
    note: str  # one phrase: "bound to vfio-pci (was sdhci-pci)", "already bound to vfio-pci", ...
    vfio_group: str | None = None  # /dev/vfio/<group> once on vfio-pci


@dataclass(frozen=True)
class Outcome:
    devices: tuple[DeviceOutcome, ...]
    steps: tuple[Step, ...]
    warnings: tuple[str, ...] = ()
    dry_run: bool = False

    @property
    def changed(self) -> list[Bdf]:
        return [d.bdf for d in self.devices if d.changed]


class _DryJournal(Journal):
    """A journal that reads the real state but never writes or locks: for dry runs."""

    def __enter__(self) -> Journal:
        self.state = read_state(self.directory)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    def save(self) -> None:
        pass


def _journal(directory: Path, dry_run: bool) -> Journal:
    return _DryJournal(directory) if dry_run else Journal(directory)


def _resolve_all(devices: Iterable[str | Bdf]) -> list[Bdf]:
    bdfs: list[Bdf] = []
    for d in devices:
        bdf = sysfs.resolve(d)
        if bdf not in bdfs:
            bdfs.append(bdf)
    return bdfs


def _dev(bdf: Bdf, attr: str) -> str:
    return str(sysfs.device_dir(bdf) / attr)


def _drv(driver: str, attr: str) -> str:
    return str(sysfs.driver_dir(driver) / attr)


def _settle(check: Callable[[], bool], seconds: float = SETTLE_SECONDS) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# --- choosing what to bind ---------------------------------------------------------------------------


def select_targets(
    requested: Sequence[Bdf], functions: Sequence[PciFunction], whole_group: bool, db: PciIds
) -> list[PciFunction]:
    """The functions a bind must take: the requested ones, plus with `whole_group` every other endpoint
    of their groups. Refuses bridges, devices without an IOMMU group and, without `whole_group`, partial
    groups."""
    by_bdf = {f.bdf: f for f in functions}
    chosen: list[PciFunction] = []
    for bdf in requested:
        fn = by_bdf.get(bdf) or sysfs.read_function(bdf)
        if fn.is_bridge:
            raise RefusedError(f"{bdf}: is a bridge ({describe(fn, db)}); VFIO passes endpoints only")
        group = group_of(fn, functions)
        if group is None:
            raise RefusedError(
                f"{bdf}: has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on) and check "
                "`pyvmm-host check`"
            )
        if fn not in chosen:
            chosen.append(fn)
        others = [m for m in group.members if m.bdf != bdf]
        if whole_group:
            for m in others:
                if not m.is_bridge and m not in chosen:
                    chosen.append(m)
            stuck = [m for m in others if m.is_bridge and blocks_group(m)]
            if stuck:
                named = ", ".join(describe(m, db) for m in stuck)
                raise RefusedError(
                    f"{bdf}: IOMMU group {group.number} also holds the bridge {named}, which cannot be "
                    "passed through; the group can never be viable in this slot"
                )
    if not whole_group:
        for fn in list(chosen):
            group = group_of(fn, functions)
            assert group is not None
            missing = [m for m in group.members if blocks_group(m) and m not in chosen]
            if missing:
                named = ", ".join(describe(m, db) for m in missing)
                raise RefusedError(
                    f"{fn.bdf}: IOMMU group {group.number} is only partly taken: it also holds {named}; name "
                    f"{'them' if len(missing) > 1 else 'it'} too or use --group"
                )
    return chosen


# --- modules -----------------------------------------------------------------------------------------


def _ensure_modules(changer: Changer, journal: Journal, allow_unsafe_interrupts: bool) -> None:
    type1 = modules.module_state(modules.VFIO_IOMMU_TYPE1)
    if type1.present:
        if allow_unsafe_interrupts:
            current = modules.read_param(modules.VFIO_IOMMU_TYPE1, modules.UNSAFE_INTERRUPTS)
            if current is None:
                raise HostError(
                    f"{modules.VFIO_IOMMU_TYPE1} has no {modules.UNSAFE_INTERRUPTS} parameter in "
                    "/sys/module: this kernel cannot allow unsafe interrupts at run time"
                )
            if not modules.is_true(current):
                param = ParamRecord(modules.VFIO_IOMMU_TYPE1, modules.UNSAFE_INTERRUPTS, current)
                journal.record_param(param)
                changer.write(
                    modules.VFIO_IOMMU_TYPE1,
                    str(modules.param_path(modules.VFIO_IOMMU_TYPE1, modules.UNSAFE_INTERRUPTS)),
                    "1",
                )
    else:
        _need_modprobe(changer, modules.VFIO_IOMMU_TYPE1, type1)
        params = {modules.UNSAFE_INTERRUPTS: "1"} if allow_unsafe_interrupts else {}
        if allow_unsafe_interrupts:
            journal.record_param(ParamRecord(modules.VFIO_IOMMU_TYPE1, modules.UNSAFE_INTERRUPTS, None))
        changer.run(modules.VFIO_IOMMU_TYPE1, modules.modprobe_argv(modules.VFIO_IOMMU_TYPE1, params))
    if not sysfs.driver_dir(VFIO_DRIVER).is_dir():
        _need_modprobe(changer, "vfio-pci", modules.module_state(modules.VFIO_PCI))
        changer.run("vfio-pci", modules.modprobe_argv("vfio-pci"))
        if not changer.dry_run and not _settle(sysfs.driver_dir(VFIO_DRIVER).is_dir):
            raise HostError("vfio-pci: modprobe succeeded but no vfio-pci driver appeared in sysfs")


def _need_modprobe(changer: Changer, name: str, state: ModuleState) -> None:
    if state is ModuleState.MISSING:
        raise HostError(
            f"{name}: kernel module is not loaded and not installed for kernel {os.uname().release}: "
            "use a kernel with VFIO (CONFIG_VFIO_PCI, CONFIG_VFIO_IOMMU_TYPE1)"
        )
    if not changer.dry_run and not modules.have_modprobe():
        raise HostError(f"{name}: kernel module is not loaded and modprobe is not installed: install kmod")


# --- binding -----------------------------------------------------------------------------------------


def _record(fn: PciFunction, method: BindMethod) -> DeviceRecord:
    return DeviceRecord(str(fn.bdf), fn.driver, fn.driver_override, fn.ids, method)


def _unbind_native(changer: Changer, fn: PciFunction) -> None:
    if fn.driver is not None:
        changer.write(str(fn.bdf), _drv(fn.driver, "unbind"), str(fn.bdf))


def _bind_by_override(changer: Changer, journal: Journal, fn: PciFunction) -> None:
    journal.record_device(_record(fn, BindMethod.DRIVER_OVERRIDE))
    changer.write(str(fn.bdf), _dev(fn.bdf, "driver_override"), VFIO_DRIVER)
    _unbind_native(changer, fn)
    changer.write(str(fn.bdf), str(sysfs.DRIVERS_PROBE), str(fn.bdf))


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
        new_id = _drv(VFIO_DRIVER, "new_id")
        added = changer.write(str(first.bdf), new_id, record.line, tolerate={errno.EEXIST})
        if added == errno.EEXIST:
            # Someone else put these ids there: not ours to remove; bind explicitly as the id will not probe.
            journal.forget_new_id(record)
            changer.write(str(first.bdf), _drv(VFIO_DRIVER, "bind"), str(first.bdf), tolerate={errno.EBUSY})
        for fn in rest:
            journal.record_device(_record(fn, BindMethod.NEW_ID))
            if fn.driver is None and added != errno.EEXIST:
                continue  # unbound before new_id: new_id has bound it already
            _unbind_native(changer, fn)
            changer.write(str(fn.bdf), _drv(VFIO_DRIVER, "bind"), str(fn.bdf), tolerate={errno.EBUSY})
        if added != errno.EEXIST:
            changer.write(str(first.bdf), _drv(VFIO_DRIVER, "remove_id"), record.line)
            journal.forget_new_id(record)
        for b in bystanders:
            changer.write(str(b.bdf), _drv(VFIO_DRIVER, "unbind"), str(b.bdf), tolerate={errno.ENODEV})
            journal.forget_device(str(b.bdf))
            warnings.append(f"{b.bdf}: new_id bound it to vfio-pci too (same ids {b.ids}); released it again")
    return warnings


def _bound_to_vfio(fn: PciFunction) -> bool:
    try:
        now = sysfs.read_function(fn.bdf)
    except UsageError:
        return False
    path = now.vfio_group_path
    return now.driver == VFIO_DRIVER and path is not None and path.exists()


def bind_to_vfio(
    devices: Iterable[str | Bdf],
    *,
    group: bool = False,
    method: BindMethod = BindMethod.DRIVER_OVERRIDE,
    allow_unsafe_interrupts: bool = False,
    force: bool = False,
    dry_run: bool = False,
    on_step: StepHook | None = None,
    journal_dir: Path = JOURNAL_DIR,
) -> Outcome:
    """Bind the devices (with `group`, their whole IOMMU groups) to vfio-pci, journalling their original
    state first; already-bound devices are left alone. Raises UsageError for unknown devices, RefusedError
    for devices that must not be taken, HostError when a step or the final check fails."""
    requested = _resolve_all(devices)
    if not requested:
        raise UsageError("name at least one device")
    functions = sysfs.scan()
    db = load_pci_ids()
    targets = select_targets(requested, functions, group, db)
    warnings: list[str] = []
    for fn in targets:
        uses = host_uses(fn.sysfs_path)
        if uses and not force:
            raise RefusedError(
                f"{fn.bdf}: in use by the host: {'; '.join(u.detail for u in uses)}; stop that first, "
                "or override with --force"
            )
        warnings += [f"{fn.bdf}: taken although in use by the host (--force): {u.detail}" for u in uses]
    facts = hostfacts.gather()
    if not facts.interrupt_remapping and not facts.unsafe_interrupts_allowed and not allow_unsafe_interrupts:
        warnings.append(
            "no interrupt remapping on this host: VFIO will refuse the devices unless unsafe interrupts are "
            "allowed (--allow-unsafe-interrupts; see `pyvmm-host check` for the risk)"
        )
    pending = [fn for fn in targets if fn.driver != VFIO_DRIVER]
    changer = Changer(dry_run, on_step)
    with _journal(journal_dir, dry_run) as journal:
        _ensure_modules(changer, journal, allow_unsafe_interrupts)
        try:
            if method is BindMethod.NEW_ID:
                warnings += _bind_by_new_id(changer, journal, pending, functions)
            else:
                for fn in pending:
                    _bind_by_override(changer, journal, fn)
            if not dry_run:
                failed = [fn for fn in targets if not _settle(lambda fn=fn: _bound_to_vfio(fn))]
                if failed:
                    raise HostError(_bind_failure(failed))
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
        _drop_new_ids(changer, journal)
        for fn in pending:
            record = journal.state.devices.get(str(fn.bdf))
            if record is not None:
                _give_back(changer, journal, fn.bdf, record)
    except HostError as again:
        return f"{error}; giving the devices back failed too ({again}): run `pyvmm-host restore --all`"
    return f"{error}; the devices were given back to their drivers"


# --- giving back -------------------------------------------------------------------------------------


def _give_back(changer: Changer, journal: Journal, bdf: Bdf, record: DeviceRecord | None) -> DeviceOutcome:
    """Return one device to the journalled driver (reprobe when none was recorded) and its override."""
    fn = sysfs.read_function(bdf)
    subject = str(bdf)
    if record is None:
        if fn.driver != VFIO_DRIVER and fn.driver_override != VFIO_DRIVER:
            return DeviceOutcome(bdf, fn.driver, fn.driver, False, "not bound to vfio-pci, nothing to do")
        if fn.driver == VFIO_DRIVER:
            changer.write(subject, _drv(VFIO_DRIVER, "unbind"), subject)
        if fn.driver_override == VFIO_DRIVER:
            changer.write(subject, _dev(bdf, "driver_override"), "\n")
        changer.write(subject, str(sysfs.DRIVERS_PROBE), subject)
        after = None if changer.dry_run else sysfs.read_function(bdf).driver
        return DeviceOutcome(bdf, fn.driver, after, True, f"reprobed ({after or 'no driver'} took it)")
    if fn.driver is not None and fn.driver != record.driver:
        changer.write(subject, _drv(fn.driver, "unbind"), subject)
    if fn.driver_override != record.driver_override:
        changer.write(subject, _dev(bdf, "driver_override"), record.driver_override or "\n")
    if record.driver is None:
        changer.write(subject, str(sysfs.DRIVERS_PROBE), subject)
    elif fn.driver != record.driver:
        bind = _drv(record.driver, "bind")
        if changer.dry_run or Path(bind).exists():
            failed = changer.write(subject, bind, subject, tolerate={errno.ENODEV, errno.EINVAL, errno.EBUSY})
        else:
            failed = errno.ENOENT
        if failed is not None:
            changer.write(subject, str(sysfs.DRIVERS_PROBE), subject)  # the driver will not take it by name
    if (not changer.dry_run and record.driver is not None
            and not _settle(lambda: sysfs.read_function(bdf).driver == record.driver)):
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


def _drop_new_ids(changer: Changer, journal: Journal) -> None:
    for record in list(journal.state.new_ids):
        changer.write(record.driver, _drv(record.driver, "remove_id"), record.line, tolerate={errno.ENODEV})
        journal.forget_new_id(record)


def _restore_params(changer: Changer, journal: Journal) -> None:
    for record in list(journal.state.params):
        path = modules.param_path(record.module, record.name)
        # A module we loaded with the parameter set had the kernel default (off) before.
        original = record.original if record.original is not None else "N"
        if changer.dry_run or path.exists():
            changer.write(record.module, str(path), original)
        journal.forget_param(record)


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
    with _journal(journal_dir, dry_run) as journal:
        _drop_new_ids(changer, journal)
        if devices is None:
            bdfs = []
            for name in journal.state.devices:
                try:
                    bdfs.append(sysfs.resolve(name))
                except UsageError:
                    journal.forget_device(name)  # gone (hot-unplugged): nothing to give back
        else:
            bdfs = _resolve_all(devices)
        for bdf in bdfs:
            outcomes.append(_give_back(changer, journal, bdf, journal.state.devices.get(str(bdf))))
        if not journal.state.devices:
            _restore_params(changer, journal)
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
        raise UsageError("name at least one device")
    return restore(names, dry_run=dry_run, on_step=on_step, journal_dir=journal_dir)
