"""The journal of original host state under /run/pyvmm, written before every change so that a crash at
any point leaves enough to give everything back. One JSON document, replaced atomically and fsynced; a
lock file serialises pyvmm processes touching the host."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

from pyvmm.pci_sysfs import Bdf

from .errors import HostError

JOURNAL_DIR = Path("/run/pyvmm")
JOURNAL_NAME = "host-journal.json"
LOCK_NAME = "host.lock"
TMP_NAME = "host-journal.tmp"  # the next journal, renamed over it once durable
FORMAT = "pyvmm-host-journal"
VERSION = 1


# Journal fields become sysfs paths (/sys/bus/pci/drivers/<driver>/bind, /sys/module/<module>/parameters/...)
# and values: a tampered journal must not steer a write anywhere else. Kernel driver and module names are
# plain words; `.` alone or `..` never are.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$")
_IDS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")
_HEX16 = re.compile(r"^[0-9a-fA-F]{1,4}$")
_PARAM_VALUE = re.compile(r"^[\x20-\x7e]{0,64}$")  # one printable line: what a sysfs parameter shows


def _plain(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _PLAIN_NAME.match(value) or ".." in value:
        raise ValueError(f"{kind} {value!r} is not a plain name")
    return value


def _optional_plain(kind: str, value: object) -> str | None:
    return None if value is None else _plain(kind, value)


def _bdf(value: object) -> str:
    bdf = Bdf.from_name(value) if isinstance(value, str) else None
    if bdf is None or str(bdf) != value:
        raise ValueError(f"bdf {value!r} is not a PCI address as the kernel writes it (0000:01:00.0)")
    return value


def _ids(value: object) -> str:
    if not isinstance(value, str) or not _IDS.match(value):
        raise ValueError(f"ids {value!r} is not vendor:device (1b36:0010)")
    return value


def _hex16(kind: str, value: object) -> int:
    if not isinstance(value, str) or not _HEX16.match(value):
        raise ValueError(f"{kind} {value!r} is not a 16-bit hex number")
    return int(value, 16)


_GROUP = re.compile(r"^[0-9]{1,10}$")  # an IOMMU group number: /dev/vfio/<group>, never a path


def _group(value: object) -> str:
    if not isinstance(value, str) or not _GROUP.match(value):
        raise ValueError(f"group {value!r} is not an IOMMU group number")
    return value


def _id(kind: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 0xFFFF_FFFF:
        raise ValueError(f"{kind} {value!r} is not a user or group id")
    return value


def _mode(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o7777:
        raise ValueError(f"mode {value!r} is not a permission mode")
    return value


def _param_value(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or not _PARAM_VALUE.match(value)):
        raise ValueError(f"parameter value {value!r} is not one printable line")
    return value


class BindMethod(Enum):
    DRIVER_OVERRIDE = "driver_override"
    NEW_ID = "new_id"


@dataclass(frozen=True)
class DeviceRecord:
    """A device as it was before pyvmm first touched it."""

    bdf: str
    driver: str | None
    driver_override: str | None
    ids: str  # vendor:device, so a crashed new_id bind can be undone without reading the device
    method: BindMethod


@dataclass(frozen=True)
class NewIdRecord:
    """A dynamic id about to be (or already) added to a driver's new_id."""

    driver: str
    vendor_id: int
    device_id: int

    @property
    def line(self) -> str:
        return f"{self.vendor_id:04x} {self.device_id:04x}"


@dataclass(frozen=True)
class ParamRecord:
    """A module parameter's value before pyvmm changed it; None when the module was not loaded."""

    module: str
    name: str
    original: str | None


@dataclass(frozen=True)
class NodeRecord:
    """A VFIO group node's (/dev/vfio/<group>) owner and mode before `bind --owner` handed it to a user."""

    group: str
    uid: int
    gid: int
    mode: int


@dataclass
class JournalState:
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    new_ids: list[NewIdRecord] = field(default_factory=list)
    params: list[ParamRecord] = field(default_factory=list)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)  # by group number

    @property
    def empty(self) -> bool:
        return not (self.devices or self.new_ids or self.params or self.nodes)

    def to_text(self) -> str:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "devices": [
                {"bdf": d.bdf, "driver": d.driver, "driver_override": d.driver_override, "ids": d.ids,
                 "method": d.method.value}
                for d in self.devices.values()
            ],
            "new_ids": [
                {"driver": n.driver, "vendor_id": f"{n.vendor_id:04x}", "device_id": f"{n.device_id:04x}"}
                for n in self.new_ids
            ],
            "params": [{"module": p.module, "name": p.name, "original": p.original} for p in self.params],
            "nodes": [
                {"group": n.group, "uid": n.uid, "gid": n.gid, "mode": n.mode} for n in self.nodes.values()
            ],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_text(cls, text: str) -> JournalState:
        """Parse a journal document; ValueError (with the reason) when it is not one."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a pyvmm-host journal")
        if doc.get("version") != VERSION:
            raise ValueError(f"journal version {doc.get('version')!r}, this pyvmm reads {VERSION}")
        try:
            state = cls()
            for d in doc["devices"]:
                bdf = _bdf(d["bdf"])
                state.devices[bdf] = DeviceRecord(
                    bdf, _optional_plain("driver", d["driver"]),
                    _optional_plain("driver_override", d["driver_override"]), _ids(d["ids"]),
                    BindMethod(d["method"]),
                )
            state.new_ids = [
                NewIdRecord(_plain("driver", n["driver"]), _hex16("vendor_id", n["vendor_id"]),
                            _hex16("device_id", n["device_id"]))
                for n in doc["new_ids"]
            ]
            state.params = [
                ParamRecord(_plain("module", p["module"]), _plain("parameter", p["name"]),
                            _param_value(p["original"]))
                for p in doc["params"]
            ]
            for n in doc.get("nodes", []):  # absent in journals of pyvmm before `bind --owner`
                group = _group(n["group"])
                state.nodes[group] = NodeRecord(
                    group, _id("uid", n["uid"]), _id("gid", n["gid"]), _mode(n["mode"])
                )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed entry ({type(e).__name__}: {e})") from None
        except ValueError as e:
            raise ValueError(f"malformed entry: {e}") from None
        return state


LOCK_WAIT_SECONDS = 300.0  # a bind of a large group under emulation takes minutes; then give up, in one line
_LOCK_POLL_SECONDS = 0.05
_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC  # never through a symlink planted in the directory, never into a child


def _owner_ok(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _check_dir_stat(directory: Path, st: os.stat_result) -> None:
    """The journal directory must be ours alone: anyone else who can write it can steer pyvmm-host's
    sysfs writes (the journal says what to write where) or swap the lock."""
    if stat.S_ISLNK(st.st_mode):
        raise HostError(f"journal directory {directory} is a symbolic link: remove it (pyvmm-host creates a "
                        "real directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise HostError(f"journal directory {directory} is not a directory: move it out of the way")
    if not _owner_ok(st.st_uid):
        raise HostError(f"journal directory {directory} is owned by uid {st.st_uid}, not root: check who "
                        f"made it, then `chown root: {directory}` or remove it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HostError(f"journal directory {directory} is writable by group or others (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}): check its files, then `chmod go-w {directory}`")


def open_dir(directory: Path, create: bool) -> int | None:
    """An O_DIRECTORY fd of the checked journal directory (created 0700 when `create`); None when it does
    not exist and `create` is false. The checks are repeated on the opened fd: a swap after them is caught."""
    if create:
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise HostError(f"cannot create the journal directory {directory}: {e.strerror} (run as root)") \
                from None
    try:
        _check_dir_stat(directory, os.lstat(directory))
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
    except FileNotFoundError:
        if create:
            raise HostError(f"journal directory {directory} vanished while pyvmm-host opened it: try again") \
                from None
        return None
    except OSError as e:
        raise HostError(f"cannot open the journal directory {directory}: {e.strerror} (run as root)") \
            from None
    try:
        _check_dir_stat(directory, os.fstat(fd))
    except HostError:
        os.close(fd)
        raise
    return fd


def open_file(dir_fd: int, directory: Path, name: str, flags: int, mode: int = 0o600) -> int:
    """Open `name` in the journal directory without following a symlink; refuse a file that is not a
    regular file of ours. OSError (other than a symlink) propagates to the caller, which names the file."""
    path = directory / name
    try:
        fd = os.open(name, flags | _OPEN, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HostError(f"journal file {path} is a symbolic link: remove it") from None
        raise
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"journal file {path} is not a regular file: remove it"
    elif not _owner_ok(st.st_uid):
        problem = f"journal file {path} is owned by uid {st.st_uid}, not root: check who wrote it, remove it"
    if problem is not None:
        os.close(fd)
        raise HostError(problem)
    return fd


def _lock(fd: int, path: Path, seconds: float) -> None:
    """Wait (bounded) for the exclusive lock another pyvmm process may hold for its bind or give-back."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise HostError(
                    f"another pyvmm process has held {path} for {seconds:.0f} s: wait for it to finish "
                    f"(fuser -v {path}) and try again"
                ) from None
            time.sleep(_LOCK_POLL_SECONDS)


class Journal:
    """The on-disk journal, held under an exclusive lock while open (a context manager). Callers scan and
    check the host only inside it, so that what they checked still holds when they change it."""

    def __init__(self, directory: Path = JOURNAL_DIR, lock_wait: float = LOCK_WAIT_SECONDS) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.state = JournalState()
        self.lock_wait = lock_wait
        self._dir_fd: int | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> Journal:
        self._dir_fd = open_dir(self.directory, create=True)
        assert self._dir_fd is not None
        try:
            try:
                self._lock_fd = open_file(self._dir_fd, self.directory, LOCK_NAME, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                lock = self.directory / LOCK_NAME
                raise HostError(f"cannot open the lock {lock}: {e.strerror} (run as root)") from None
            _lock(self._lock_fd, self.directory / LOCK_NAME, self.lock_wait)
            self.state = _read(self._dir_fd, self.directory)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def save(self) -> None:
        """Make the state durable: write a temporary file, fsync it, rename it over, fsync the directory."""
        dir_fd = self._dir_fd
        assert dir_fd is not None, "save() outside `with Journal(...)`"
        try:
            if self.state.empty:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(JOURNAL_NAME, dir_fd=dir_fd)
                    os.fsync(dir_fd)
                return
            tmp = TMP_NAME
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)  # a leftover of a crash: a fresh file, never one opened through
            text = self.state.to_text()
            try:
                JournalState.from_text(text)  # what we could not read back would strand the devices
            except ValueError as e:
                raise HostError(f"refusing to journal an unusual host state: {e}") from None
            fd = open_file(dir_fd, self.directory, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, JOURNAL_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as e:
            raise HostError(f"cannot write the journal {self.path}: {e.strerror}") from None

    # Each recorder saves before returning: callers make the change only afterwards. A record that cannot be
    # saved is taken out again, so that memory and disk agree.

    def _save_or_undo(self, undo: Callable[[], object]) -> None:
        try:
            self.save()
        except HostError:
            undo()
            raise

    def record_device(self, record: DeviceRecord) -> None:
        """Remember a device's original state; the first record wins (it is the state to go back to)."""
        if record.bdf not in self.state.devices:
            self.state.devices[record.bdf] = record
            self._save_or_undo(lambda: self.state.devices.pop(record.bdf))

    def forget_device(self, bdf: str) -> None:
        if self.state.devices.pop(bdf, None) is not None:
            self.save()

    def record_new_id(self, record: NewIdRecord) -> None:
        if record not in self.state.new_ids:
            self.state.new_ids.append(record)
            self._save_or_undo(lambda: self.state.new_ids.remove(record))

    def forget_new_id(self, record: NewIdRecord) -> None:
        if record in self.state.new_ids:
            self.state.new_ids.remove(record)
            self.save()

    def record_node(self, record: NodeRecord) -> None:
        """Remember a group node's original owner; the first record wins."""
        if record.group not in self.state.nodes:
            self.state.nodes[record.group] = record
            self._save_or_undo(lambda: self.state.nodes.pop(record.group))

    def forget_node(self, group: str) -> None:
        if self.state.nodes.pop(group, None) is not None:
            self.save()

    def record_param(self, record: ParamRecord) -> None:
        if not any((p.module, p.name) == (record.module, record.name) for p in self.state.params):
            self.state.params.append(record)
            self._save_or_undo(lambda: self.state.params.remove(record))

    def forget_param(self, record: ParamRecord) -> None:
        key = (record.module, record.name)
        self.state.params = [p for p in self.state.params if (p.module, p.name) != key]
        self.save()


def _read(dir_fd: int, directory: Path) -> JournalState:
    path = directory / JOURNAL_NAME
    try:
        fd = open_file(dir_fd, directory, JOURNAL_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return JournalState()
    except OSError as e:
        raise HostError(f"cannot read the journal {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError as e:
        raise HostError(f"cannot read the journal {path}: {e.strerror}") from None
    try:
        return JournalState.from_text(text)
    except ValueError as e:
        raise HostError(f"the journal {path} is damaged: {e}; repair or remove it by hand") from None


def read_state(directory: Path = JOURNAL_DIR) -> JournalState:
    """The journal's state without locking (for dry runs and reports); empty when there is none. The
    directory and file get the same checks as under the lock."""
    dir_fd = open_dir(directory, create=False)
    if dir_fd is None:
        return JournalState()
    try:
        return _read(dir_fd, directory)
    finally:
        os.close(dir_fd)


class DryRunJournal(Journal):
    """Reads the real journal but never writes or locks it: what a dry run records stays in memory."""

    def __enter__(self) -> Journal:
        self.state = read_state(self.directory)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    def save(self) -> None:
        pass


def open_journal(directory: Path = JOURNAL_DIR, dry_run: bool = False) -> Journal:
    return DryRunJournal(directory) if dry_run else Journal(directory)
