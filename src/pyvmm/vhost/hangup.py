"""Watching vhost-user backends for their end: one `vhost-user` thread polls every backend socket for a
hang-up (the backend process died or closed the connection) and reports it once per socket. It polls for
no input, so it never competes with the thread that is talking to the backend
(docs/virtio-blk.md#a-dead-backend).

Sockets come and go while it runs (a disk hot-plugged or ejected: docs/hotplug.md): `add` and `remove`
wake the thread through an eventfd. `remove` returns only once the thread has stopped polling the socket,
so that the caller may close it: a closed descriptor polls as POLLNVAL, which would read as a hang-up, and
its number may be reused by the next file opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Iterable

from pyvmm import sandbox
from pyvmm.threadname import set_thread_comm

log = logging.getLogger(__name__)

THREAD_NAME = "vhost-user"
_HANGUP_EVENTS = select.POLLHUP | select.POLLERR | select.POLLNVAL
# How long `remove` waits for the thread to let go of a socket; it only ever waits while the thread builds
# a stop message (a daemon's exit status and last log line), which takes milliseconds.
_REMOVE_WAIT_SECONDS = 10.0


class HangupWatch:
    """`on_hangup(message())` is called (on the watch's thread) when a watched socket hangs up, where
    `message` is what `add` was given with it; once per socket. A VM service (pyvmm.machine.Service):
    started beside the vCPUs, so that it takes its own seccomp filter; closed before the sockets are.
    `sockets`: (fd, message) pairs watched from the start."""

    def __init__(self, on_hangup: Callable[[str], None],
                 sockets: Iterable[tuple[int, Callable[[], str]]] = ()) -> None:
        self._on_hangup = on_hangup
        self._cond = threading.Condition()
        self._watched: dict[int, Callable[[], str]] = dict(sockets)  # what the thread should poll
        self._changes = 0  # bumped by every add and remove
        self._applied = 0  # the last `_changes` the thread's poll set reflects
        self._running = False
        self._stopping = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None

    def add(self, fd: int, message: Callable[[], str]) -> None:
        """Watch socket `fd` from now on (a hang-up that came before is reported too: POLLHUP stays)."""
        with self._cond:
            self._watched[fd] = message
            self._changes += 1
            if self._running:
                os.eventfd_write(self._wake, 1)

    def remove(self, fd: int) -> None:
        """Stop watching `fd`; when this returns, the thread no longer polls it and the caller may close it.
        Nothing happens for an fd not watched (or already reported)."""
        with self._cond:
            if self._watched.pop(fd, None) is None:
                return
            self._changes += 1
            if not self._running:
                return
            if threading.current_thread() is self._thread:
                return  # its own poll set is brought up to date before it polls again
            wanted = self._changes
            os.eventfd_write(self._wake, 1)
            if not self._cond.wait_for(lambda: self._applied >= wanted or not self._running,
                                       _REMOVE_WAIT_SECONDS):
                log.warning("the vhost-user hang-up watch did not let go of fd %d in %.0f s", fd,
                            _REMOVE_WAIT_SECONDS)

    def watched(self) -> list[int]:
        """The sockets watched now."""
        with self._cond:
            return sorted(self._watched)

    def start(self) -> None:
        with self._cond:
            self._running = True
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            sandbox.enter(sandbox.ThreadKind.VHOST_USER)
            set_thread_comm(THREAD_NAME)
            self._poll_until_stopped()
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()

    def _poll_until_stopped(self) -> None:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        polled: set[int] = set()
        while True:
            with self._cond:  # bring the poll set to what add/remove asked for, and say so
                if self._stopping:
                    return
                wanted = set(self._watched)
                for fd in polled - wanted:
                    poller.unregister(fd)
                for fd in wanted - polled:
                    poller.register(fd, 0)  # POLLHUP and POLLERR are always reported
                polled = wanted
                self._applied = self._changes
                self._cond.notify_all()
            for fd, events in poller.poll():
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                    continue
                if not events & _HANGUP_EVENTS:
                    continue
                poller.unregister(fd)
                polled.discard(fd)
                with self._cond:
                    message = self._watched.pop(fd, None)
                if message is not None:  # None: removed meanwhile, no longer ours to report
                    log.debug("fd %d: the backend hung up (poll events %#x)", fd, events)
                    self._on_hangup(message())

    def close(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                os.eventfd_write(self._wake, 1)
            self._thread.join(timeout=10)
            self._thread = None
        if self._wake >= 0:
            with contextlib.suppress(OSError):
                os.close(self._wake)
            self._wake = -1
