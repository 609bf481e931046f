"""Who serves a --disk (vhost/storage_daemon.py), and the qemu-storage-daemon pyvmm starts for it: the
choice, the daemon's command line, and a real daemon started, negotiated with, killed and stopped here (no
KVM needed)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pyvmm.config import DiskConfig, MemoryConfig, parse_disk
from pyvmm.devices.virtio.block import BlkFeature
from pyvmm.devices.virtio.spec import bit
from pyvmm.devices.virtio.vhost_user_blk import VhostUserBlkParams, VhostUserBlock
from pyvmm.errors import UsageError, VmError
from pyvmm.vhost.spawner import DaemonSpawner
from pyvmm.vhost.storage_daemon import (
    STORAGE_DAEMON_ENV,
    DiskServer,
    DiskService,
    StorageDaemon,
    daemon_arguments,
    describe,
    disk_service,
    shares_ram_for_disks,
    storage_daemon_binary,
)
from pyvmm.vhost.user import VhostUserFrontend

QSD = storage_daemon_binary({})
needs_daemon = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
DAEMON = "/usr/bin/qemu-storage-daemon"


# ---- the choice ---------------------------------------------------------------------------------------


def test_the_daemon_serves_by_default_and_the_worker_where_it_cannot() -> None:
    disk, memory = parse_disk("path=/img.raw"), MemoryConfig()
    assert disk_service(disk, memory, DAEMON, can_start=True) == DiskService(DiskServer.STORAGE_DAEMON)
    # its iothread polls only with a host CPU to spare beside the vCPUs
    assert disk_service(disk, memory, DAEMON, can_start=True, vcpus=2, host_cpus=4).poll
    assert not disk_service(disk, memory, DAEMON, can_start=True, vcpus=2, host_cpus=2).poll
    readonly = parse_disk("path=/img.raw,readonly=on,direct=on")
    assert disk_service(readonly, memory, DAEMON, can_start=True).server is DiskServer.STORAGE_DAEMON
    cases = {
        "no qemu-storage-daemon": disk_service(disk, memory, None, can_start=True),
        "seccomp filter": disk_service(disk, memory, DAEMON, can_start=False),
        "mergeable=on": disk_service(disk, MemoryConfig(mergeable=True), DAEMON, can_start=True),
        "serial=": disk_service(parse_disk("path=/img.raw,serial=abc"), memory, DAEMON, can_start=True),
        "RAM is private": disk_service(disk, memory, DAEMON, can_start=True, private_ram=True),
    }
    for why, service in cases.items():
        assert service.server is DiskServer.WORKER
        assert why in service.why_worker
    vhost_user = parse_disk("vhost_user=on,socket=/run/vu.sock")
    assert disk_service(vhost_user, memory, DAEMON, can_start=True).server is DiskServer.VHOST_USER
    assert shares_ram_for_disks([cases["serial="], DiskService(DiskServer.STORAGE_DAEMON)])
    assert not shares_ram_for_disks([cases["serial="], DiskService(DiskServer.VHOST_USER)])


def test_what_v_says_serves_each_disk() -> None:
    disk = parse_disk("path=/img.raw,num_queues=2,readonly=on")
    assert describe(disk, DiskService(DiskServer.STORAGE_DAEMON, poll=True)) == (
        "a qemu-storage-daemon pyvmm started, over vhost-user (2 queue(s) of 128, io_uring, an iothread "
        "polling, through the page cache, read-only; pyvmm sees no request)")
    assert "io_uring, an iothread not polling (no spare host CPU), through" in describe(
        disk, DiskService(DiskServer.STORAGE_DAEMON))
    worker = describe(disk, DiskService(DiskServer.WORKER, "no qemu-storage-daemon (install it)"))
    assert worker.startswith("pyvmm's in-process worker")
    assert worker.endswith("through the page cache, read-only): no qemu-storage-daemon (install it)")


def test_the_daemon_is_found_on_path_named_or_turned_off(tmp_path: Path) -> None:
    assert storage_daemon_binary({STORAGE_DAEMON_ENV: "off"}) is None
    program = tmp_path / "qsd"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert storage_daemon_binary({STORAGE_DAEMON_ENV: str(program)}) == str(program)
    program.chmod(0o644)
    with pytest.raises(UsageError, match=rf"^{STORAGE_DAEMON_ENV}=.*qsd: not an executable file; name a"):
        storage_daemon_binary({STORAGE_DAEMON_ENV: str(program)})


def test_the_daemons_command_line() -> None:
    args = daemon_arguments(Path("/images/a,b.raw"), Path("/run/x/s.sock"), readonly=True, direct=False,
                            num_queues=4, block_device=False, poll=True)
    assert args[0:2] == ["--object", "iothread,id=iothread0,poll-max-ns=400000"]
    blockdev, export = args[3], args[5]
    assert blockdev == ("driver=file,node-name=disk0,filename=/images/a,,b.raw,aio=io_uring,locking=off,"
                        "cache.direct=off,read-only=on,discard=unmap")
    assert export == ("type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path=/run/x/s.sock,"
                      "writable=off,num-queues=4,iothread=iothread0")
    device = daemon_arguments(Path("/dev/sdb"), Path("/s"), readonly=False, direct=True, num_queues=1,
                              block_device=True, poll=False)
    assert device[3].startswith("driver=host_device,") and "cache.direct=on,read-only=off" in device[3]
    assert "writable=on" in device[5]
    assert device[1] == "iothread,id=iothread0,poll-max-ns=0"
    threads = daemon_arguments(Path("/i"), Path("/s"), readonly=False, direct=False, num_queues=1,
                               block_device=False, poll=False, io_uring=False)
    assert ",aio=threads," in threads[3]
    # CH's hidden _disable_io_uring=on reaches the daemon, and -v says so
    disk = parse_disk("path=/img.raw,_disable_io_uring=on")
    assert disk.disable_io_uring and not parse_disk("path=/img.raw").disable_io_uring
    assert "a thread pool (_disable_io_uring=on)" in describe(disk, DiskService(DiskServer.STORAGE_DAEMON))


# ---- a real daemon ------------------------------------------------------------------------------------


def _image(tmp_path: Path, size: int = 4 << 20) -> Path:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size)
    return image


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except FileNotFoundError:
        return True


@needs_daemon
def test_a_started_daemon_serves_the_image_and_close_stops_it(tmp_path: Path) -> None:
    assert QSD is not None
    disk = DiskConfig(path=_image(tmp_path), readonly=True, num_queues=2)
    daemon = StorageDaemon(QSD, disk, "--disk path=X")
    directory = daemon.directory
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # only pyvmm's user may connect
        assert not daemon.exited()
        device = VhostUserBlock(VhostUserFrontend.connect(str(daemon.socket)),
                                VhostUserBlkParams(num_queues=2, queue_size=64))
        assert device.capacity == (4 << 20) // 512
        assert device.features & bit(BlkFeature.RO)  # readonly=on: an export the guest cannot write
        device.close()
    finally:
        daemon.close()
    assert _gone(daemon.pid)
    assert not directory.exists()


@needs_daemon
def test_a_killed_daemon_is_named_and_a_daemon_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    assert QSD is not None
    daemon = StorageDaemon(QSD, DiskConfig(path=_image(tmp_path)), "--disk path=X")
    try:
        os.kill(daemon.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not daemon.exited() and time.monotonic() < deadline:
            time.sleep(0.01)
        cause = daemon.hangup_cause()
        assert cause.startswith(f"the qemu-storage-daemon serving it (pid {daemon.pid}) exited: ")
    finally:
        daemon.close()
    # An export the daemon refuses (no queue): it exits at start, and pyvmm says why in one line and leaves
    # no directory behind.
    before = set(Path(tempfile.gettempdir()).glob("pyvmm-disk-*"))
    with pytest.raises(VmError, match=r"^--disk path=Y: qemu-storage-daemon exited at start: .+") as info:
        StorageDaemon(QSD, DiskConfig(path=_image(tmp_path), num_queues=0), "--disk path=Y")
    assert "\n" not in str(info.value)
    assert set(Path(tempfile.gettempdir()).glob("pyvmm-disk-*")) == before


@needs_daemon
def test_the_daemon_dies_with_a_killed_pyvmm(tmp_path: Path) -> None:
    """pyvmm killed (SIGKILL: no teardown runs) takes its daemons with it: the daemon holds no lock, so a
    daemon left behind would go on serving a disk nobody may use."""
    image = _image(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pyvmm.config import DiskConfig\n"
         "from pyvmm.vhost.storage_daemon import StorageDaemon\n"
         f"d = StorageDaemon({QSD!r}, DiskConfig(path={str(image)!r}), 'x')\n"
         "print(d.pid, d.directory, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    directory = ""
    try:
        assert child.stdout is not None
        pid_text, directory = child.stdout.readline().split()
        pid = int(pid_text)
        assert not _gone(pid)
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _gone(pid)
    finally:
        child.kill()
        child.wait()
        shutil.rmtree(directory, ignore_errors=True)  # a killed pyvmm leaves its empty directory


@needs_daemon
def test_the_spawner_starts_and_stops_daemons_for_a_filtered_vmm(tmp_path: Path) -> None:
    """`pyvmm --api-socket` runs under a filter that forbids starting programs: the spawner it starts first
    starts the daemons (vhost/spawner.py). A daemon it started serves the image; a refused start is one line;
    a daemon killed is seen through the pidfd handed over; stop and the spawner's end leave no daemon."""
    assert QSD is not None
    spawner = DaemonSpawner(QSD)
    try:
        daemon = spawner.spawn(DiskConfig(path=_image(tmp_path), num_queues=2), "--disk path=A", poll=False)
        device = VhostUserBlock(VhostUserFrontend.connect(str(daemon.socket)), VhostUserBlkParams(2, 64))
        assert device.capacity == (4 << 20) // 512
        device.close()
        directory = daemon.socket.parent
        daemon.close()
        assert _gone(daemon.pid) and not directory.exists()  # stopped when close returns

        with pytest.raises(VmError, match=r"^--disk path=B: qemu-storage-daemon exited at start: .+"):
            spawner.spawn(DiskConfig(path=_image(tmp_path), num_queues=0), "--disk path=B", poll=False)

        killed = spawner.spawn(DiskConfig(path=_image(tmp_path)), "--disk path=C", poll=False)
        os.kill(killed.pid, signal.SIGKILL)
        cause = killed.hangup_cause()
        assert cause.startswith(f"the qemu-storage-daemon serving it (pid {killed.pid}) exited"), cause
        left = spawner.spawn(DiskConfig(path=_image(tmp_path), readonly=True), "--disk path=D", poll=False)
    finally:
        spawner.close()
    assert _gone(left.pid)  # the spawner's end stops what it still had
