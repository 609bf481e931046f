"""Where a guest console's bytes go, and where its input comes from (`--serial` and `--console`
tty|null|file=): shared by the 16550 UART and virtio-console."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import stat
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable

from pyvmm import sandbox
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


def open_output_file(path: str | os.PathLike[str], flag: str = "--serial") -> int:
    """`--serial file=PATH` (or `--console file=PATH`: `flag`) as pyvmm (root) opens it: created, or an
    existing regular file truncated; never through a symlink (a planted link would make pyvmm truncate any
    file it names) and never a device, FIFO or directory (docs/cli.md#serial-port-and-console). UsageError
    (exit 2), one line, otherwise."""
    option = f"{flag} file={os.fspath(path)}"
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
    """A byte sink: a dup of stdout (tty), a file (at most `file_limit` bytes), or nothing (null). `flag`
    names the option in errors and warnings."""

    def __init__(
        self, config: ConsoleConfig, flag: str = "--serial", file_limit: int = SERIAL_FILE_LIMIT
    ) -> None:
        self._flag = flag
        self._fd: int | None = None
        self._room: int | None = None  # bytes the file may still take; None: no bound (a terminal)
        self._path = config.path
        self._limit = file_limit
        self._dropping = False
        if config.mode is ConsoleMode.TTY:
            self._fd = os.dup(sys.stdout.fileno())
        elif config.mode is ConsoleMode.FILE:
            assert config.path is not None  # the parser requires a path for file=
            self._fd = open_output_file(config.path, flag)
            self._room = file_limit

    def write(self, data: bytes) -> None:
        if self._fd is None:
            return
        view = memoryview(data)
        if self._room is not None:
            if len(view) > self._room:
                if not self._dropping:
                    log.warning("%s file=%s: the file reached its bound of %d bytes; the guest's further "
                                "output is dropped", self._flag, self._path, self._limit)
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
    """Feeds stdin to a guest console (the serial port or virtio-console); a terminal is put in raw mode and
    restored on close. `deliver(data)` returns how many bytes the device took (it is retried with the rest
    a moment later: input is held back, never dropped) or None to stop."""

    def __init__(self, deliver: Callable[[bytes], int | None], name: str = "serial-input") -> None:
        self._deliver = deliver
        self._name = name
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
        self._thread = threading.Thread(target=self._pump, name=self._name, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        sandbox.enter(sandbox.ThreadKind.TERMINAL_INPUT)  # this thread's seccomp filter, when on
        while True:
            try:
                data = os.read(self._fd, 256)
            except OSError:
                return
            if not data:
                return
            # The device takes what fits (the UART's FIFO, virtio-console's bounded buffer); wait for the
            # guest to drain it rather than drop input.
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


def terminal_size(fd: int | None = None) -> tuple[int, int] | None:
    """(columns, rows) of the terminal on `fd` (stdout by default); None when it is not a terminal."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno() if fd is None else fd)
    except (OSError, ValueError):
        return None
    return size.columns, size.lines


class TerminalResize:
    """Tells `on_resize(columns, rows)` when stdout's terminal changes size (SIGWINCH; the handler runs on
    the main thread, which `start` and `close` must be called on)."""

    def __init__(self, on_resize: Callable[[int, int], None], fd: int | None = None) -> None:
        self._on_resize = on_resize
        self._fd = fd  # None: stdout
        self._previous: signal.Handlers | Callable[..., object] | int | None = None
        self._installed = False

    def _handler(self, signum: int, frame: object) -> None:
        size = terminal_size(self._fd)
        if size is not None:
            self._on_resize(*size)

    def start(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGWINCH, self._handler)
            self._installed = True
        except ValueError:  # not the main thread: the size stays what it was at start
            self._installed = False

    def close(self) -> None:
        if self._installed:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGWINCH, self._previous)
            self._installed = False
