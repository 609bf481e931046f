"""One thread per virtio device that waits on its queue eventfds, off the vCPU threads."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

from pyvmm import sandbox
from pyvmm.threadname import set_thread_comm

log = logging.getLogger(__name__)


class QueueWorker:
    """Calls `handler(queue_index)` whenever eventfd `eventfds[queue_index]` was signalled (by KVM's
    ioeventfd on the guest's notify write, or by the transport's trapped-write fallback). An entry of -1
    is a queue served elsewhere (a vhost backend): not watched."""

    def __init__(self, name: str, eventfds: list[int], handler: Callable[[int], None]) -> None:
        self.name = name
        self._eventfds = list(eventfds)
        self._handler = handler
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            thread.join()
        with contextlib.suppress(OSError):
            os.close(self._stop_fd)
        self._stop_fd = -1

    def _run(self) -> None:
        set_thread_comm(self.name)  # e.g. virtio-blk-_dis (15 bytes): seen in /proc/PID/task/*/comm
        # This thread's own seccomp filter, when on, stacked on the ones it inherits from the thread that
        # started it: a vCPU thread at the guest's DRIVER_OK (docs/seccomp.md#threads-and-their-lists).
        sandbox.enter(sandbox.ThreadKind.VIRTIO_WORKER)
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        index_of = {}
        for index, fd in enumerate(self._eventfds):
            if fd < 0:
                continue
            poller.register(fd, select.POLLIN)
            index_of[fd] = index
        while True:
            for fd, _events in poller.poll():
                if fd == self._stop_fd:
                    return
                try:  # noqa: SIM105 - not contextlib.suppress: this runs on every kick
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                try:
                    self._handler(index_of[fd])
                except Exception:  # a device bug must not kill the thread silently
                    log.exception("%s: queue %d handler failed", self.name, index_of[fd])
