"""Who serves a `--disk path=IMAGE`, and the qemu-storage-daemon pyvmm starts for it.

By default pyvmm starts one qemu-storage-daemon per disk, serving the image over vhost-user-blk on a socket
in a private directory, and connects to it as for `--disk vhost_user=on`: the guest's requests go from its
rings to the daemon's io_uring without Python (docs/virtio-blk.md#who-serves-a-disk says when the in-process
worker serves instead, and why; the bench figures that chose this are in the README).

pyvmm keeps its own OFD lock on the image for the VM's life (devices/virtio/image.py), as with the worker,
so the daemon is told not to lock (`locking=off`): the same image refusals either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pyvmm.config import DiskConfig, MemoryConfig
from pyvmm.errors import UsageError, VmError

STORAGE_DAEMON = "qemu-storage-daemon"
# PYVMM_STORAGE_DAEMON: the daemon's path, or `off` for the in-process worker on every disk.
STORAGE_DAEMON_ENV = "PYVMM_STORAGE_DAEMON"
# An iothread that polls for up to 400 us before it sleeps, and io_uring: what the bench found fastest
# (bench/harness.py measures QEMU on the same settings). Polling pays only with a host CPU to spare beside
# the vCPUs; without one it takes the guest's time (measured in a 1-CPU lab: docs/virtio-blk.md#measured),
# so the iothread then does not poll.
IOTHREAD_POLL_MAX_NS = 400_000
START_TIMEOUT = 30.0  # seconds for the daemon to listen (it does in ~50 ms)
STOP_TIMEOUT = 5.0  # seconds after SIGTERM before SIGKILL
HANGUP_GRACE = 2.0  # seconds a daemon that hung up is given to finish exiting, for the stop message
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class DiskServer(Enum):
    """What serves a disk's queues."""

    WORKER = "worker"  # pyvmm's in-process worker (devices/virtio/block.py)
    STORAGE_DAEMON = "storage-daemon"  # a qemu-storage-daemon pyvmm starts and stops with the disk
    VHOST_USER = "vhost-user"  # the user's own backend (`vhost_user=on,socket=`)


@dataclass(frozen=True)
class DiskService:
    """Who serves one disk, and why the worker does when it serves instead of the daemon."""

    server: DiskServer
    why_worker: str = ""
    poll: bool = False  # the daemon's iothread polls (a host CPU is left beside the vCPUs)
    binary: str | None = field(default=None, compare=False)  # the daemon to start (STORAGE_DAEMON)


def storage_daemon_binary(environ: Mapping[str, str] = os.environ) -> str | None:
    """The qemu-storage-daemon to start, or None when the worker must serve (`PYVMM_STORAGE_DAEMON=off`, or
    none on PATH). A PYVMM_STORAGE_DAEMON that names no executable file is a usage error."""
    chosen = environ.get(STORAGE_DAEMON_ENV, "")
    if chosen == "off":
        return None
    if chosen:
        path = Path(chosen)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UsageError(f"{STORAGE_DAEMON_ENV}={chosen}: not an executable file; name a "
                             f"{STORAGE_DAEMON} or say off (pyvmm's in-process worker serves the disks)")
        return str(path)
    return shutil.which(STORAGE_DAEMON)


def disk_service(disk: DiskConfig, memory: MemoryConfig, daemon: str | None, *, can_start: bool,
                 vcpus: int = 1, host_cpus: int = 1, private_ram: bool = False) -> DiskService:
    """Who serves `disk`. `daemon`: storage_daemon_binary(); `can_start`: pyvmm may start a program now (it
    may not under its seccomp filter, which `pyvmm --api-socket` installs before it builds a VM, unless its
    spawner is there); `vcpus` the guest's, `host_cpus` the CPUs pyvmm may run on; `private_ram`: guest RAM
    is private and stays so (a disk hot-plugged into a running VM booted without shared RAM)."""
    if disk.vhost_user:
        return DiskService(DiskServer.VHOST_USER)
    if daemon is None:
        return DiskService(DiskServer.WORKER, f"no {STORAGE_DAEMON} (install qemu-system-common, or set "
                                              f"{STORAGE_DAEMON_ENV})")
    if not can_start:
        return DiskService(DiskServer.WORKER, "pyvmm starts no program under its seccomp filter")
    if memory.mergeable:
        return DiskService(DiskServer.WORKER, "mergeable=on keeps guest RAM private, which the daemon "
                                              "cannot reach")
    if private_ram:
        return DiskService(DiskServer.WORKER, "a hot-plugged disk in a VM whose RAM is private (a daemon "
                                              "maps guest RAM: boot with --memory shared=on)")
    if disk.serial is not None:
        return DiskService(DiskServer.WORKER, f"serial= is the worker's: {STORAGE_DAEMON} answers every "
                                              "GET_ID with its own")
    return DiskService(DiskServer.STORAGE_DAEMON, poll=host_cpus > vcpus, binary=daemon)


def describe(disk: DiskConfig, service: DiskService) -> str:
    """What `-v` says serves `disk` (docs/virtio-blk.md#who-serves-a-disk)."""
    if service.server is DiskServer.STORAGE_DAEMON:
        mode = "O_DIRECT" if disk.direct else "through the page cache"
        mode += ", read-only" if disk.readonly else ""
        poll = "an iothread polling" if service.poll else "an iothread not polling (no spare host CPU)"
        aio = "a thread pool (_disable_io_uring=on)" if disk.disable_io_uring else "io_uring"
        return (f"a {STORAGE_DAEMON} pyvmm started, over vhost-user ({disk.num_queues} queue(s) of "
                f"{disk.queue_size}, {aio}, {poll}, {mode}; pyvmm sees no request)")
    if service.server is DiskServer.WORKER and service.why_worker:
        return f"{disk.data_path}: {service.why_worker}"
    return disk.data_path


def shares_ram_for_disks(services: list[DiskService]) -> bool:
    """Whether guest RAM must be a shared memfd for these disks (a daemon maps it)."""
    return any(s.server is DiskServer.STORAGE_DAEMON for s in services)


def daemon_arguments(image: Path, socket: Path, *, readonly: bool, direct: bool, num_queues: int,
                     block_device: bool, poll: bool, io_uring: bool = True) -> list[str]:
    """qemu-storage-daemon's command line (after the program) serving `image` on `socket`."""
    driver = "host_device" if block_device else "file"
    # Commas in a path are doubled: QEMU's option syntax.
    filename = str(image).replace(",", ",,")
    blockdev = (f"driver={driver},node-name=disk0,filename={filename},"
                f"aio={'io_uring' if io_uring else 'threads'},locking=off,"
                f"cache.direct={'on' if direct else 'off'},read-only={'on' if readonly else 'off'},"
                "discard=unmap")
    export = ("type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,"
              f"addr.path={str(socket).replace(',', ',,')},writable={'off' if readonly else 'on'},"
              f"num-queues={num_queues},iothread=iothread0")
    return ["--object", f"iothread,id=iothread0,poll-max-ns={IOTHREAD_POLL_MAX_NS if poll else 0}",
            "--blockdev", blockdev, "--export", export]


# Looked up once, before any fork: the child of a threaded parent must not load libraries.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent() -> None:
    """In the child before exec: SIGKILL when pyvmm's building thread ends (pyvmm killed included)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class DaemonHandle:
    """What the disk that owns a daemon needs of it: its pid, a pidfd to see it end, its log."""

    pid = 0
    socket: Path
    log: Path
    _pidfd = -1

    def close(self) -> None:
        raise NotImplementedError

    def exited(self, wait: float = 0.0) -> bool:
        """Whether the daemon has ended, waiting up to `wait` seconds (its pidfd is readable then)."""
        if self._pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(int(wait * 1000)))

    def last_words(self) -> str:
        """The daemon's last line of output."""
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace")
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return "no output"

    def hangup_cause(self) -> str:
        """What the VM's stop message says when the daemon's connection hangs up."""
        # A killed process's sockets close before it has finished exiting: give it a moment.
        state = "exited" if self.exited(wait=HANGUP_GRACE) else "closed the connection"
        return f"the {STORAGE_DAEMON} serving it (pid {self.pid}) {state}: {self.last_words()}"


class StorageDaemon(DaemonHandle):
    """One qemu-storage-daemon serving one image, listening on `socket` in a private directory; `close`
    stops it and removes the directory. It is signalled and reaped through a pidfd, so that pyvmm's seccomp
    filter need not let it signal any process by number."""

    def __init__(self, binary: str, disk: DiskConfig, label: str, poll: bool = False) -> None:
        assert disk.path is not None
        self.label = label
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        if base is not None and not os.access(base, os.W_OK):
            base = None
        self.directory = Path(tempfile.mkdtemp(prefix="pyvmm-disk-", dir=base))  # mode 0700
        self.socket = self.directory / "vhost-user-blk.sock"
        self.log = self.directory / "daemon.log"
        self.pid = 0
        self._pidfd = -1
        try:
            mode = os.stat(disk.path).st_mode
            arguments = daemon_arguments(disk.path, self.socket, readonly=disk.readonly, direct=disk.direct,
                                         num_queues=disk.num_queues, block_device=stat.S_ISBLK(mode),
                                         poll=poll, io_uring=not disk.disable_io_uring)
            with open(self.log, "wb") as log:
                process = subprocess.Popen(
                    [binary, *arguments], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    close_fds=True, start_new_session=True,  # the terminal's ^C is pyvmm's to handle
                    preexec_fn=die_with_parent)  # prctl only, before exec
            self.pid = process.pid
            self._pidfd = os.pidfd_open(process.pid)
            process.returncode = 0  # reaped through the pidfd here, never by subprocess
            self._wait_listening()
        except BaseException:
            self.close()
            raise

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if self.exited():
                raise VmError(f"{self.label}: {STORAGE_DAEMON} exited at start: {self.last_words()}")
            if time.monotonic() > deadline:
                raise VmError(f"{self.label}: {STORAGE_DAEMON} did not listen within {START_TIMEOUT:.0f} s: "
                              f"{self.last_words()}")
            time.sleep(0.005)

    def close(self) -> None:
        pidfd, self._pidfd = self._pidfd, -1
        if pidfd >= 0:
            try:
                self._stop(pidfd)
            finally:
                os.close(pidfd)
        for path in (self.socket, self.log):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)

    @staticmethod
    def _stop(pidfd: int) -> None:
        """SIGTERM, SIGKILL if it is still there after STOP_TIMEOUT, then reap it."""
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(0):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not poller.poll(int(STOP_TIMEOUT * 1000)):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
