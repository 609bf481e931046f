"""The API socket's server: one thread (`http-server`) serving HTTP/1.1 on a listening Unix socket.

Connections are persistent; requests are handled one at a time, in arrival order, by one handler
(`handle(request) -> Response`, which may block: the VMM answers API calls one after another). At most
MAX_CONNECTIONS connections are open at once (others wait in the listen backlog). A malformed request gets
its 400 and its connection is closed; nothing a client sends ends the server (docs/api.md#transport).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from pyvmm import sandbox
from pyvmm.api.http import CONTINUE, HttpError, Request, RequestParser, Response, error_response
from pyvmm.config import ApiSocketConfig
from pyvmm.errors import UsageError
from pyvmm.threadname import set_thread_comm

log = logging.getLogger("pyvmm.api")

MAX_CONNECTIONS = 10  # as CH's HTTP server
RECV_BYTES = 64 * 1024
SEND_TIMEOUT = 2.0  # a client that does not read its response loses its connection, not the server
_FD_BYTES = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(253 * _FD_BYTES)

Handler = Callable[[Request], Response]


class ApiSocketError(UsageError):
    """--api-socket names something pyvmm cannot serve on (exit status 2)."""


def open_listener(config: ApiSocketConfig) -> socket.socket:
    """The listening socket: bound at `path` (a stale socket file left by a dead VMM is replaced, a live one
    is refused) or the already listening Unix stream socket `fd`."""
    if config.fd is not None:
        return _adopt_fd(config.fd)
    assert config.path is not None
    path = config.path
    label = f"--api-socket path={path}"
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ApiSocketError(f"{label}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(mode):
            raise ApiSocketError(f"{label}: exists and is not a socket; give a new path")
        if _listening(path):
            raise ApiSocketError(f"{label}: another process is serving this socket; give another path")
        path.unlink()  # left behind by a VMM that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ApiSocketError(f"{label}: {exc.strerror}") from None
    return sock


def _listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _adopt_fd(fd: int) -> socket.socket:
    label = f"--api-socket fd={fd}"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ApiSocketError(f"{label}: not an open socket ({exc.strerror})") from None
    try:
        ok = (
            sock.family == socket.AF_UNIX
            and sock.type == socket.SOCK_STREAM
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        )
    except OSError:
        ok = False
    if not ok:
        sock.detach()  # not ours to close
        raise ApiSocketError(f"{label}: must be a listening Unix stream socket (bound, listen() called)")
    os.set_inheritable(fd, False)
    return sock


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = RequestParser()

    def receive(self) -> bool:
        """Read what is there into the parser; False when the peer closed."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(RECV_BYTES, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % _FD_BYTES])
                fds.extend(received)
        try:
            self.parser.feed(data, fds)
        except HttpError:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return bool(data)

    def close(self) -> None:
        self.parser.close()
        with contextlib.suppress(OSError):
            self.sock.close()


class ApiServer:
    """Serves `handle` on `listener` from its own thread until `close()`."""

    def __init__(self, listener: socket.socket, handle: Handler, path: Path | None = None) -> None:
        self._listener = listener
        self._handle = handle
        self._path = path  # removed at close when pyvmm bound it
        self._selector = selectors.DefaultSelector()
        self._connections: dict[int, _Connection] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closing = False
        self._accepting = False
        self._thread = threading.Thread(target=self._serve, name="http-server", daemon=True)

    def start(self) -> None:
        self._listener.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._accept(True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving: a response being sent is finished first; the socket file is removed."""
        self._closing = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for conn in list(self._connections.values()):
            conn.close()
        self._connections.clear()
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _accept(self, on: bool) -> None:
        if on != self._accepting:
            if on:
                self._selector.register(self._listener, selectors.EVENT_READ)
            else:
                self._selector.unregister(self._listener)
            self._accepting = on

    def _serve(self) -> None:
        set_thread_comm("http-server")  # as CH names its API thread
        sandbox.enter(sandbox.ThreadKind.HTTP_SERVER)  # its own seccomp filter (docs/seccomp.md)
        while not self._closing:
            try:
                events = self._selector.select()
            except OSError as exc:  # only EINTR is expected, and Python retries that itself
                log.warning("API server: select failed: %s", exc)
                continue
            for key, _mask in events:
                if self._closing:
                    return
                if key.fileobj is self._listener:
                    self._new_connection()
                elif key.fileobj == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 64)
                else:
                    conn = self._connections.get(key.fd)
                    if conn is not None:
                        self._serve_connection(conn)

    def _new_connection(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                log.warning("API server: accept failed: %s", exc)
            return
        sock.set_inheritable(False)
        sock.settimeout(SEND_TIMEOUT)
        conn = _Connection(sock)
        self._connections[sock.fileno()] = conn
        self._selector.register(sock, selectors.EVENT_READ)
        if len(self._connections) >= MAX_CONNECTIONS:
            self._accept(False)

    def _drop(self, conn: _Connection) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        self._connections.pop(conn.sock.fileno(), None)
        conn.close()
        if not self._closing:
            self._accept(True)

    def _serve_connection(self, conn: _Connection) -> None:
        try:
            if not conn.receive():
                self._drop(conn)
                return
            while True:
                request = conn.parser.next_request()
                if request is None:
                    if conn.parser.expects_continue():
                        conn.sock.sendall(CONTINUE.encode())
                        conn.parser.continue_sent = True
                    return
                try:
                    response = self._respond(request)
                finally:
                    request.close_fds()  # the fds a handler did not take
                conn.sock.sendall(response.encode())
        except HttpError as exc:
            with contextlib.suppress(OSError):
                conn.sock.sendall(error_response(exc.status, [exc.message]).encode())
            self._drop(conn)
        except OSError as exc:  # the peer went away, or did not read its response in time
            log.debug("API connection dropped: %s", exc)
            self._drop(conn)

    def _respond(self, request: Request) -> Response:
        try:
            return self._handle(request)
        except Exception as exc:  # a handler bug must not end the server: one 500 and go on
            log.exception("API request %s %s failed", request.method, request.path)
            return error_response(500, ["Error from API", f"internal error: {exc}"])
