"""Fuzz targets of the API socket: the HTTP request parser (bytes and fds in any chunking), the VmConfig
JSON path, and a live server hammered with garbage from many connections that must go on answering."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

from hypothesis import strategies as st

from pyvmm.api.client import ApiClient, encode_request
from pyvmm.api.http import MAX_PENDING_FDS, HttpError, RequestParser
from pyvmm.api.vmconfig import VmConfigError, vm_config_from_json

VALID = [
    encode_request("GET", "vmm.ping"),
    encode_request("PUT", "vm.create", b'{"payload": {"kernel": "/k"}}'),
    encode_request("PUT", "vm.boot"),
    b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
]


def requests_stream() -> st.SearchStrategy[bytes]:
    """Valid requests, mutated ones and plain garbage, concatenated."""
    piece = st.one_of(
        st.sampled_from(VALID),
        st.binary(max_size=200),
        st.builds(
            lambda v, i, b: v[:i] + b + v[i:],
            st.sampled_from(VALID),
            st.integers(0, 80),
            st.binary(max_size=8),
        ),
        st.builds(
            lambda n: b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % n,
            st.integers(0, 1 << 40),
        ),
        st.just(b"GET /" + b"a" * 9000),
    )
    return st.lists(piece, max_size=8).map(b"".join)


def parse_stream(data: bytes, cuts: list[int], fd_counts: list[int]) -> None:
    """Feed `data` cut at `cuts` with `fd_counts` fds per chunk: only requests or one HttpError; every fd
    ends up in exactly one request or closed by the parser."""
    parser = RequestParser()
    chunks = []
    last = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        chunks.append(data[last:cut])
        last = cut
    chunks.append(data[last:])
    opened: list[int] = []
    got: list[int] = []
    try:
        for i, chunk in enumerate(chunks):
            fds = [
                os.open("/dev/null", os.O_RDONLY)
                for _ in range(fd_counts[i % len(fd_counts)] if fd_counts else 0)
            ]
            opened += fds
            try:
                parser.feed(chunk, fds)
            except HttpError:
                for fd in fds:
                    os.close(fd)
                got += fds
                raise
            while (request := parser.next_request()) is not None:
                assert request.method and request.path.startswith("/")
                assert len(request.fds) <= MAX_PENDING_FDS
                got += request.fds
                request.close_fds()
    except HttpError as exc:
        assert exc.status == 400 and exc.message and "\n" not in exc.message
    finally:
        pending = [fd for fd in opened if fd not in got]
        parser.close()
        for fd in pending:
            try:
                os.fstat(fd)
            except OSError:
                continue
            raise AssertionError(f"fd {fd} leaked")


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 1 << 40),
        st.floats(allow_nan=False),
        st.text(max_size=10),
        st.sampled_from(["Tty", "Off", "File", "Raw", "/dev/urandom", "1G"]),
    )
    keys = st.sampled_from(
        [
            "payload",
            "kernel",
            "cpus",
            "boot_vcpus",
            "max_vcpus",
            "memory",
            "size",
            "disks",
            "path",
            "devices",
            "serial",
            "console",
            "mode",
            "file",
            "platform",
            "num_pci_segments",
            "rng",
            "src",
            "topology",
            "packages",
            "pci_segments",
            "pci_segment",
            "id",
            "iommu",
        ]
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=6)),
        max_leaves=30,
    )


def check_json(document: Any) -> None:
    """Any JSON gives a config or one VmConfigError whose message is one line."""
    try:
        vm_config_from_json(document)
    except VmConfigError as exc:
        assert "\n" not in str(exc)


def hammer(path: str, payloads: list[bytes]) -> None:
    """Send every payload on its own connection, all of them open at once (more than the server's limit),
    then check a fresh connection is still answered."""
    socks = []
    try:
        for payload in payloads:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            socks.append(s)
            with contextlib.suppress(OSError):  # the server may have answered 400 and closed already
                s.sendall(payload)
        for s in socks[:3]:
            s.shutdown(socket.SHUT_WR)
    finally:
        for s in socks:
            s.close()
    with ApiClient(path, timeout=10) as client:
        response = client.request("GET", "vmm.ping")
        assert response.status == 200 and json.loads(response.body)["pid"] == os.getpid()
