"""Where the serial port's bytes go, and where its input comes from (`--serial tty|null|file=`)."""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable

from pyvmm.config import ConsoleConfig, ConsoleMode


class ConsoleOutput:
    """A byte sink: a dup of stdout (tty), a file, or nothing (null)."""

    def __init__(self, config: ConsoleConfig) -> None:
        self._fd: int | None = None
        if config.mode is ConsoleMode.TTY:
            self._fd = os.dup(sys.stdout.fileno())
        elif config.mode is ConsoleMode.FILE:
            assert config.path is not None  # the parser requires a path for file=
            self._fd = os.open(config.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def write(self, data: bytes) -> None:
        if self._fd is None:
            return
        view = memoryview(data)
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
