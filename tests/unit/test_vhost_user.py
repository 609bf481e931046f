"""vhost-user: message encoding against the specification's layouts, and a real conversation with a real
qemu-storage-daemon started here (no KVM needed): features, configuration space, a memfd as guest RAM,
one ring set up by the test acting as the driver, and a read request the daemon serves from the image."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.devices.virtio.spec import Feature, bit
from pyvmm.devices.virtio.vhost_user_blk import (
    CONFIG_SIZE,
    VhostUserBlkParams,
    VhostUserBlock,
)
from pyvmm.memory import Backing, GuestMemory
from pyvmm.vhost.backend import MemoryTableRegion, VringSpec
from pyvmm.vhost.hangup import HangupWatch
from pyvmm.vhost.user import (
    HEADER,
    MEMORY_REGION,
    VRING_ADDR,
    VhostUserError,
    VhostUserFrontend,
    VhostUserProtocolFeature,
    VhostUserRequest,
    config_request,
    decode_header,
    encode,
    memory_table_payload,
    vring_file,
    vring_state,
)

QSD = shutil.which("qemu-storage-daemon")
IMAGE_SIZE = 8 << 20
SECTOR = 512


# ---- encoding (sizes and offsets as the vhost-user specification lays them out) -------------------------


def test_header_is_request_flags_size_little_endian() -> None:
    message = encode(VhostUserRequest.VHOST_USER_GET_FEATURES)
    assert message == struct.pack("<III", 1, 0x1, 0)
    assert HEADER.size == 12


def test_need_reply_sets_bit_3_and_keeps_version_1() -> None:
    message = encode(VhostUserRequest.VHOST_USER_SET_FEATURES, struct.pack("<Q", 5), need_reply=True)
    request, flags, size = decode_header(message[:12])
    assert (request, flags, size) == (2, 0x9, 8)
    assert message[12:] == struct.pack("<Q", 5)


def test_request_numbers() -> None:
    assert VhostUserRequest.VHOST_USER_SET_MEM_TABLE == 5
    assert VhostUserRequest.VHOST_USER_GET_VRING_BASE == 11
    assert VhostUserRequest.VHOST_USER_GET_PROTOCOL_FEATURES == 15
    assert VhostUserRequest.VHOST_USER_SET_VRING_ENABLE == 18
    assert VhostUserRequest.VHOST_USER_GET_CONFIG == 24


def test_vring_payloads() -> None:
    assert vring_state(1, 256) == struct.pack("<II", 1, 256)
    assert VRING_ADDR.size == 40  # index, flags, then four u64 addresses
    assert vring_file(3) == struct.pack("<Q", 3)
    assert vring_file(3, has_fd=False) == struct.pack("<Q", 0x103)  # the no-fd bit is bit 8


def test_memory_table_payload() -> None:
    regions = [MemoryTableRegion(0, 1 << 30, 0x7F00_0000_0000, fd=7, fd_offset=0),
               MemoryTableRegion(1 << 32, 1 << 30, 0x7F40_0000_0000, fd=7, fd_offset=1 << 30)]
    payload = memory_table_payload(regions)
    assert MEMORY_REGION.size == 32
    assert len(payload) == 8 + 2 * 32
    assert struct.unpack_from("<II", payload) == (2, 0)
    assert struct.unpack_from("<QQQQ", payload, 8 + 32) == (1 << 32, 1 << 30, 0x7F40_0000_0000, 1 << 30)


def test_config_request_has_room_for_the_answer() -> None:
    payload = config_request(0, 60)
    assert struct.unpack_from("<III", payload) == (0, 60, 0)
    assert len(payload) == 12 + 60


def test_connect_to_a_missing_socket_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with pytest.raises(VhostUserError, match=str(path)):
        VhostUserFrontend.connect(str(path))


def test_a_backend_answering_another_request_is_an_error(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend = VhostUserFrontend(ours, "pair")
    theirs.sendall(struct.pack("<III", 15, 0x5, 8) + struct.pack("<Q", 1))
    with pytest.raises(VhostUserError, match="GET_FEATURES"):
        frontend.get_features()
    frontend.close()
    theirs.close()


def test_an_oversized_answer_is_refused_before_it_is_read() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend = VhostUserFrontend(ours, "pair")
    theirs.sendall(struct.pack("<III", 1, 0x5, 1 << 30))
    with pytest.raises(VhostUserError, match="too long"):
        frontend.get_features()
    frontend.close()
    theirs.close()


# ---- a real qemu-storage-daemon -----------------------------------------------------------------------


def _pattern(size: int) -> bytes:
    # every sector carries its own number, so a read of the wrong sector cannot pass
    return b"".join(struct.pack("<Q", n) * (SECTOR // 8) for n in range(size // SECTOR))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    if QSD is None:
        pytest.skip("qemu-storage-daemon is not installed")
    image = tmp_path / "disk.img"
    image.write_bytes(_pattern(IMAGE_SIZE))
    sock = tmp_path / "vhost.sock"
    proc = subprocess.Popen(
        [QSD, "--blockdev", f"driver=file,node-name=f,filename={image}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on,"
                     "num-queues=2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"qemu-storage-daemon did not start: {proc.communicate()[1]!r}")
        time.sleep(0.02)
    yield proc, image, sock
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _shared_ram() -> GuestMemory:
    return GuestMemory([(0, 16 << 20)], Backing(shared=True))


def test_features_config_and_one_read_served_by_the_daemon(
        daemon: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    _proc, _image, sock = daemon
    memory = _shared_ram()
    device = VhostUserBlock(VhostUserFrontend.connect(str(sock)), VhostUserBlkParams(num_queues=2,
                                                                                       queue_size=8))
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        negotiated = device.negotiated
        assert negotiated.features & bit(Feature.VERSION_1)
        assert negotiated.protocol_features & (1 << VhostUserProtocolFeature.CONFIG)
        assert negotiated.queues >= 2
        assert len(device.config_bytes()) == CONFIG_SIZE
        assert device.capacity == IMAGE_SIZE // SECTOR  # capacity = the image's size in sectors
        assert struct.unpack_from("<H", device.config_bytes(), 34)[0] == 2  # num_queues as configured

        # The test is the driver: one queue of 8, a read of 4 KiB from sector 1000.
        desc, avail, used = 0x1000, 0x2000, 0x3000
        header, data, status = 0x10000, 0x20000, 0x30000
        sector = 1000
        memory.write(header, struct.pack("<IIQ", 0, 0, sector))  # VIRTIO_BLK_T_IN
        memory.write(status, b"\xff")
        next_, write = 1, 2
        memory.write(desc, struct.pack("<QIHH", header, 16, next_, 1)
                     + struct.pack("<QIHH", data, 4096, next_ | write, 2)
                     + struct.pack("<QIHH", status, 1, write, 0))
        memory.write(avail, struct.pack("<HHH", 0, 1, 0))  # flags, idx 1, ring[0] = head 0
        acked = bit(Feature.VERSION_1)
        device.activate(memory, acked)
        device.start_external([VringSpec(0, 8, desc, avail, used, kick_fd=kick, call_fd=call)])
        # libvhost-user signals a call fd once when it is set (against a lost interrupt): drain that first
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(call)
        os.eventfd_write(kick, 1)
        poller = select.poll()
        poller.register(call, select.POLLIN)
        assert poller.poll(10_000), "the daemon never signalled the call eventfd"
        used_idx = struct.unpack_from("<H", memory.read(used + 2, 2))[0]
        assert used_idx == 1
        head, length = struct.unpack_from("<II", memory.read(used + 4, 8))
        assert head == 0 and length == 4096 + 1
        assert memory.read(status, 1) == b"\x00"  # VIRTIO_BLK_S_OK
        assert memory.read(data, 4096) == _pattern(IMAGE_SIZE)[sector * SECTOR:sector * SECTOR + 4096]

        device.reset()  # the ring is taken back (GET_VRING_BASE) and may be set up again
        device.activate(memory, acked)
        device.start_external([VringSpec(0, 8, desc, avail, used, kick_fd=kick, call_fd=call, base=1)])
    finally:
        device.close()
        memory.close()
        os.close(kick)
        os.close(call)


def test_more_queues_than_the_daemon_serves_is_refused(
        daemon: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    _proc, _image, sock = daemon
    with pytest.raises(VhostUserError, match="num_queues=4 but the backend serves 2"):
        VhostUserBlock(VhostUserFrontend.connect(str(sock)), VhostUserBlkParams(num_queues=4))


def test_a_killed_daemon_is_seen_as_a_hangup(daemon: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    proc, _image, sock = daemon
    frontend = VhostUserFrontend.connect(str(sock))
    device = VhostUserBlock(frontend, VhostUserBlkParams())
    seen: list[str] = []
    watch = HangupWatch(seen.append)
    watch.start()
    watch.add(frontend.fileno(), lambda: "--disk socket=x")  # while it runs, as a hot-plugged disk joins
    try:
        time.sleep(0.1)
        assert seen == []
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == ["--disk socket=x"]
    finally:
        watch.close()
        device.close()


def test_the_api_still_refuses_vhost_user_disks() -> None:
    from pyvmm.api.vmconfig import VmConfigError, disk_config_from_json

    with pytest.raises(VmConfigError, match="command line only"):
        disk_config_from_json({"vhost_user": True, "vhost_socket": "/run/vu.sock"})
    with pytest.raises(VmConfigError, match="socket"):
        disk_config_from_json({"path": "/img", "vhost_socket": "/run/vu.sock"})


def test_vm_info_shows_a_command_line_vhost_user_disk() -> None:
    from pyvmm.api.vmconfig import disk_json
    from pyvmm.config import DiskConfig

    shown = disk_json(DiskConfig(path=None, vhost_user=True, socket=Path("/run/vu.sock")), "_disk0")
    assert "path" not in shown
    assert shown["vhost_user"] is True and shown["vhost_socket"] == "/run/vu.sock"
    plain = disk_json(DiskConfig(path=Path("/img")))
    assert plain["path"] == "/img" and plain["vhost_user"] is False and "vhost_socket" not in plain
