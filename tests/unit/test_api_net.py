"""Networking in the API (issue 18): NetConfig JSON through --net's checks, vm.add-net with tap fds sent as
Kata sends them (one sendmsg, SCM_RIGHTS) on the real server and VMM state, who owns the received fds,
and pyvmm-remote's add-net. Before boot only: the hot-plug into a running guest is in tests/lab/test_api.py.
Taps are real (skipped with the reason where this host cannot create them)."""

from __future__ import annotations

import array
import contextlib
import ipaddress
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.api.client import ApiClient, read_response
from pyvmm.api.server import ApiServer, open_listener
from pyvmm.api.vmconfig import VmConfigError, net_config_from_json, net_json, vm_config_from_json
from pyvmm.api.vmm import ApiVmm
from pyvmm.config import ApiSocketConfig, parse_net
from pyvmm.host.tap import IfReqFlag, TunIoctl, check_tap_fds, ifreq
from pyvmm.ioctl import IoctlError, ioctl
from pyvmm.machine import ExitKind, VmExit

KATA_NET = {"mac": "52:54:00:12:34:56", "ip": "192.168.249.1", "mask": "255.255.255.0", "iommu": False,
            "num_queues": 2, "queue_size": 256, "vhost_user": False, "vhost_mode": "Client",
            "offload_tso": True, "offload_ufo": True, "offload_csum": True}
CONFIG = {"payload": {"kernel": "/nonexistent/vmlinuz"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 2}}
FLAGS = IfReqFlag.IFF_TAP | IfReqFlag.IFF_NO_PI | IfReqFlag.IFF_VNET_HDR


# ---- JSON -> config -------------------------------------------------------------------------------------

def test_kata_netconfig_with_one_fd() -> None:
    net = net_config_from_json(KATA_NET, fds=(7,))
    assert (net.fds, net.num_queues, net.tap, net.mac) == ((7,), 2, None, bytes.fromhex("525400123456"))
    assert (net.ip, net.mask) == (None, None)  # CH's defaults, sent by Kata's client: not given
    other = net_config_from_json({**KATA_NET, "ip": "10.0.0.1", "mask": "255.255.0.0"}, fds=(7,))
    assert (other.ip, other.mask) == (ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Address("255.255.0.0"))
    # a `fds` key is never taken for fds; unknown keys are ignored as CH ignores them
    assert net_config_from_json({**KATA_NET, "fds": [5, 6], "colour": 1}, fds=(7,)).fds == (7,)
    assert net_config_from_json({"tap": "t0", "fds": [5]}).fds == ()


@pytest.mark.parametrize("document, fds, message", [
    ({**KATA_NET, "num_queues": 4}, (7,), r"fd=\[7\] is 1 tap queue file\(s\), so num_queues is 2, not 4"),
    ({**KATA_NET, "tap": "t0"}, (7,), "fd= and tap=t0 both name the tap"),
    ({**KATA_NET, "vhost_user": True}, (7,), "vhost_user=on is not supported"),
    ({**KATA_NET, "mac": "01:00:5e:00:00:01"}, (7,), "multicast"),
    ({**KATA_NET, "rate_limiter_config": {"ops": {"size": 1, "refill_time": 1}}}, (7,), "not supported"),
    ([], (), "expected a JSON object"),
])
def test_netconfig_refusals(document: object, fds: tuple[int, ...], message: str) -> None:
    with pytest.raises(VmConfigError, match=message):
        net_config_from_json(document, fds=fds)


def test_vm_create_nets_and_their_json() -> None:
    config = vm_config_from_json({**CONFIG, "net": [{"tap": "t0", "num_queues": 4, "id": "n0"}, {}]})
    assert [(n.tap, n.num_queues, n.id, n.fds) for n in config.nets] == [("t0", 4, "n0", ()),
                                                                         (None, 2, None, ())]
    with pytest.raises(VmConfigError, match="given to two --net"):
        vm_config_from_json({**CONFIG, "net": [{"tap": "t0"}, {"tap": "t0"}]})
    out = net_json(parse_net("tap=t0,mac=52:54:00:00:00:01,mtu=1400,id=n0"))
    assert out == {"tap": "t0", "ip": "192.168.249.1", "mask": "255.255.255.0", "mac": "52:54:00:00:00:01",
                   "mtu": 1400, "iommu": False, "num_queues": 2, "queue_size": 256, "vhost_user": False,
                   "vhost_mode": "Client", "id": "n0", "pci_segment": 0, "offload_tso": True,
                   "offload_ufo": True, "offload_csum": True}
    assert net_config_from_json(out).tap == "t0"  # what vm.info shows goes back in


# ---- vm.add-net on the real server ----------------------------------------------------------------------

def _tap(name: str, flags: int = FLAGS) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    req = ifreq()
    req.ifr_name = name.encode()
    req.ifr_ifru.ifru_flags = flags
    try:
        ioctl(fd, TunIoctl.TUNSETIFF, req)
    except BaseException:
        os.close(fd)
        raise
    return fd


@pytest.fixture
def tap() -> Iterator[int]:
    try:
        fd = _tap(f"pyvmmapi{os.getpid() % 100000}")
    except (OSError, IoctlError) as exc:
        pytest.skip(f"this host cannot create taps ({exc})")
    yield fd
    with contextlib.suppress(OSError):
        os.close(fd)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, ApiVmm]]:
    path = tmp_path / "api.sock"
    vmm = ApiVmm()
    server = ApiServer(open_listener(ApiSocketConfig(path=path)), vmm.submit, path=path)
    server.start()
    loop = threading.Thread(target=vmm.run, kwargs={"handle_signals": False}, daemon=True)
    loop.start()
    yield str(path), vmm
    vmm.request_exit(VmExit(ExitKind.REQUESTED))
    loop.join(5)
    server.close()


def _kata_add_net(path: str, body: dict, fds: list[int]) -> tuple[int, bytes]:
    """Kata's vmAddNetPutRequest: httputil.DumpRequest of the PUT, written with the fds in one sendmsg."""
    data = json.dumps(body).encode()
    head = (f"PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            f"Content-Length: {len(data)}\r\nContent-Type: application/json\r\n\r\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sock.sendmsg([head.encode() + data], ancillary)
        response = read_response(sock)
    return response.status, response.body


def _open_in(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return None


def _links(target: str) -> int:
    return sum(_open_in(os.getpid(), int(fd)) == target for fd in os.listdir("/proc/self/fd"))


def _tun_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd") if _open_in(os.getpid(), int(fd)) == "/dev/net/tun"}


def test_add_net_before_boot_joins_the_config_and_the_vmm_keeps_the_fd(api, tap: int) -> None:
    path, vmm = api
    before = _tun_fds()
    with ApiClient(path) as c:
        assert c.request("PUT", "vm.create", json.dumps(CONFIG).encode()).status == 204
    assert _kata_add_net(path, KATA_NET, [tap]) == (204, b"")
    assert vmm.config is not None and len(vmm.config.nets) == 1
    net = vmm.config.nets[0]
    assert net.num_queues == 2 and net.ip is None and net.mac == bytes.fromhex("525400123456")
    (held,) = net.fds
    assert held != tap and held in _tun_fds() - before  # the VMM's own copy of the queue file
    assert check_tap_fds([held]) == check_tap_fds([tap])
    with ApiClient(path) as c:
        info = json.loads(c.request("GET", "vm.info").body)
        assert info["config"]["net"] == [{**KATA_NET, "mac": "52:54:00:12:34:56", "pci_segment": 0}]
        assert c.request("PUT", "vm.delete").status == 204  # the config goes, and the fd with it
    assert _tun_fds() == before


def test_add_net_refusals_close_the_fds_and_the_vmm_goes_on(api, tap: int) -> None:
    path, vmm = api
    tuns = _tun_fds()
    # before vm.create: 500, the fd closed
    status, body = _kata_add_net(path, KATA_NET, [tap])
    assert status == 500 and json.loads(body)[-1] == "VM is not created"
    assert _tun_fds() == tuns
    with ApiClient(path) as c:
        assert c.request("PUT", "vm.create", json.dumps(CONFIG).encode()).status == 204
    r, w = os.pipe()
    pipe = os.readlink(f"/proc/self/fd/{r}")
    try:
        cases = [
            (KATA_NET, [r], "is not a tun/tap queue file (not /dev/net/tun)"),
            ({**KATA_NET, "num_queues": 4}, [tap], "so num_queues is 2, not 4"),
            ({**KATA_NET, "tap": "t0"}, [tap], "fd= and tap=t0 both name the tap"),
            (KATA_NET, [], "give the tap's queue files with the request (SCM_RIGHTS) or name it with tap"),
            ({**KATA_NET, "vhost_user": True}, [tap], "vhost_user=on is not supported"),
            ({**KATA_NET, "mac": "zz"}, [tap], "not a MAC address"),
        ]
        for document, fds, message in cases:
            status, body = _kata_add_net(path, document, fds)
            answer = json.loads(body)
            assert status == 400 and answer[:2] == ["Error from API", "The net could not be added to the VM"]
            assert message in answer[-1], answer
            # the received copies are closed: only ours of the tap and the pipe remain
            assert _tun_fds() == tuns and _links(pipe) == 2, document
        with ApiClient(path) as c:
            assert c.request("GET", "vmm.ping").status == 200
        assert vmm.config is not None and vmm.config.nets == ()
    finally:
        os.close(r)
        os.close(w)


def test_same_tap_twice_in_one_request_is_refused(api) -> None:
    path, _vmm = api
    try:
        first = _tap(f"pyvmmmq{os.getpid() % 100000}", FLAGS | IfReqFlag.IFF_MULTI_QUEUE)
    except (OSError, IoctlError) as exc:
        pytest.skip(f"this host cannot create taps ({exc})")
    try:
        with ApiClient(path) as c:
            assert c.request("PUT", "vm.create", json.dumps(CONFIG).encode()).status == 204
        status, body = _kata_add_net(path, {**KATA_NET, "num_queues": 4}, [first, first])
        assert status == 400 and "are the same open file" in json.loads(body)[-1], body
    finally:
        os.close(first)


def test_pyvmm_remote_add_net_sends_its_own_fds(api, tap: int, capsys: pytest.CaptureFixture[str]) -> None:
    from pyvmm import remote

    path, vmm = api
    with ApiClient(path) as c:
        assert c.request("PUT", "vm.create", json.dumps(CONFIG).encode()).status == 204
    assert remote.main(["--api-socket", path, "add-net", f"fd=[{tap}],mac=52:54:00:00:00:09,id=kn"]) == 0
    assert vmm.config is not None
    (net,) = vmm.config.nets
    assert (net.id, net.mac, len(net.fds)) == ("kn", bytes.fromhex("525400000009"), 1)
    assert net.fds[0] != tap and check_tap_fds(net.fds) == check_tap_fds([tap])
    capsys.readouterr()
    # usage errors: exit 2 with one line, nothing sent
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    assert remote.main(["--api-socket", path, "add-net", f"fd=[{closed}]"]) == 2
    assert capsys.readouterr().err == (f"pyvmm-remote: add-net fd=[{closed}]: fd {closed} is not open in "
                                       "pyvmm-remote (Bad file descriptor)\n")
    assert remote.main(["--api-socket", path, "add-net", f"fd=[{tap}],num_queues=4"]) == 2
    assert "so num_queues is 2, not 4" in capsys.readouterr().err
    # the VMM's refusal: exit 1, its message on stderr (tap with fds is refused by the parser already)
    assert remote.main(["--api-socket", path, "add-net", "mac=52:54:00:00:00:0a"]) == 1
    assert "name it with tap" in capsys.readouterr().err
    assert len(vmm.config.nets) == 1
