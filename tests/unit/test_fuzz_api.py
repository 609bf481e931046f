"""Fuzzing of the API socket: the HTTP parser, the VmConfig JSON path, a live server (tests/fuzz/api.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.api import check_json, hammer, json_values, parse_stream, requests_stream
from fuzz.budget import fuzz_settings
from pyvmm.api.server import ApiServer, open_listener
from pyvmm.api.vmm import ApiVmm
from pyvmm.config import ApiSocketConfig
from pyvmm.machine import ExitKind, VmExit


@fuzz_settings(examples=300)
@given(
    data=requests_stream(),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=10),
    fd_counts=st.lists(st.integers(0, 3), max_size=4),
)
def test_parser(data: bytes, cuts: list[int], fd_counts: list[int]) -> None:
    parse_stream(data, cuts, fd_counts)


@fuzz_settings(examples=400)
@given(document=json_values())
def test_vmconfig_json(document: object) -> None:
    check_json(document)


@fuzz_settings(examples=300)
@given(
    document=st.fixed_dictionaries(
        {"payload": st.just({"kernel": "/k"})},
        optional={
            "cpus": json_values(),
            "memory": json_values(),
            "serial": json_values(),
            "console": json_values(),
            "disks": json_values(),
            "devices": json_values(),
            "platform": json_values(),
            "rng": json_values(),
        },
    )
)
def test_vmconfig_json_sections(document: object) -> None:
    check_json(document)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    path = Path(tmp_path_factory.mktemp("api")) / "api.sock"
    vmm = ApiVmm()
    server = ApiServer(open_listener(ApiSocketConfig(path=path)), vmm.submit, path=path)
    server.start()
    loop = threading.Thread(target=vmm.run, kwargs={"handle_signals": False}, daemon=True)
    loop.start()
    yield str(path)
    vmm.request_exit(VmExit(ExitKind.REQUESTED))
    loop.join(5)
    server.close()


@fuzz_settings(examples=25)
@given(payloads=st.lists(requests_stream(), min_size=1, max_size=11))
def test_live_server_survives(live: str, payloads: list[bytes]) -> None:
    hammer(live, payloads)
