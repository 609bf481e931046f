"""Where the serial port's bytes go, and where its input comes from (`--serial tty|null|file=`)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable

from pyvmm.config import ConsoleConfig, ConsoleMode
from pyvmm.errors import UsageError

log = logging.getLogger(__name__)

# A guest printing forever must not fill the host's disk: `--serial file=` keeps the first 64 MiB and drops
# the rest (docs/cli.md#serial-port-and-console). Fixed, not an option: neither CH nor QEMU has a key for it.
SERIAL_FILE_LIMIT = 64 << 20

_FILE_KINDS = {
    stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
}


def open_output_file(path: str | os.PathLike[str]) -> int:
    """`--serial file=PATH` as pyvmm (root) opens it: created, or an existing regular file truncated; never
    through a symlink (a planted link would make pyvmm truncate any file it names) and never a device, FIFO
    or directory (docs/cli.md#serial-port-and-console). UsageError (exit 2), one line, otherwise."""
    option = f"--serial file={os.fspath(path)}"
    # O_NONBLOCK: a FIFO without a reader must not hang pyvmm before it is refused; no O_TRUNC before fstat
    # has said it is a regular file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise UsageError(f"{option}: is a symbolic link, which pyvmm does not follow: name the file "
                             f"itself ({os.path.realpath(path)})") from None
        kind = _kind(path)
        if kind is not None:
            raise UsageError(f"{option}: is {kind}, not a regular file: name a new or regular file") from None
        raise UsageError(f"{option}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise UsageError(f"{option}: is {kind}, not a regular file: name a new or regular file")
        os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
    except OSError as exc:
        os.close(fd)
        raise UsageError(f"{option}: {exc.strerror}") from None
    except UsageError:
        os.close(fd)
        raise
    return fd


def _kind(path: str | os.PathLike[str]) -> str | None:
    """What a path that is not a regular file is (for the message); None when it is one or is not there."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


class ConsoleOutput:
    """A byte sink: a dup of stdout (tty), a file (at most `file_limit` bytes), or nothing (null)."""

    def __init__(self, config: ConsoleConfig, file_limit: int = SERIAL_FILE_LIMIT) -> None:
        self._fd: int | None = None
        self._room: int | None = None  # bytes the file may still take; None: no bound (a terminal)
        self._path = config.path
        self._limit = file_limit
        self._dropping = False
        if config.mode is ConsoleMode.TTY:
            self._fd = os.dup(sys.stdout.fileno())
        elif config.mode is ConsoleMode.FILE:
            assert config.path is not None  # the parser requires a path for file=
            self._fd = open_output_file(config.path)
            self._room = file_limit

    def write(self, data: bytes) -> None:
        if self._fd is None:
            return
        view = memoryview(data)
        if self._room is not None:
            if len(view) > self._room:
                if not self._dropping:
                    log.warning("--serial file=%s: the file reached its bound of %d bytes; the guest's "
                                "further serial output is dropped", self._path, self._limit)
                self._dropping = True
                view = view[: self._room]
            self._room -= len(view)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                continue
            except OSError:
                self._fd = None  # the reader went away: keep the guest running, drop output
                return
            view = view[n:]

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class TerminalInput:
    """Feeds stdin to the guest's serial port; a terminal is put in raw mode and restored on close."""

    def __init__(self, deliver: Callable[[bytes], int | None]) -> None:
        self._deliver = deliver
        self._fd = sys.stdin.fileno()
        self._saved: list | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            if os.isatty(self._fd):
                self._saved = termios.tcgetattr(self._fd)
                tty.setraw(self._fd)
        except (OSError, termios.error):
            self._saved = None
        self._thread = threading.Thread(target=self._pump, name="serial-input", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 256)
            except OSError:
                return
            if not data:
                return
            # The UART takes what fits in its FIFO; wait for the guest to drain it rather than drop input.
            while data:
                taken = self._deliver(data)
                if taken is None:
                    break
                data = data[taken:]
                if data:
                    time.sleep(0.005)

    def close(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None
