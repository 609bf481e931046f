"""Watching vhost-user backends for their end: one `vhost-user` thread polls every backend socket for a
hang-up (the backend process died or closed the connection) and reports it once per socket. It polls for
no input, so it never competes with the thread that is talking to the backend
(docs/virtio-blk.md#a-dead-backend).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence

from pyvmm import sandbox
from pyvmm.threadname import set_thread_comm

log = logging.getLogger(__name__)

THREAD_NAME = "vhost-user"


class HangupWatch:
    """`on_hangup(label)` is called (on the watch's thread) when the socket `fd` labelled `label` hangs up.
    A VM service (pyvmm.machine.Service): started beside the vCPUs, so that it takes its own seccomp filter;
    closed before the sockets are."""

    def __init__(self, sockets: Sequence[tuple[int, str]], on_hangup: Callable[[str], None]) -> None:
        self._sockets = dict(sockets)
        self._on_hangup = on_hangup
        self._stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sandbox.enter(sandbox.ThreadKind.VHOST_USER)
        set_thread_comm(THREAD_NAME)
        poller = select.poll()
        poller.register(self._stop, select.POLLIN)
        for fd in self._sockets:
            poller.register(fd, 0)  # POLLHUP and POLLERR are always reported
        while self._sockets:
            for fd, events in poller.poll():
                if fd == self._stop:
                    return
                if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    poller.unregister(fd)
                    label = self._sockets.pop(fd)
                    log.debug("%s: the backend hung up (poll events %#x)", label, events)
                    self._on_hangup(label)

    def close(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join(timeout=10)
            self._thread = None
        if self._stop >= 0:
            with contextlib.suppress(OSError):
                os.close(self._stop)
            self._stop = -1
