"""Starting a disk's qemu-storage-daemon for a VMM that may not start programs (`pyvmm --api-socket`).

`pyvmm --api-socket` installs its seccomp filter before it builds any VM (docs/seccomp.md#when), and no
allow-list has `fork` or `execve`. So before the filter goes on it starts this small process, which stays
unfiltered and starts the daemons on its behalf: one request per disk over a private socket pair, answered
with the daemon's socket, log and pid, and a pidfd of the daemon (SCM_RIGHTS) that pyvmm polls to learn
whether it has exited. The spawner stops a daemon when asked, and all of them when pyvmm's end of the pair
closes (pyvmm exited, however it ended); the kernel kills it when pyvmm's main thread ends
(PR_SET_PDEATHSIG), and its daemons with it. It starts nothing but qemu-storage-daemon, with the arguments
storage_daemon.daemon_arguments builds (docs/virtio-blk.md#who-serves-a-disk).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from pyvmm import sandbox
from pyvmm.config import DiskConfig
from pyvmm.errors import VmError
from pyvmm.vhost.storage_daemon import STORAGE_DAEMON, DaemonHandle, StorageDaemon, die_with_parent

MAX_MESSAGE = 64 * 1024
CLOSE_TIMEOUT_MS = 10_000  # for the spawner to stop its daemons and end


def _send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([json.dumps(message).encode()], ancillary)


def _receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    data, ancillary, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
    return (json.loads(data) if data else None), fds


class RemoteDaemon(DaemonHandle):
    """pyvmm's handle on a daemon the spawner started: what StorageDaemon offers the disk that owns it."""

    def __init__(self, spawner: DaemonSpawner, reply: dict[str, Any], pidfd: int) -> None:
        self._spawner = spawner
        self.ident = int(reply["id"])
        self.pid = int(reply["pid"])
        self.socket = Path(reply["socket"])
        self.log = Path(reply["log"])
        self._pidfd = pidfd

    def close(self) -> None:
        pidfd, self._pidfd = self._pidfd, -1
        if pidfd >= 0:
            os.close(pidfd)
            self._spawner.stop(self.ident)


class DaemonSpawner:
    """pyvmm's end of the spawner process (started before the seccomp filter goes on)."""

    def __init__(self, binary: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        # One request and its reply at a time: a hot-plugged disk's daemon starts on the API's thread while
        # an ejected one's stops on a vCPU thread (docs/hotplug.md).
        self._lock = threading.Lock()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "pyvmm.vhost.spawner", binary, str(theirs.fileno())],
                stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), start_new_session=True,
                preexec_fn=die_with_parent)  # prctl only, before exec
        finally:
            theirs.close()
        # Reaped through a pidfd (waitid, in the filter's lists), never by subprocess: its wait4 is in no
        # list, and a Popen collected at exit would make it.
        self._pidfd = os.pidfd_open(process.pid)
        process.returncode = 0

    def spawn(self, disk: DiskConfig, label: str, poll: bool) -> RemoteDaemon:
        """A daemon serving `disk`, listening; VmError (one line) when it cannot start."""
        request = {"op": "start", "path": str(disk.path), "readonly": disk.readonly, "direct": disk.direct,
                   "num_queues": disk.num_queues, "disable_io_uring": disk.disable_io_uring, "label": label,
                   "poll": poll}
        try:
            with self._lock:
                _send(self._sock, request)
                reply, fds = _receive(self._sock)
        except OSError as exc:
            raise VmError(f"{label}: the {STORAGE_DAEMON} spawner is gone ({exc.strerror or exc})") from None
        if reply is None or "error" in reply or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            error = reply.get("error") if reply else None
            raise VmError(error or f"{label}: the {STORAGE_DAEMON} spawner is gone")
        return RemoteDaemon(self, reply, fds[0])

    def stop(self, ident: int) -> None:
        """Stop daemon `ident` and wait until it has (it has ended when this returns)."""
        with contextlib.suppress(OSError), self._lock:
            _send(self._sock, {"op": "stop", "id": ident})
            _receive(self._sock)

    def close(self) -> None:
        """Closing the pair ends the spawner, which stops every daemon it still has; then it is reaped."""
        self._sock.close()
        pidfd, self._pidfd = self._pidfd, -1
        if pidfd < 0:
            return
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if poller.poll(CLOSE_TIMEOUT_MS):
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        finally:
            os.close(pidfd)


_spawner: DaemonSpawner | None = None


def start_spawner(binary: str | None) -> None:
    """Start the spawner for this process (before its seccomp filter goes on); nothing without a daemon."""
    global _spawner
    if binary is not None and _spawner is None:
        _spawner = DaemonSpawner(binary)


def can_start_daemons() -> bool:
    """Whether a disk's daemon can be started now: before the seccomp filter, or through the spawner."""
    return not sandbox.filtered() or _spawner is not None


def start_daemon(binary: str, disk: DiskConfig, label: str, poll: bool) -> DaemonHandle:
    """A daemon serving `disk`, listening: started here, or by the spawner under the filter."""
    if sandbox.filtered() and _spawner is not None:
        return _spawner.spawn(disk, label, poll)
    return StorageDaemon(binary, disk, label, poll)


def stop_spawner() -> None:
    """End the spawner (its daemons with it), at pyvmm's exit."""
    global _spawner
    if _spawner is not None:
        _spawner.close()
        _spawner = None


# ---- the spawner process --------------------------------------------------------------------------------


def serve(binary: str, sock: socket.socket) -> None:
    """Start and stop daemons as pyvmm asks, until it closes the pair; then stop them all."""
    daemons: dict[int, StorageDaemon] = {}
    next_id = 1
    try:
        while True:
            request, fds = _receive(sock)
            for fd in fds:
                os.close(fd)
            if request is None:
                return
            if request.get("op") == "stop":
                daemon = daemons.pop(int(request["id"]), None)
                if daemon is not None:
                    daemon.close()
                _send(sock, {"stopped": request["id"]})
                continue
            disk = DiskConfig(path=Path(request["path"]), readonly=bool(request["readonly"]),
                              direct=bool(request["direct"]), num_queues=int(request["num_queues"]),
                              disable_io_uring=bool(request["disable_io_uring"]))
            try:
                daemon = StorageDaemon(binary, disk, str(request["label"]), bool(request["poll"]))
            except Exception as exc:  # every failure is pyvmm's one-line error
                _send(sock, {"error": str(exc)})
                continue
            pidfd = os.pidfd_open(daemon.pid)
            try:
                _send(sock, {"id": next_id, "pid": daemon.pid, "socket": str(daemon.socket),
                             "log": str(daemon.log)}, (pidfd,))
            finally:
                os.close(pidfd)
            daemons[next_id] = daemon
            next_id += 1
    finally:
        for daemon in daemons.values():
            with contextlib.suppress(Exception):
                daemon.close()


def main() -> int:
    binary, fd = sys.argv[1], int(sys.argv[2])
    with socket.socket(fileno=fd) as sock, contextlib.suppress(ConnectionError, EOFError):
        serve(binary, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
