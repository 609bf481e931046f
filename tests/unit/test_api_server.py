"""The API server on a real Unix socket with the real VMM state behind it (no VM is booted here: booting
needs KVM and is proven in the lab, tests/lab/test_api.py). Calls go as ch-remote sends them and responses
are read as CH's client reads them."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.api.client import ApiClient, read_response
from pyvmm.api.server import MAX_CONNECTIONS, ApiServer, ApiSocketError, open_listener
from pyvmm.api.vmm import ApiVmm
from pyvmm.config import ApiSocketConfig, parse_api_socket, parse_command_line
from pyvmm.machine import ExitKind, VmExit

CONFIG = {
    "payload": {"kernel": "/nonexistent/vmlinuz", "cmdline": "console=ttyS0"},
    "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
    "platform": {"num_pci_segments": 2},
}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, threading.Thread]]:
    path = tmp_path / "api.sock"
    vmm = ApiVmm()
    server = ApiServer(open_listener(ApiSocketConfig(path=path)), vmm.submit, path=path)
    server.start()
    loop = threading.Thread(target=vmm.run, kwargs={"handle_signals": False}, daemon=True)
    loop.start()
    yield str(path), loop
    vmm.request_exit(VmExit(ExitKind.REQUESTED))
    loop.join(5)
    server.close()
    assert not path.exists()


def _json(response) -> object:
    return json.loads(response.body)


def test_kata_sequence_up_to_boot(api) -> None:
    path, _ = api
    with ApiClient(path) as c:  # one persistent connection, as Kata's runtime-rs uses
        ping = c.request("GET", "vmm.ping")
        assert ping.status == 200 and _json(ping)["pid"] == os.getpid()
        assert c.request("GET", "vm.info").status == 500  # nothing created yet (CH's release: 500)
        assert c.request("PUT", "vm.create", json.dumps(CONFIG).encode()).status == 204
        info = c.request("GET", "vm.info")
        assert info.status == 200
        body = _json(info)
        assert body["state"] == "Created" and body["config"]["platform"]["num_pci_segments"] == 2
        assert "device_tree" not in body
        again = c.request("PUT", "vm.create", json.dumps(CONFIG).encode())
        assert again.status == 500 and "already created" in _json(again)[-1]
        boot = c.request("PUT", "vm.boot")  # the kernel does not exist: refused, the VMM goes on
        assert boot.status == 500
        assert _json(boot)[:2] == ["Error from API", "The VM could not boot"]
        assert "/nonexistent/vmlinuz" in _json(boot)[-1]
        assert c.request("PUT", "vm.delete").status == 204
        assert c.request("GET", "vm.info").status == 500
        assert c.request("GET", "vmm.ping").status == 200


@pytest.mark.parametrize(
    ("method", "endpoint", "body", "status", "answer"),
    [
        ("PUT", "vm.create", b"{not json", 400, None),
        ("PUT", "vm.create", b"[]", 400, None),
        ("PUT", "vm.create", None, 400, ["Bad Request"]),
        ("GET", "vm.create", b"{}", 400, ["Bad Request"]),
        ("GET", "vm.boot", None, 400, b""),
        ("PUT", "vm.boot", b"{}", 400, b""),
        ("PUT", "vm.boot", None, 500, None),
        ("PUT", "vm.shutdown", None, 500, None),
        ("PUT", "vm.pause", None, 500, None),
        ("PUT", "vm.resume", None, 500, None),
        ("PUT", "vm.power-button", None, 500, ["Error from API", "Error triggering power button",
                                               "VM is not running"]),
        ("PUT", "vm.power-button", b"{}", 400, b""),
        ("GET", "vm.counters", None, 500, None),
        ("PUT", "vm.add-disk", b'{"path": "/x", "num_queues": 0}', 400, None),
        ("PUT", "vm.add-disk", b'{"path": "/x"}', 500, None),  # no VM created
        ("PUT", "vm.nmi", None, 404, ["Not Found"]),
        ("GET", "vm.nosuch", None, 404, ["Not Found"]),
        ("PUT", "vm.snapshot", b"{}", 404, ["Not Found"]),
        ("PUT", "vm.add-fs", b'{"tag": "myfs", "socket": "/s"}', 404, ["Not Found"]),  # vm.create has fs
        ("GET", "vmm.ping/x", None, 404, ["Not Found"]),
        ("DELETE", "vmm.ping", None, 400, ["Bad Request"]),
    ],
)
def test_errors_have_chs_status_and_the_server_goes_on(api, method, endpoint, body, status, answer) -> None:
    path, _ = api
    with ApiClient(path) as c:
        response = c.request(method, endpoint, body)
        assert response.status == status, response
        if answer == b"":
            assert response.body == b""
        elif answer is not None:
            assert _json(response) == answer
        else:
            assert isinstance(_json(response), list) and all(isinstance(m, str) for m in _json(response))
        assert c.request("GET", "vmm.ping").status == 200


def test_vmm_shutdown_answers_200_then_ends_the_loop(api) -> None:
    path, loop = api
    with ApiClient(path) as c:
        response = c.request("PUT", "vmm.shutdown")
    assert (response.status, response.body) == (200, b"")
    loop.join(3)
    assert not loop.is_alive()


def test_malformed_request_closes_only_its_connection(api) -> None:
    path, _ = api
    with ApiClient(path) as good, socket.socket(socket.AF_UNIX) as bad:
        bad.connect(path)
        bad.sendall(b"\x00\xffgarbage\r\n\r\n")
        bad.settimeout(5)
        assert read_response(bad).status == 400
        assert bad.recv(1) == b""  # closed
        assert good.request("GET", "vmm.ping").status == 200


def test_more_connections_than_the_limit_wait_their_turn(api) -> None:
    path, _ = api
    clients = [ApiClient(path) for _ in range(MAX_CONNECTIONS)]
    extra = ApiClient(path, timeout=10)  # connected in the backlog, served when one closes
    try:
        for c in clients:
            assert c.request("GET", "vmm.ping").status == 200
        clients.pop().close()
        assert extra.request("GET", "vmm.ping").status == 200
    finally:
        for c in [*clients, extra]:
            c.close()


def test_fds_sent_with_a_request_are_closed_after_it(api) -> None:
    path, _ = api
    r, w = os.pipe()
    try:
        with ApiClient(path) as c:
            assert c.request("PUT", "vm.create", json.dumps(CONFIG).encode(), fds=[w]).status == 204
        os.close(w)
        os.set_blocking(r, False)
        assert os.read(r, 1) == b""  # end of file: no write end is left open, the server's copy included
    finally:
        os.close(r)


def test_live_socket_is_refused_stale_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s"
    live = open_listener(ApiSocketConfig(path=path))
    try:
        with pytest.raises(ApiSocketError, match="another process"):
            open_listener(ApiSocketConfig(path=path))
    finally:
        live.close()
    open_listener(ApiSocketConfig(path=path)).close()  # stale file: replaced
    (tmp_path / "f").write_text("")
    with pytest.raises(ApiSocketError, match="not a socket"):
        open_listener(ApiSocketConfig(path=tmp_path / "f"))


def test_fd_must_be_a_listening_unix_socket(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ApiSocketError, match="listening"):
        open_listener(ApiSocketConfig(fd=a.fileno()))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "l"))
    listener.listen()
    adopted = open_listener(ApiSocketConfig(fd=listener.fileno()))
    assert adopted.fileno() == listener.fileno()
    listener.detach()
    adopted.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/run/a.sock", ApiSocketConfig(path=Path("/run/a.sock"))),
        ("path=/run/a.sock", ApiSocketConfig(path=Path("/run/a.sock"))),
        ("fd=3", ApiSocketConfig(fd=3)),
        ("/run/odd,name=x", ApiSocketConfig(path=Path("/run/odd,name=x"))),
    ],
)
def test_api_socket_forms(text: str, expected: ApiSocketConfig) -> None:
    assert parse_api_socket(text) == expected


def test_only_api_socket_means_no_vm_yet() -> None:
    line = parse_command_line(["--api-socket", "/run/a.sock", "-v"])
    assert line.vm is None and line.api_socket == ApiSocketConfig(path=Path("/run/a.sock"))
    line = parse_command_line(["--api-socket", "/run/a.sock", "--kernel", "/k"])
    assert line.vm is not None and line.vm.payload.kernel == Path("/k")


def test_pyvmm_remote_speaks_to_the_server(api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyvmm import remote

    path, _ = api
    assert remote.main(["--api-socket", path, "ping"]) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == os.getpid()
    config = tmp_path / "vm.json"
    config.write_text(json.dumps(CONFIG))
    assert remote.main(["--api-socket", path, "create", str(config)]) == 0
    assert remote.main(["--api-socket", path, "info"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "Created"
    assert remote.main(["--api-socket", path, "boot"]) == 1
    assert "500" in capsys.readouterr().err
    assert remote.main(["--api-socket", path, "add-device", "path=/x,bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert remote.main(["--api-socket", path, "add-disk", "path=/x,num_queues=0"]) == 2
    assert "add-disk path=/x,num_queues=0" in capsys.readouterr().err
    # before boot, as in CH: the disk joins the stored config (204, nothing printed)
    assert remote.main(["--api-socket", path, "add-disk", "path=/x.img,id=data"]) == 0
    assert remote.main(["--api-socket", path, "info"]) == 0
    assert [d["id"] for d in json.loads(capsys.readouterr().out)["config"]["disks"]] == ["data"]
    assert remote.main(["--api-socket", path, "add-disk", "path=/y.img,id=data"]) == 1  # checked as a whole
    assert "400" in capsys.readouterr().err
    assert remote.main(["--api-socket", path, "counters"]) == 1  # not running: 500
    assert "VM is not running" in capsys.readouterr().err
    assert remote.main(["--api-socket", str(tmp_path / "none.sock"), "ping"]) == 1


def test_device_names_as_ch_gives_them() -> None:
    from pyvmm.api.endpoints import device_ids
    from pyvmm.api.vmconfig import vm_config_from_json

    config = vm_config_from_json({
        "payload": {"kernel": "/k"},
        "disks": [{"path": "/a"}, {"path": "/b", "id": "data"}],
        "devices": [{"path": "/sys/bus/pci/devices/0000:00:04.0"}],
        "memory": {"size": 536870912, "shared": True},
        "fs": [{"tag": "kataShared", "socket": "/run/fs.sock"}],
        "vsock": {"cid": 3, "socket": "/run/kata.hvsock"},
    })
    console, rng, names = device_ids(config)
    assert (console, rng) == ("__console", "__rng")
    # one counter in CH's creation order: disks, nets, fs, vsock, then passed-through functions
    assert (names.disks, names.fs, names.vsock, names.devices) == (["_disk0", "data"], ["_fs1"], ["_vsock2"],
                                                                   ["_vfio3"])


def test_server_thread_is_named_for_proc(api) -> None:
    comms = [p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")]
    assert "http-server" in comms


def test_remove_device_before_boot_edits_the_config(api) -> None:
    """Not booted, vm.remove-device takes the device with that id out of the stored config (as CH does);
    an id the config does not have, or no config at all, is a 500 with a message."""
    path, _ = api
    disks = [{"path": "/nonexistent/a.img", "id": "data"}, {"path": "/nonexistent/b.img"}]
    config = dict(CONFIG, disks=disks)
    with ApiClient(path) as c:
        early = c.request("PUT", "vm.remove-device", b'{"id": "data"}')
        assert early.status == 500 and "not created" in _json(early)[-1]
        assert c.request("PUT", "vm.create", json.dumps(config).encode()).status == 204
        assert c.request("PUT", "vm.remove-device", b'{"id": "data"}').status == 204
        disks = _json(c.request("GET", "vm.info"))["config"]["disks"]
        assert [d["path"] for d in disks] == ["/nonexistent/b.img"]
        again = c.request("PUT", "vm.remove-device", b'{"id": "data"}')
        assert again.status == 500 and "'data'" in _json(again)[-1]
        assert c.request("GET", "vmm.ping").status == 200
