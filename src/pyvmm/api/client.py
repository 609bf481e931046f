"""The client side of the API socket, as cloud-hypervisor's own client (ch-remote's) talks to it: the request
it writes, and a response reader that reads exactly as that client does (status code between `HTTP/1.1 `
and the first CR, body length from the case-sensitive `Content-Length: `), so pyvmm's responses are checked
against the reading they must survive.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence
from dataclasses import dataclass

READ_CHUNK = 256  # CH's client reads and decodes responses 256 bytes at a time


class ApiClientError(Exception):
    """The connection failed or the response is not one CH's client could read."""


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return self.status in (100, 200, 204)  # what CH's client counts as success


def encode_request(method: str, endpoint: str, body: bytes | None = None) -> bytes:
    """ch-remote's request bytes: no Content-Type, Content-Length only with a body."""
    head = f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def parse_status(head: str) -> int:
    start = head.find("HTTP/1.1 ")
    if start < 0:
        raise ApiClientError("no HTTP/1.1 status line")
    rest = head[start + len("HTTP/1.1 ") :]
    code = rest[: rest.find("\r")] if "\r" in rest else rest
    try:
        return int(code.strip())
    except ValueError:
        raise ApiClientError(f"status {code!r} is not a number (a reason phrase?)") from None


def content_length(head: str) -> int:
    start = head.find("Content-Length: ")
    if start < 0:
        return 0
    rest = head[start + len("Content-Length: ") :]
    end = rest.find("\r")
    return int(rest if end < 0 else rest[:end])


def read_response(sock: socket.socket) -> ApiResponse:
    """One response from `sock`, read the way CH's client reads it (ASCII/UTF-8 required)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(READ_CHUNK)
        if not chunk:
            raise ApiClientError("connection closed before the response head ended")
        chunk.decode("utf-8")  # CH's client unwraps this: non-UTF-8 would crash it
        data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    head = head_bytes.decode("ascii")
    status = parse_status(head)
    length = content_length(head)
    while len(body) < length:
        chunk = sock.recv(READ_CHUNK)
        if not chunk:
            raise ApiClientError("connection closed before the body ended")
        body += chunk
    if len(body) > length:
        raise ApiClientError(f"{len(body) - length} bytes after the response's body")
    return ApiResponse(status, body)


class ApiClient:
    """One persistent connection to a VMM's API socket."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise

    def request(
        self, method: str, endpoint: str, body: bytes | None = None, fds: Sequence[int] = ()
    ) -> ApiResponse:
        data = encode_request(method, endpoint, body)
        if fds:  # with the request's first bytes, as ch-remote sends them
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            )
        else:
            self.sock.sendall(data)
        return read_response(self.sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
