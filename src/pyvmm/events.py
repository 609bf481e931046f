"""`--event-monitor path=P | fd=N`: what happens to the VMM and its VM, as JSON events in cloud-hypervisor's
format (docs/api.md#event-monitor).

Each event is one pretty-printed JSON object (two-space indent) followed by a blank line:
`timestamp` (`secs`, `nanos` since the monitor was opened), `source` (`vmm`, `vm`), `event` (`starting`,
`booted`, `device-removed`, ...) and `properties` (null or an object of strings). Events come from the
main thread and from vCPU threads (a guest's eject): each is written whole under a lock. The file is
non-blocking, as in cloud-hypervisor: a reader that does not keep up loses events, the VM never waits.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventMonitorConfig:
    """`--event-monitor path=P | fd=N`."""

    path: Path | None = None
    fd: int | None = None


class EventMonitorError(UsageError):
    """--event-monitor names something pyvmm cannot write to."""


def encode_event(elapsed_ns: int, source: str, event: str, properties: Mapping[str, str] | None) -> bytes:
    document = {
        "timestamp": {"secs": elapsed_ns // 1_000_000_000, "nanos": elapsed_ns % 1_000_000_000},
        "source": source,
        "event": event,
        "properties": dict(properties) if properties is not None else None,
    }
    return (json.dumps(document, indent=2) + "\n\n").encode()


class EventMonitor:
    """Writes events to `fd` (which it owns), or nowhere when `fd` is None."""

    def __init__(self, fd: int | None, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._fd = fd
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        if fd is not None:
            os.set_blocking(fd, False)

    @classmethod
    def open(cls, config: EventMonitorConfig | None) -> EventMonitor:
        if config is None:
            return cls(None)
        if config.fd is not None:
            label = f"--event-monitor fd={config.fd}"
            try:
                os.fstat(config.fd)
            except OSError as exc:
                raise EventMonitorError(f"{label}: not an open file descriptor ({exc.strerror})") from None
            return cls(config.fd)
        assert config.path is not None
        try:  # truncated, as cloud-hypervisor opens it; never through a symlink
            fd = os.open(config.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            raise EventMonitorError(f"--event-monitor path={config.path}: {exc.strerror}") from None
        return cls(fd)

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        if self._fd is None:
            return
        data = encode_event(self._clock() - self._start, source, event, properties)
        with self._lock:
            if self._fd is None:
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:  # a full pipe or a reader gone: the event is lost, the VM goes on
                log.debug("event %s/%s not written: %s", source, event, exc)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
