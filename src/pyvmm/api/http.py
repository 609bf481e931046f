"""HTTP/1.1 as cloud-hypervisor's API socket speaks it (docs/api.md#transport): an incremental request
parser with bounds, and responses framed byte for byte as CH frames them.

The parser is pure (bytes and fd numbers in, `Request`s out), so the framing is unit-tested and fuzzed
without sockets. File descriptors that arrive (SCM_RIGHTS) while a request is being read belong to that
request when it completes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

MAX_HEAD_BYTES = 8 * 1024  # request line + headers
MAX_BODY_BYTES = 4 << 20  # CH's current limit (older releases: 51200 bytes)
MAX_HEADERS = 64
MAX_PENDING_FDS = 253  # SCM_MAX_FD: what one request can carry

SERVER_HEADER = b"Server: Cloud Hypervisor API\r\n"
CONNECTION_HEADER = b"Connection: keep-alive\r\n"


class Status(IntEnum):
    CONTINUE = 100
    OK = 200
    NO_CONTENT = 204
    BAD_REQUEST = 400
    NOT_FOUND = 404
    INTERNAL_SERVER_ERROR = 500


class HttpError(Exception):
    """A request that cannot be parsed: answered with `status`, then its connection is closed (its framing
    is lost)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes = b""
    fds: list[int] = field(default_factory=list)  # received with this request; whoever takes one owns it

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""

    def encode(self) -> bytes:
        """CH's framing: no reason phrase after the code, Content-Type and Content-Length on everything but
        204
        (and 100), and Content-Length: 0 on other empty responses."""
        head = b"HTTP/1.1 %d \r\n" % self.status + SERVER_HEADER + CONNECTION_HEADER
        if self.status in (Status.NO_CONTENT, Status.CONTINUE):
            return head + b"\r\n"
        return (
            head
            + b"Content-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(self.body)
            + self.body
        )


def json_response(status: int, value: object) -> Response:
    """A body in compact JSON, ASCII only (CH's client decodes every chunk of the response as UTF-8)."""
    return Response(status, json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode())


def error_response(status: int, messages: Sequence[str]) -> Response:
    """CH's error body: a JSON array of strings, outermost context first."""
    return json_response(status, [m.replace("\n", " ") for m in messages])


NO_CONTENT = Response(Status.NO_CONTENT)
CONTINUE = Response(Status.CONTINUE)

_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass
class _Head:
    method: str
    path: str
    headers: dict[str, str]
    length: int


class RequestParser:
    """Feed it what one connection receives; take complete requests with `next_request()`.

    Bounds: MAX_HEAD_BYTES for a request's line and headers, MAX_BODY_BYTES for its body, MAX_PENDING_FDS fds
    held. Anything else wrong raises HttpError once and the connection is to be closed.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._fds: list[int] = []
        self.continue_sent = False  # the 100 answer to `Expect: 100-continue` went out for this request

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self._fds.extend(fds)
        if len(self._fds) > MAX_PENDING_FDS:
            raise HttpError(
                Status.BAD_REQUEST, f"more than {MAX_PENDING_FDS} file descriptors in one request"
            )
        self._buffer += data

    @property
    def idle(self) -> bool:
        """Nothing of a next request received yet (a close now loses nothing)."""
        return not self._buffer and self._head is None

    def expects_continue(self) -> bool:
        """The head of the current request is in, it asked for `100-continue` and its body is not."""
        head = self._head
        return (
            head is not None
            and not self.continue_sent
            and head.length > len(self._buffer)
            and head.headers.get("expect", "").lower() == "100-continue"
        )

    def next_request(self) -> Request | None:
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise HttpError(Status.BAD_REQUEST, f"request head longer than {MAX_HEAD_BYTES} bytes")
                return None
            if end + 4 > MAX_HEAD_BYTES:
                raise HttpError(Status.BAD_REQUEST, f"request head longer than {MAX_HEAD_BYTES} bytes")
            self._head = _parse_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
        head = self._head
        if len(self._buffer) < head.length:
            return None
        body = bytes(self._buffer[: head.length])
        del self._buffer[: head.length]
        self._head = None
        self.continue_sent = False
        fds, self._fds = self._fds, []
        return Request(head.method, head.path, head.headers, body, fds)

    def close(self) -> None:
        """Close the fds of a request that never completed."""
        Request("", "", {}, fds=self._fds).close_fds()
        self._fds = []


def _parse_head(raw: bytes) -> _Head:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(Status.BAD_REQUEST, "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(Status.BAD_REQUEST, "invalid request line: expected METHOD PATH HTTP/1.x")
    method, path, version = parts
    if not method or not set(method.encode()) <= _METHOD_CHARS:
        raise HttpError(Status.BAD_REQUEST, "invalid request line: bad method")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(Status.BAD_REQUEST, f"unsupported HTTP version {version[:16]!r}")
    if not path.startswith("/"):
        raise HttpError(Status.BAD_REQUEST, "invalid request line: the path must start with /")
    headers: dict[str, str] = {}
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(Status.BAD_REQUEST, f"more than {MAX_HEADERS} headers")
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or not set(name.encode()) <= _TOKEN_CHARS:
            raise HttpError(Status.BAD_REQUEST, f"invalid header line {line[:40]!r}")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(Status.BAD_REQUEST, "Transfer-Encoding is not supported: send a Content-Length")
    length = 0
    raw_length = headers.get("content-length")
    if raw_length is not None:
        if not raw_length.isdigit() or len(raw_length) > 12:
            raise HttpError(Status.BAD_REQUEST, f"invalid Content-Length {raw_length[:20]!r}")
        length = int(raw_length)
        if length > MAX_BODY_BYTES:
            raise HttpError(
                Status.BAD_REQUEST, f"request body of {length} bytes is larger than {MAX_BODY_BYTES}"
            )
    return _Head(method, path, headers, length)
