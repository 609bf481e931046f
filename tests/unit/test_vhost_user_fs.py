"""`--fs` (virtio-fs on a vhost-user backend): the option and its refusals, the API's `fs`, the device's
configuration space, features and queues, and, when QEMU's virtiofsd is installed and we are root, a real
virtiofsd answering a FUSE_INIT the test sends through the request queue (docs/virtio-fs.md)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pyvmm.api.vmconfig import VmConfigError, vm_config_from_json, vm_config_to_json
from pyvmm.config import ConfigError, FsConfig, parse_fs, parse_vm_config
from pyvmm.devices.virtio.spec import Feature, VirtioDeviceType, bit
from pyvmm.devices.virtio.vhost_user_fs import VIRTIO_FS_CONFIG, VhostUserFs, VhostUserFsParams, fs_config
from pyvmm.memory import Backing, GuestMemory
from pyvmm.options import OptionError
from pyvmm.vhost.backend import MemoryTableRegion, VringSpec
from pyvmm.vhost.hangup import HangupWatch
from pyvmm.vhost.user import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VhostUserError,
    VhostUserFrontend,
    VhostUserProtocolFeature,
)

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
SHARED = ["--memory", "size=512M,shared=on"]

# ---- the option -----------------------------------------------------------------------------------------


def test_defaults_are_cloud_hypervisors() -> None:
    fs = parse_fs("tag=myfs,socket=/run/fs.sock")
    assert fs == FsConfig(tag="myfs", socket=Path("/run/fs.sock"), num_queues=1, queue_size=1024)


def test_every_key() -> None:
    fs = parse_fs("tag=a,socket=/s,num_queues=2,queue_size=256,id=share0,pci_segment=1,pci_device_id=4")
    assert (fs.num_queues, fs.queue_size, fs.id, fs.pci_segment, fs.pci_device_id) == (2, 256, "share0", 1, 4)


def test_a_36_byte_tag_is_the_longest() -> None:
    assert parse_fs(f"tag={'t' * 36},socket=/s").tag == "t" * 36
    with pytest.raises(OptionError, match="37 bytes: the virtio-fs tag has at most 36"):
        parse_fs(f"tag={'t' * 37},socket=/s")
    with pytest.raises(OptionError, match="38 bytes"):  # bytes, not characters: 19 two-byte letters
        parse_fs(f"tag={'é' * 19},socket=/s")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("socket=/s", "tag= is required"),
        ("tag=,socket=/s", "tag= is required"),
        ("tag=a", "socket= is required"),
        ("tag=a,socket=", "socket= is required"),
        ("tag=a,socket=/s,num_queues=0", "num_queues must be at least 1"),
        ("tag=a,socket=/s,queue_size=1000", "power of 2"),
        ("tag=a,socket=/s,queue_size=1", "power of 2"),
        ("tag=a,socket=/s,queue_size=65536", "at most 65535"),
        ("tag=a,socket=/s,iommu=on", "iommu=on is not supported"),
        ("tag=a,socket=/s,dax=on", "Unknown option: dax"),  # CH dropped dax= and cache_size= (v25)
        ("tag=a,socket=/s,cache_size=8G", "Unknown option: cache_size"),
        ("tag=a,socket=/s,id=__x", "not valid"),
    ],
)
def test_refusals(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_fs(text)


def test_a_tag_with_a_newline_or_nul_is_refused() -> None:
    from pyvmm.config import fs_from_options
    from pyvmm.options import Options

    for tag in ("a\nb", "a\0b"):
        with pytest.raises(OptionError, match="NUL or a newline"):
            fs_from_options(Options(values={"tag": tag, "socket": "/s"}))


def test_needs_shared_memory_or_huge_pages() -> None:
    with pytest.raises(ConfigError, match="requires using shared memory or huge pages") as info:
        parse_vm_config(["--kernel", "/k", "--fs", "tag=a,socket=/s"])
    assert info.value.option == "--fs tag=a,socket=/s"
    assert parse_vm_config(["--kernel", "/k", *SHARED, "--fs", "tag=a,socket=/s"]).fs[0].tag == "a"
    config = parse_vm_config(["--kernel", "/k", "--memory", "size=512M,hugepages=on",
                              "--fs", "tag=a,socket=/s"])
    assert config.fs[0].socket == Path("/s")


def test_several_file_systems_in_order() -> None:
    config = parse_vm_config(["--kernel", "/k", *SHARED, "--fs", "tag=a,socket=/a", "tag=b,socket=/b",
                              "--fs", "tag=c,socket=/c"])
    assert [f.tag for f in config.fs] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fs", "tag=a,socket=/s,num_queues=2"], "Queue count \\(2\\) must not exceed boot vCPUs \\(1\\)"),
        (["--fs", "tag=a,socket=/s,id=x", "tag=b,socket=/t,id=x"], "Identifier x is not unique"),
        (["--fs", "tag=a,socket=/s,pci_device_id=3", "tag=b,socket=/t,pci_device_id=3"], "already taken"),
        (["--fs", "tag=a,socket=/s,pci_segment=1"], "Invalid PCI segment id: 1"),
    ],
)
def test_cross_checks(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_vm_config(["--kernel", "/k", *SHARED, *args])


def _pyvmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_bad_input_is_one_line_and_status_2() -> None:
    for args in (["--fs", "tag=a,socket=/s"], [*SHARED, "--fs", "tag=" + "x" * 37 + ",socket=/s"],
                 [*SHARED, "--fs", "socket=/s"], [*SHARED, "--fs", "tag=a"]):
        proc = _pyvmm("--kernel", "/k", *args, "--dry-run")
        assert proc.returncode == 2, proc
        assert proc.stderr.startswith("pyvmm: --fs ") and proc.stderr.count("\n") == 1, proc.stderr


def _kernel() -> Path:
    """The lab's guest kernel (pyvmm-lab build): pyvmm checks the kernel file before anything else."""
    from pyvmm.lab.paths import default_paths

    kernel = default_paths().kernel
    if not kernel.is_file():
        pytest.skip("needs the lab's kernel (pyvmm-lab build)")
    return kernel


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_a_socket_nobody_serves_is_one_line_naming_the_fs(tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    proc = _pyvmm("--kernel", str(_kernel()), *SHARED, "--console", "off", "--fs", f"tag=myfs,socket={sock}")
    assert proc.returncode == 1, proc  # the command line is right; the backend is not there
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"pyvmm: --fs tag=myfs,socket={sock}: cannot connect to {sock}: "), proc


def test_dry_run_places_the_device() -> None:
    proc = _pyvmm("--kernel", str(_kernel()), *SHARED, "--console", "off", "--fs", "tag=myfs,socket=/s",
                  "--dry-run")
    assert proc.returncode == 0, proc
    # console off: rng at 00:01, then the fs (cloud-hypervisor's order: disks, nets, rng, fs, vsock)
    assert "0000:00:02.0 --fs tag=myfs,socket=/s (virtio-fs)" in proc.stdout, proc.stdout


# ---- the API's `fs` -------------------------------------------------------------------------------------


def _kata(fs: list[dict[str, object]], shared: bool = True) -> dict[str, object]:
    return {
        "payload": {"kernel": "/k/vmlinuz", "initramfs": "/k/initrd"},
        "memory": {"size": 268435456, "shared": shared, "hugepages": False},
        "platform": {"num_pci_segments": 2},
        "fs": fs,
    }


def test_katas_fs_is_the_command_lines() -> None:
    # what Kata's CH driver sends for its shared directory (the spec's §B.2), with a key CH does not know
    entry = {"tag": "kataShared", "socket": "/run/kata/vfsd.sock", "num_queues": 1, "queue_size": 1024,
             "pci_segment": 1, "iommu": False, "some_future_key": 1}
    config = vm_config_from_json(_kata([entry]))
    cli = parse_vm_config(["--kernel", "/k", *SHARED, "--platform", "num_pci_segments=2", "--fs",
                           "tag=kataShared,socket=/run/kata/vfsd.sock,num_queues=1,queue_size=1024,pci_segment=1"])
    assert config.fs == cli.fs
    echo = vm_config_to_json(config)
    assert echo["fs"] == [{"tag": "kataShared", "socket": "/run/kata/vfsd.sock", "num_queues": 1,
                           "queue_size": 1024, "iommu": False, "pci_segment": 1}]
    assert vm_config_from_json(json.loads(json.dumps(echo))) == config


@pytest.mark.parametrize(
    ("fs", "shared", "key"),
    [
        ([{"tag": "a", "socket": "/s"}], False, "--fs tag=a,socket=/s"),  # the same check as --fs
        ([{"socket": "/s"}], True, "fs[0]"),
        ([{"tag": "x" * 37, "socket": "/s"}], True, "fs[0]"),
        ([{"tag": "a", "socket": "/s", "queue_size": 100}], True, "fs[0]"),
        ([{"tag": "a", "socket": "/s", "iommu": True}], True, "fs[0]"),
        ({"tag": "a"}, True, "fs"),
    ],
)
def test_api_refusals_name_the_key(fs: object, shared: bool, key: str) -> None:
    with pytest.raises(VmConfigError) as info:
        vm_config_from_json(_kata(fs, shared))  # type: ignore[arg-type]
    assert info.value.option == key, str(info.value)


# ---- the device -----------------------------------------------------------------------------------------


def test_config_space_is_the_tag_and_the_request_queues() -> None:
    assert VIRTIO_FS_CONFIG.size == 40
    raw = fs_config("myfs", 3)
    assert raw == b"myfs" + b"\0" * 32 + struct.pack("<I", 3)
    assert fs_config("t" * 36, 1)[:36] == b"t" * 36  # a 36-byte tag has no NUL: the driver takes all 36
    with pytest.raises(ValueError):
        fs_config("t" * 37, 1)


class FakeBackend:
    """A vhost-user backend that says what it is told to and records what it is asked."""

    path = "/fake.sock"

    def __init__(self, features: int, protocol: int, queues: int) -> None:
        self._features, self._protocol, self._queues = features, protocol, queues
        self.calls: list[tuple[str, object]] = []

    def _log(self, name: str, arg: object = None) -> None:
        self.calls.append((name, arg))

    def set_owner(self) -> None:
        self._log("set_owner")

    def get_features(self) -> int:
        return self._features

    def set_features(self, features: int) -> None:
        self._log("set_features", features)

    def get_protocol_features(self) -> int:
        return self._protocol

    def set_protocol_features(self, features: int) -> None:
        self._log("set_protocol_features", features)

    def get_queue_num(self) -> int:
        self._log("get_queue_num")
        return self._queues

    def get_config(self, size: int, offset: int = 0) -> bytes:
        raise AssertionError("virtio-fs never asks the backend for its configuration")

    def set_mem_table(self, regions: Sequence[MemoryTableRegion]) -> None:
        self._log("set_mem_table", len(regions))

    def set_vring(self, spec: VringSpec, memory: GuestMemory) -> None:
        self._log("set_vring", spec.index)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._log("set_vring_enable", (index, enable))

    def get_vring_base(self, index: int) -> int:
        self._log("get_vring_base", index)
        return 0

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        self._log("close")


# What QEMU 7.2's virtiofsd offers (read from it): the ring features, protocol features MQ, LOG_SHMFD,
# REPLY_ACK, BACKEND_REQ, BACKEND_SEND_FD, HOST_NOTIFIER, CONFIGURE_MEM_SLOTS (no CONFIG), two queues.
VIRTIOFSD_FEATURES = 0x1_7500_0000
VIRTIOFSD_PROTOCOL = 0x8C2B


def test_device_type_queues_and_features() -> None:
    backend = FakeBackend(VIRTIOFSD_FEATURES, VIRTIOFSD_PROTOCOL, 2)
    device = VhostUserFs(backend, VhostUserFsParams("myfs", 1, 1024))
    assert device.device_type == VirtioDeviceType.FS == 26
    assert device.queue_sizes == [1024, 1024]  # the hiprio queue, then one request queue
    assert device.external_queues == frozenset({0, 1})  # both served by the backend, none by Python
    assert device.features == 0  # no VIRTIO_FS_F_NOTIFICATION
    assert device.config_bytes() == fs_config("myfs", 1)
    # the ring features are those the backend has; VERSION_1 is the transport's
    assert device.transport_features & bit(Feature.RING_EVENT_IDX)
    assert device.transport_features & bit(Feature.RING_INDIRECT_DESC)
    # MQ and REPLY_ACK acked, never CONFIG (not offered) nor what pyvmm does not implement
    acked = dict(backend.calls)["set_protocol_features"]
    assert acked == (1 << VhostUserProtocolFeature.MQ) | (1 << VhostUserProtocolFeature.REPLY_ACK)


def test_driver_ok_hands_both_rings_over_and_reset_takes_them_back() -> None:
    backend = FakeBackend(VIRTIOFSD_FEATURES, VIRTIOFSD_PROTOCOL, 2)
    device = VhostUserFs(backend, VhostUserFsParams("myfs"))
    memory = GuestMemory([(0, 1 << 20)], Backing(shared=True))
    try:
        backend.calls.clear()
        device.activate(memory, bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX))
        device.start_external([VringSpec(i, 8, 0x1000 * i, 0x100 + 0x1000 * i, 0x200 + 0x1000 * i, -1, -1)
                               for i in (0, 1)])
        assert backend.calls[0] == ("set_features", bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX)
                                    | bit(VHOST_USER_F_PROTOCOL_FEATURES))
        assert backend.calls[1] == ("set_mem_table", 1)
        assert backend.calls[2:] == [("set_vring", 0), ("set_vring_enable", (0, True)),
                                     ("set_vring", 1), ("set_vring_enable", (1, True))]
        backend.calls.clear()
        device.reset()
        assert backend.calls == [("set_vring_enable", (0, False)), ("get_vring_base", 0),
                                 ("set_vring_enable", (1, False)), ("get_vring_base", 1)]
    finally:
        device.close()
        memory.close()


@pytest.mark.parametrize(
    ("features", "protocol", "queues", "num_queues", "message"),
    [
        (VIRTIOFSD_FEATURES & ~bit(Feature.VERSION_1), VIRTIOFSD_PROTOCOL, 2, 1, "VIRTIO_F_VERSION_1"),
        (VIRTIOFSD_FEATURES & ~bit(VHOST_USER_F_PROTOCOL_FEATURES), 0, 2, 1, "no protocol features"),
        (VIRTIOFSD_FEATURES, VIRTIOFSD_PROTOCOL, 2, 2,
         "num_queues=2 needs 3 queues \\(the hiprio queue and 2 request queues\\) but the backend serves 2"),
        # without MQ the backend cannot say: two queues assumed (as cloud-hypervisor does)
        (VIRTIOFSD_FEATURES, VIRTIOFSD_PROTOCOL & ~1, 9, 2, "but the backend serves 2"),
    ],
)
def test_a_backend_without_what_is_needed_is_refused(features: int, protocol: int, queues: int,
                                                     num_queues: int, message: str) -> None:
    with pytest.raises(VhostUserError, match=message):
        VhostUserFs(FakeBackend(features, protocol, queues), VhostUserFsParams("t", num_queues))


# ---- a real virtiofsd (QEMU 7.2's C one) ------------------------------------------------------------------


@pytest.fixture
def virtiofsd(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    if not VIRTIOFSD.exists() or os.geteuid() != 0:
        pytest.skip("needs QEMU's virtiofsd and root")
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("hi\n")
    sock = tmp_path / "fs.sock"
    proc = subprocess.Popen([str(VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={share}",
                             "-o", "cache=none"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"virtiofsd did not start: {proc.communicate()[1]!r}")
        time.sleep(0.02)
    yield proc, sock
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(10)


FUSE_INIT = 26
FUSE_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
FUSE_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (the 7.31 layout)
FUSE_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique


def test_virtiofsd_answers_a_fuse_init_through_the_request_queue(
        virtiofsd: tuple[subprocess.Popen[bytes], Path]) -> None:
    _proc, sock = virtiofsd
    memory = GuestMemory([(0, 16 << 20)], Backing(shared=True))
    device = VhostUserFs(VhostUserFrontend.connect(str(sock)), VhostUserFsParams("myfs"))
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]  # kick and call per queue
    try:
        assert device.offer.queues == 2
        # The test is the driver. Request queue (1), 8 entries: FUSE_INIT in, room for the answer out.
        desc, avail, used = 0x1000, 0x2000, 0x3000
        request, answer = 0x10000, 0x20000
        body = FUSE_INIT_IN.pack(7, 31, 0, 0)
        memory.write(request, FUSE_IN_HEADER.pack(FUSE_IN_HEADER.size + len(body), FUSE_INIT, 42, 0, 0, 0, 0,
                                                  0, 0) + body)
        next_, write = 1, 2
        memory.write(desc, struct.pack("<QIHH", request, FUSE_IN_HEADER.size + len(body), next_, 1)
                     + struct.pack("<QIHH", answer, 4096, write, 0))
        memory.write(avail, struct.pack("<HHH", 0, 1, 0))
        device.activate(memory, bit(Feature.VERSION_1))
        rings = [VringSpec(0, 8, 0x4000, 0x5000, 0x6000, kick_fd=fds[0], call_fd=fds[1]),
                 VringSpec(1, 8, desc, avail, used, kick_fd=fds[2], call_fd=fds[3])]
        device.start_external(rings)
        with contextlib.suppress(BlockingIOError):  # libvhost-user signals a call fd once when it is set
            os.eventfd_read(fds[3])
        os.eventfd_write(fds[2], 1)
        poller = select.poll()
        poller.register(fds[3], select.POLLIN)
        assert poller.poll(10_000), "virtiofsd never signalled the request queue's call eventfd"
        assert struct.unpack_from("<H", memory.read(used + 2, 2))[0] == 1  # one chain used
        length, error, unique = FUSE_OUT_HEADER.unpack(memory.read(answer, FUSE_OUT_HEADER.size))
        assert (error, unique) == (0, 42)
        major, minor = struct.unpack_from("<II", memory.read(answer + FUSE_OUT_HEADER.size, 8))
        assert major == 7 and minor >= 31 and length > FUSE_OUT_HEADER.size
        device.reset()  # both rings taken back (GET_VRING_BASE): virtiofsd stops its queue threads
    finally:
        device.close()
        memory.close()
        for fd in fds:
            os.close(fd)


def test_a_killed_virtiofsd_is_seen_as_a_hangup(virtiofsd: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = virtiofsd
    frontend = VhostUserFrontend.connect(str(sock))
    device = VhostUserFs(frontend, VhostUserFsParams("myfs"), "--fs tag=myfs,socket=x")
    seen: list[str] = []
    watch = HangupWatch(seen.append, [(frontend.fileno(), lambda: device.label)])
    watch.start()
    try:
        time.sleep(0.1)
        assert seen == []
        proc.kill()  # the sandboxing parent; its child gets SIGTERM (PR_SET_PDEATHSIG) and the socket closes
        proc.wait(10)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == ["--fs tag=myfs,socket=x"]
    finally:
        watch.close()
        device.close()


def test_qemus_virtiofsd_serves_one_request_queue(virtiofsd: tuple[subprocess.Popen[bytes], Path]) -> None:
    _proc, sock = virtiofsd
    with pytest.raises(VhostUserError, match=r"num_queues=2 needs 3 queues .* but the backend serves 2"):
        VhostUserFs(VhostUserFrontend.connect(str(sock)), VhostUserFsParams("myfs", 2))
