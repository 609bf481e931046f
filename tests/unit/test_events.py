"""--event-monitor: cloud-hypervisor's event format, where events go, and the option's errors."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from pyvmm.api.client import ApiClient
from pyvmm.api.server import ApiServer, open_listener
from pyvmm.api.vmm import ApiVmm
from pyvmm.cli import main
from pyvmm.config import ApiSocketConfig, ConfigError, parse_command_line
from pyvmm.events import EventMonitor, EventMonitorConfig, EventMonitorError, encode_event
from pyvmm.machine import ExitKind, VmExit

CH_SAMPLE = """{
  "timestamp": {
    "secs": 0,
    "nanos": 26540373
  },
  "source": "vm",
  "event": "booted",
  "properties": null
}

"""


def test_events_are_encoded_as_cloud_hypervisor_writes_them() -> None:
    assert encode_event(26_540_373, "vm", "booted", None).decode() == CH_SAMPLE
    removed = json.loads(encode_event(3_000_000_001, "vm", "device-removed", {"id": "_disk1", "bdf": "x"}))
    assert removed["timestamp"] == {"secs": 3, "nanos": 1} and removed["properties"] == {"id": "_disk1",
                                                                                          "bdf": "x"}


def _events(data: str) -> list[tuple[str, str]]:
    return [(e["source"], e["event"]) for e in (json.loads(c) for c in data.split("\n\n") if c.strip())]


def test_path_is_truncated_and_timestamps_count_from_the_opening(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    path.write_text("old contents")
    ticks = iter([1_500, 2_000_001_000])
    monitor = EventMonitor.open(EventMonitorConfig(path=path))
    monitor._clock, monitor._start = lambda: next(ticks), 1_000
    monitor.emit("vmm", "starting")
    monitor.emit("vm", "device-removed", {"id": "d", "bdf": "0000:00:05.0"})
    monitor.close()
    monitor.emit("vmm", "shutdown")  # after close: nowhere, no error
    text = path.read_text()
    assert _events(text) == [("vmm", "starting"), ("vm", "device-removed")]
    assert '"secs": 0,\n    "nanos": 500' in text and '"secs": 2,\n    "nanos": 0' in text
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(EventMonitorError, match=r"--event-monitor path=.*link"):
        EventMonitor.open(EventMonitorConfig(path=tmp_path / "link"))


def test_a_full_pipe_loses_events_but_never_blocks() -> None:
    r, w = os.pipe()
    monitor = EventMonitor.open(EventMonitorConfig(fd=w))
    for _ in range(20_000):  # far more than a pipe holds
        monitor.emit("vm", "paused")
    monitor.close()
    os.close(r)
    with pytest.raises(EventMonitorError, match=r"--event-monitor fd=\d+: not an open file descriptor"):
        EventMonitor.open(EventMonitorConfig(fd=w))


@pytest.mark.parametrize(("arg", "message"), [
    ("path=/x,fd=3", "one of them"),
    ("fd=x", "fd"),
    ("bogus=1", "bogus"),
    ("path=", "one of them"),
])
def test_bad_options_are_refused(arg: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_command_line(["--api-socket", "/tmp/a.sock", "--event-monitor", arg])


def test_cli_refuses_a_monitor_it_cannot_open_with_exit_2(tmp_path: Path, capsys) -> None:
    sock = str(tmp_path / "api.sock")
    assert main(["--api-socket", sock, "--event-monitor", f"path={tmp_path}/no/such/dir/ev"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--event-monitor path=" in err


def test_the_api_vmm_reports_its_vm_lifecycle(tmp_path: Path) -> None:
    path, events = tmp_path / "api.sock", tmp_path / "events.json"
    vmm = ApiVmm(events=EventMonitor.open(EventMonitorConfig(path=events)))
    server = ApiServer(open_listener(ApiSocketConfig(path=path)), vmm.submit, path=path)
    server.start()
    loop = threading.Thread(target=vmm.run, kwargs={"handle_signals": False}, daemon=True)
    loop.start()
    try:
        with ApiClient(str(path)) as c:
            body = json.dumps({"payload": {"kernel": "/nonexistent/vmlinuz"}}).encode()
            assert c.request("PUT", "vm.create", body).status == 204
            assert c.request("PUT", "vm.boot").status == 500  # no kernel: booting, then nothing
            assert c.request("PUT", "vm.delete").status == 204
    finally:
        vmm.request_exit(VmExit(ExitKind.REQUESTED))
        loop.join(5)
        server.close()
        vmm.events.close()
    assert _events(events.read_text()) == [("vm", "booting"), ("vm", "deleted")]
