"""The API's HTTP framing: requests parsed with bounds, responses framed as cloud-hypervisor frames them and
read back the way CH's own client (ch-remote, Kata runtime-rs) reads them."""

from __future__ import annotations

import os
import socket

import pytest

from pyvmm.api.client import ApiClientError, encode_request, parse_status, read_response
from pyvmm.api.http import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    NO_CONTENT,
    HttpError,
    RequestParser,
    Response,
    error_response,
    json_response,
)


def test_204_has_no_reason_phrase_and_no_length() -> None:
    assert NO_CONTENT.encode() == (
        b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
    )


def test_body_response_bytes() -> None:
    assert json_response(200, {"a": 1}).encode() == (
        b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
        b'Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}'
    )


def test_empty_non_204_says_length_zero() -> None:
    assert Response(200).encode().endswith(b"Content-Type: application/json\r\nContent-Length: 0\r\n\r\n")


def test_error_body_is_a_json_array_and_ascii() -> None:
    body = error_response(500, ["Error from API", "The VM could not boot", "caf\u00e9\nx"]).body
    assert body == b'["Error from API","The VM could not boot","caf\\u00e9 x"]'


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    return a, b


@pytest.mark.parametrize(
    "response",
    [NO_CONTENT, json_response(200, {"version": "0.1.0"}), Response(200), error_response(404, ["Not Found"])],
)
def test_read_as_chs_client_reads(response: Response) -> None:
    """ch-remote's reader: status between 'HTTP/1.1 ' and the first CR, body by 'Content-Length: '."""
    a, b = _pair()
    with a, b:
        b.sendall(response.encode())
        got = read_response(a)
    assert (got.status, got.body) == (response.status, response.body)


def test_reason_phrase_breaks_chs_client() -> None:
    with pytest.raises(ApiClientError):
        parse_status("HTTP/1.1 204 No Content\r\n")


def _parse_all(data: bytes, chunk: int = 1 << 20) -> list:
    parser = RequestParser()
    out = []
    for i in range(0, len(data), chunk):
        parser.feed(data[i : i + chunk])
        while (request := parser.next_request()) is not None:
            out.append(request)
    return out


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
def test_pipelined_requests_in_any_chunking(chunk: int) -> None:
    data = (
        encode_request("GET", "vmm.ping")
        + encode_request("PUT", "vm.create", b'{"x": 1}')
        + encode_request("PUT", "vm.boot")
    )
    requests = _parse_all(data, chunk)
    assert [(r.method, r.path, r.body) for r in requests] == [
        ("GET", "/api/v1/vmm.ping", b""),
        ("PUT", "/api/v1/vm.create", b'{"x": 1}'),
        ("PUT", "/api/v1/vm.boot", b""),
    ]
    assert requests[1].headers["content-length"] == "8"


def test_truncated_request_waits() -> None:
    data = encode_request("PUT", "vm.create", b"0123456789")
    parser = RequestParser()
    parser.feed(data[:-1])
    assert parser.next_request() is None
    assert not parser.idle
    parser.feed(data[-1:])
    assert parser.next_request().body == b"0123456789"
    assert parser.idle


@pytest.mark.parametrize(
    "data",
    [
        b"GET\r\n\r\n",
        b"GET /api/v1/vmm.ping\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n",
        b"get /x HTTP/1.1\r\n\r\n",
        b"GET x HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
        b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\n\r\n",
        b"PUT /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1),
        b"GET /x HTTP/1.1\r\n" + b"A: b\r\n" * 70 + b"\r\n",
    ],
)
def test_malformed_heads_are_400(data: bytes) -> None:
    with pytest.raises(HttpError) as info:
        _parse_all(data)
    assert info.value.status == 400


def test_endless_head_is_refused_at_the_bound() -> None:
    parser = RequestParser()
    parser.feed(b"GET /" + b"a" * MAX_HEAD_BYTES)
    with pytest.raises(HttpError):
        parser.next_request()


def test_fds_belong_to_the_request_being_read() -> None:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(2)]
    parser = RequestParser()
    data = encode_request("PUT", "vm.add-device", b"{}")
    parser.feed(data[:10], fds[:1])
    parser.feed(data[10:] + encode_request("GET", "vmm.ping"), fds[1:])
    first, second = parser.next_request(), parser.next_request()
    assert first.fds == fds and second.fds == []
    first.close_fds()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_unfinished_requests_fds_are_closed() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    parser = RequestParser()
    parser.feed(b"PUT /api/v1/vm.add-device HTTP/1.1\r\n", [fd])
    parser.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_expect_continue() -> None:
    parser = RequestParser()
    parser.feed(b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert parser.next_request() is None
    assert parser.expects_continue()
    parser.continue_sent = True
    assert not parser.expects_continue()
    parser.feed(b"{}")
    assert parser.next_request().body == b"{}"
