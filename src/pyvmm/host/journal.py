"""The journal of original host state under /run/pyvmm, written before every change so that a crash at
any point leaves enough to give everything back. One JSON document, replaced atomically and fsynced; a
lock file serialises pyvmm processes touching the host."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import HostError

JOURNAL_DIR = Path("/run/pyvmm")
JOURNAL_NAME = "host-journal.json"
LOCK_NAME = "host.lock"
FORMAT = "pyvmm-host-journal"
VERSION = 1


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


@dataclass
class JournalState:
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    new_ids: list[NewIdRecord] = field(default_factory=list)
    params: list[ParamRecord] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.devices or self.new_ids or self.params)

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
                state.devices[d["bdf"]] = DeviceRecord(
                    d["bdf"], d["driver"], d["driver_override"], d["ids"], BindMethod(d["method"])
                )
            state.new_ids = [
                NewIdRecord(n["driver"], int(n["vendor_id"], 16), int(n["device_id"], 16))
                for n in doc["new_ids"]
            ]
            state.params = [ParamRecord(p["module"], p["name"], p["original"]) for p in doc["params"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed entry ({type(e).__name__}: {e})") from None
        return state


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The on-disk journal, held under an exclusive lock while open (a context manager)."""

    def __init__(self, directory: Path = JOURNAL_DIR) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.state = JournalState()
        self._lock_fd: int | None = None

    def __enter__(self) -> Journal:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise HostError(
                f"cannot open the journal in {self.directory}: {e.strerror} (run as root)"
            ) from None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.state = read_state(self.directory)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def save(self) -> None:
        """Make the state durable: write a temporary file, fsync it, rename it over, fsync the directory."""
        if self.state.empty:
            if self.path.exists():
                self.path.unlink()
                _fsync_dir(self.directory)
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self.state.to_text().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)

    # Each recorder saves before returning: callers make the change only afterwards.

    def record_device(self, record: DeviceRecord) -> None:
        """Remember a device's original state; the first record wins (it is the state to go back to)."""
        if record.bdf not in self.state.devices:
            self.state.devices[record.bdf] = record
            self.save()

    def forget_device(self, bdf: str) -> None:
        if self.state.devices.pop(bdf, None) is not None:
            self.save()

    def record_new_id(self, record: NewIdRecord) -> None:
        if record not in self.state.new_ids:
            self.state.new_ids.append(record)
            self.save()

    def forget_new_id(self, record: NewIdRecord) -> None:
        if record in self.state.new_ids:
            self.state.new_ids.remove(record)
            self.save()

    def record_param(self, record: ParamRecord) -> None:
        if not any((p.module, p.name) == (record.module, record.name) for p in self.state.params):
            self.state.params.append(record)
            self.save()

    def forget_param(self, record: ParamRecord) -> None:
        key = (record.module, record.name)
        self.state.params = [p for p in self.state.params if (p.module, p.name) != key]
        self.save()


def read_state(directory: Path = JOURNAL_DIR) -> JournalState:
    """The journal's state without locking (for dry runs and reports); empty when there is none."""
    path = directory / JOURNAL_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return JournalState()
    except OSError as e:
        raise HostError(f"cannot read the journal {path}: {e.strerror}") from None
    try:
        return JournalState.from_text(text)
    except ValueError as e:
        raise HostError(f"the journal {path} is damaged: {e}; repair or remove it by hand") from None


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
