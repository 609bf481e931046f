"""The hybrid vsock muxer: guest vsock streams to and from Unix sockets on the host (docs/vsock.md).

The host side listens on PATH. A host client connects, writes `CONNECT <port>\\n`, and gets
`OK <hostport>\\n` once the guest accepted (the guest's answer to our REQUEST), or its socket closed if
the guest reset it. A guest connecting to host port P (CID 2) reaches the Unix socket `PATH_P`.

Two threads use it, under one lock: the device's queue worker hands it the guest's packets
(`guest_packet`) and lets it fill the receive queue (`fill`); the muxer's own thread (`vsock-muxer`)
accepts host clients, reads their handshake lines, notices host sockets that are readable or writable,
and ends connections whose deadline passed. Lock order: the transport's lock, then this one; the muxer
thread kicks the receive queue only after releasing it.

Bounds: host data is read straight into the guest's receive buffers, never more than the guest's credit,
so nothing is buffered that way; guest data the host does not read yet waits in the connection's buffer,
at most BUF_ALLOC bytes (the credit we give); connections and pending handshakes are at most
MAX_CONNECTIONS; resets for unknown connections queue up to MAX_RST_BACKLOG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from pyvmm import sandbox
from pyvmm.devices.virtio.device import RateLimitedWarnings
from pyvmm.devices.virtio.queue import Virtqueue, gather, scatter, split_views
from pyvmm.devices.virtio.vsock_proto import (
    HEADER_SIZE,
    MAX_HANDSHAKE_LINE,
    SHUTDOWN_BOTH,
    VMADDR_CID_HOST,
    Credit,
    HandshakeError,
    Header,
    ShutdownFlag,
    VsockOp,
    VsockType,
    parse_connect_line,
)
from pyvmm.threadname import set_thread_comm

log = logging.getLogger(__name__)

THREAD_NAME = "vsock-muxer"
BUF_ALLOC = 64 << 10  # per connection: guest bytes pyvmm holds while the host peer does not read
MAX_CONNECTIONS = 1024  # connections plus host clients still in their handshake
MAX_RST_BACKLOG = 1024  # resets for unknown connections waiting for a receive buffer
MAX_RW_PAYLOAD = 64 << 10
HANDSHAKE_TIMEOUT = 10.0  # a host client has this long to write its CONNECT line
CONNECT_TIMEOUT = 10.0  # the guest has this long to answer a host client's REQUEST
CLOSE_TIMEOUT = 5.0  # after a full shutdown: to flush to the host, or for the guest's RST
FIRST_HOST_PORT = 1 << 30  # host-side ports of host-initiated connections start here
POLL_ERRORS = select.POLLERR | select.POLLNVAL
_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


class VsockSocketError(OSError):
    """PATH cannot be listened on."""


class State(Enum):
    CONNECTING = "connecting"  # host-initiated, REQUEST sent, waiting for the guest
    ESTABLISHED = "established"
    CLOSING = "closing"  # a full shutdown either way: waiting to flush, or for the guest's RST


@dataclass(eq=False)
class Connection:
    """One stream: `local_port` is the host side's port, `peer_port` the guest's."""

    sock: socket.socket
    local_port: int
    peer_port: int
    state: State
    credit: Credit = field(default_factory=lambda: Credit(BUF_ALLOC))
    out: bytearray = field(default_factory=bytearray)  # guest bytes the host socket did not take yet
    guest_shutdown: ShutdownFlag = field(default_factory=lambda: ShutdownFlag(0))
    host_eof: bool = False  # the host side will send nothing more (we told the guest)
    host_hup: bool = False  # the host side closed both ways
    write_shut: bool = False  # we shut the host socket's write side (the guest sends nothing more)
    readable: bool = False  # the host socket has data (or EOF) for the guest
    credit_update: bool = False  # a CREDIT_UPDATE is queued
    deadline: float | None = None
    closed: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port


@dataclass(eq=False)
class Handshake:
    sock: socket.socket
    deadline: float
    line: bytearray = field(default_factory=bytearray)
    closed: bool = False


def listen_unix(path: str) -> socket.socket:
    """A listening, non-blocking Unix stream socket at `path` (VsockSocketError when it exists already or
    cannot be made)."""
    if os.path.lexists(path):
        raise VsockSocketError(errno.EEXIST, f"{path} already exists (a socket left by an earlier VM? "
                                             "remove it)")
    sock = socket.socket(socket.AF_UNIX, _STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise VsockSocketError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
    return sock


class VsockMuxer:
    """Owns `listener` (listening at `path`, which close() removes) and every connection's socket."""

    def __init__(self, guest_cid: int, listener: socket.socket, path: str,
                 kick_rx: Callable[[], None], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.guest_cid = guest_cid
        self.path = path
        self._listener: socket.socket | None = listener
        self._kick_rx = kick_rx
        self._clock = clock
        self._lock = threading.Lock()
        self._conns: dict[tuple[int, int], Connection] = {}
        self._handshakes: list[Handshake] = []
        self._control: deque[tuple[Connection | None, Header]] = deque()
        self._rsts = 0  # how many of _control are resets for no connection
        self._readable: dict[tuple[int, int], Connection] = {}  # in round-robin order
        self._next_port = FIRST_HOST_PORT
        # Bumped whenever the receive queue gets new work: the muxer thread kicks the queue only then, and
        # the worker wakes the thread only when a connection needs polling again, so a guest that posts
        # no receive buffers costs neither thread anything while packets wait.
        self._rx_work = 0
        self._repoll = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._warn = RateLimitedWarnings(log, name="virtio-vsock")
        self._listen_ino: int | None = None
        with contextlib.suppress(OSError):
            self._listen_ino = os.stat(path).st_ino

    # ---- life --------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread, close every socket and remove PATH (if it is still ours)."""
        self._stopping = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._wake()
            thread.join()
        with self._lock:
            self._drop_all()
            for hs in self._handshakes:
                self._close_handshake(hs)
            self._handshakes.clear()
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._listen_ino:
                    os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._wake_fd)
        self._wake_fd = -1

    def reset(self) -> None:
        """The driver reset the device: every connection is gone for the guest, so for the host too."""
        with self._lock:
            self._drop_all()
        self._wake()

    def open_fds(self) -> int:
        """Sockets held (listener, handshakes, connections): for tests and logs."""
        with self._lock:
            return (self._listener is not None) + len(self._handshakes) + len(self._conns)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    # ---- guest -> host (the device's worker thread) -----------------------------------------------

    def guest_packet(self, hdr: Header, payload: list[memoryview]) -> None:
        """One packet from the transmit queue; `payload` holds the bytes after the header."""
        with self._lock:
            self._guest_packet(hdr, payload)
            kick = self._has_rx()  # a reply, or credit for a connection whose host data waits
        self._wake()
        if kick:
            self._kick_rx()

    def _guest_packet(self, hdr: Header, payload: list[memoryview]) -> None:
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != VMADDR_CID_HOST:
            self._warn.warning("virtio-vsock: packet from CID %d to CID %d dropped (the guest is CID %d, "
                               "the host %d)", hdr.src_cid, hdr.dst_cid, self.guest_cid, VMADDR_CID_HOST)
            return
        if hdr.type != VsockType.STREAM:
            if hdr.op != VsockOp.RST:
                self._reply_rst(hdr)
            return
        conn = self._conns.get((hdr.dst_port, hdr.src_port))
        if conn is None:
            if hdr.op == VsockOp.REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != VsockOp.RST:
                self._reply_rst(hdr)
            return
        conn.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        op = hdr.op
        if op == VsockOp.RST:
            self._drop(conn)
        elif op == VsockOp.RESPONSE and conn.state is State.CONNECTING:
            self._host_connected(conn)
        elif op == VsockOp.RW and conn.state is not State.CONNECTING:
            self._guest_data(conn, hdr, payload)
        elif op == VsockOp.SHUTDOWN and conn.state is not State.CONNECTING:
            self._guest_shutdown(conn, ShutdownFlag(hdr.flags & SHUTDOWN_BOTH))
        elif op == VsockOp.CREDIT_REQUEST:
            self._queue_credit_update(conn)
        elif op == VsockOp.CREDIT_UPDATE:
            pass  # the peer's counters were taken above; the muxer thread polls again if it can send
        else:  # a REQUEST for an existing connection, a RESPONSE or data out of turn: a broken stream
            self._reset(conn)

    def _guest_connect(self, hdr: Header) -> None:
        """The guest connects to host port P: PATH_P."""
        if len(self._conns) + len(self._handshakes) >= MAX_CONNECTIONS:
            self._warn.warning("virtio-vsock: %d connections already; the guest's connection to port %d "
                               "refused", MAX_CONNECTIONS, hdr.dst_port)
            self._reply_rst(hdr)
            return
        target = f"{self.path}_{hdr.dst_port}"
        try:
            sock = socket.socket(socket.AF_UNIX, _STREAM)
        except OSError as exc:  # out of fds: the guest is told no, the chain is still completed
            self._warn.warning("virtio-vsock: no socket for the guest's connection to %s: %s", target,
                               exc.strerror)
            self._reply_rst(hdr)
            return
        try:
            sock.connect(target)
        except OSError as exc:  # nobody listening (ENOENT, ECONNREFUSED), backlog full (EAGAIN), ...
            sock.close()
            log.debug("virtio-vsock: guest port %d -> %s: %s", hdr.src_port, target, exc.strerror)
            self._reply_rst(hdr)
            return
        conn = Connection(sock, hdr.dst_port, hdr.src_port, State.ESTABLISHED)
        conn.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        self._conns[conn.key] = conn
        self._queue(conn, VsockOp.RESPONSE)

    def _host_connected(self, conn: Connection) -> None:
        """The guest accepted a host client's connection: tell the client."""
        conn.state, conn.deadline = State.ESTABLISHED, None
        line = f"OK {conn.local_port}\n".encode()
        try:
            # A fresh socket's send buffer takes a few bytes whole; anything else means the client is gone.
            if conn.sock.send(line, socket.MSG_NOSIGNAL) != len(line):
                raise BlockingIOError
        except OSError:
            self._reset(conn)

    def _guest_data(self, conn: Connection, hdr: Header, payload: list[memoryview]) -> None:
        n = hdr.len
        if ShutdownFlag.SEND in conn.guest_shutdown or n > sum(len(v) for v in payload) \
                or not conn.credit.receive(n):
            self._warn.warning("virtio-vsock: port %d -> %d: %d bytes beyond the credit, after a shutdown or "
                               "beyond the buffer; connection reset", conn.peer_port, conn.local_port, n)
            self._reset(conn)
            return
        data = gather(split_views(payload, n)[0])
        if conn.out:
            conn.out += data
        else:
            sent = self._send(conn, data)
            if sent is None:
                return
            if sent < len(data):
                conn.out += data[sent:]
        self._after_forward(conn)

    def _send(self, conn: Connection, data: bytes | bytearray) -> int | None:
        """Write to the host socket without blocking; None when the host side is gone (connection reset)."""
        try:
            sent = conn.sock.send(data, socket.MSG_NOSIGNAL) if data else 0
        except BlockingIOError:
            return 0
        except OSError:
            self._reset(conn)
            return None
        conn.credit.forwarded(sent)
        return sent

    def _flush(self, conn: Connection) -> None:
        sent = self._send(conn, conn.out)
        if sent is None:
            return
        del conn.out[:sent]
        self._after_forward(conn)

    def _after_forward(self, conn: Connection) -> None:
        """Bytes reached the host: credit to give back, shutdowns waiting for an empty buffer."""
        if conn.out:
            if conn.credit.update_due():
                self._queue_credit_update(conn)
            return
        if ShutdownFlag.SEND in conn.guest_shutdown and not conn.write_shut:
            conn.write_shut = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        if conn.guest_shutdown == SHUTDOWN_BOTH:
            self._reset(conn)  # everything was written: end it with the RST the guest waits for
        elif conn.credit.update_due():
            self._queue_credit_update(conn)

    def _guest_shutdown(self, conn: Connection, flags: ShutdownFlag) -> None:
        conn.guest_shutdown |= flags
        if ShutdownFlag.RCV in conn.guest_shutdown:
            self._readable.pop(conn.key, None)
            conn.readable = False
        if conn.guest_shutdown == SHUTDOWN_BOTH and conn.state is not State.CLOSING:
            conn.state, conn.deadline = State.CLOSING, self._clock() + CLOSE_TIMEOUT
        self._after_forward(conn)

    # ---- host -> guest: the receive queue (worker thread) ----------------------------------------

    def has_rx(self) -> bool:
        with self._lock:
            return self._has_rx()

    def _has_rx(self) -> bool:
        return any(conn is None or not conn.closed for conn, _ in self._control) or any(
            self._can_read(c) for c in self._readable.values())

    @staticmethod
    def _can_read(conn: Connection) -> bool:
        return conn.readable and not conn.closed and conn.credit.peer_free() > 0

    def fill(self, queue: Virtqueue) -> bool:
        """Put pending packets into the receive queue's buffers; True when some are still waiting."""
        with self._lock:
            while self._has_rx():
                chain = queue.pop()
                if chain is None:
                    break
                if chain.error is not None or chain.readable:
                    self._warn.warning("virtio-vsock: receive chain %d: %s", chain.head,
                                       chain.error or "has device-readable buffers")
                    queue.push(chain.head, 0)
                    continue
                queue.push(chain.head, self._packet_into(chain.writable))
            pending = self._has_rx()
            repoll, self._repoll = self._repoll, False
        if repoll:
            self._wake()  # connections read dry are polled again
        return pending

    def _packet_into(self, views: list[memoryview]) -> int:
        """Write the next packet into a receive buffer; its length (0: nothing was there after all)."""
        room = sum(len(v) for v in views)
        if room < HEADER_SIZE:
            self._warn.warning("virtio-vsock: a receive buffer of %d bytes cannot hold a header", room)
            return 0
        while self._control:
            conn, hdr = self._control.popleft()
            if conn is None:
                self._rsts -= 1
            elif conn.closed:
                continue  # its RST is queued after it: nothing else about it matters now
            else:
                if hdr.op == VsockOp.CREDIT_UPDATE:
                    conn.credit_update = False
                buf_alloc, fwd_cnt = conn.credit.stamp()
                hdr = dataclasses.replace(hdr, buf_alloc=buf_alloc, fwd_cnt=fwd_cnt)
            return scatter(views, hdr.pack())
        head, tail = split_views(views, HEADER_SIZE)
        for conn in list(self._readable.values()):
            self._readable.pop(conn.key)
            if not self._can_read(conn):
                conn.readable = conn.readable and not conn.closed
                if conn.readable:
                    self._readable[conn.key] = conn  # waits for credit
                continue
            cap = min(room - HEADER_SIZE, conn.credit.peer_free(), MAX_RW_PAYLOAD)
            if cap <= 0:
                self._readable[conn.key] = conn
                continue
            try:
                n = conn.sock.recvmsg_into(split_views(tail, cap)[0])[0]
            except BlockingIOError:
                conn.readable = False
                self._repoll = True
                continue
            except OSError:
                self._reset(conn)
                continue
            if n == 0:
                conn.readable = False
                self._repoll = True
                self._host_eof(conn)
                continue
            if n == cap:
                self._readable[conn.key] = conn  # there may be more: next in the round
            else:
                conn.readable = False
                self._repoll = True
            conn.credit.sent(n)
            buf_alloc, fwd_cnt = conn.credit.stamp()
            hdr = Header(VMADDR_CID_HOST, self.guest_cid, conn.local_port, conn.peer_port, n,
                         VsockType.STREAM, VsockOp.RW, 0, buf_alloc, fwd_cnt)
            scatter(head, hdr.pack())
            return HEADER_SIZE + n
        if self._control:  # a connection ended above and queued its SHUTDOWN or RST
            return self._packet_into(views)
        return 0

    def _host_eof(self, conn: Connection) -> None:
        """The host side sends no more: a half close, or (host_hup) a full one."""
        conn.host_eof = True
        flags = SHUTDOWN_BOTH if conn.host_hup else ShutdownFlag.SEND
        self._queue(conn, VsockOp.SHUTDOWN, int(flags))
        if conn.host_hup and conn.state is not State.CLOSING:
            conn.state, conn.deadline = State.CLOSING, self._clock() + CLOSE_TIMEOUT

    # ---- packets to the guest ---------------------------------------------------------------------

    def _queue(self, conn: Connection, op: VsockOp, flags: int = 0) -> None:
        self._rx_work += 1
        self._control.append((conn, Header(VMADDR_CID_HOST, self.guest_cid, conn.local_port, conn.peer_port,
                                           0, VsockType.STREAM, op, flags)))

    def _queue_credit_update(self, conn: Connection) -> None:
        if not conn.credit_update:
            conn.credit_update = True
            self._queue(conn, VsockOp.CREDIT_UPDATE)

    def _reply_rst(self, hdr: Header) -> None:
        if self._rsts >= MAX_RST_BACKLOG:
            self._warn.warning("virtio-vsock: %d resets wait for receive buffers; one more dropped",
                               MAX_RST_BACKLOG)
            return
        self._rsts += 1
        self._rx_work += 1
        self._control.append((None, Header(VMADDR_CID_HOST, self.guest_cid, hdr.dst_port, hdr.src_port, 0,
                                           VsockType.STREAM, VsockOp.RST)))

    def _reset(self, conn: Connection) -> None:
        """End `conn` both ways: RST to the guest, the host socket closed."""
        if conn.closed:
            return
        self._drop(conn)
        self._rsts += 1  # counted with the resets for no connection: at most one per connection dropped
        self._rx_work += 1
        self._control.append((None, Header(VMADDR_CID_HOST, self.guest_cid, conn.local_port, conn.peer_port,
                                           0, VsockType.STREAM, VsockOp.RST)))

    def _drop(self, conn: Connection) -> None:
        """Forget `conn` and close its host socket (packets queued for it are not sent)."""
        if conn.closed:
            return
        conn.closed = True
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        self._readable.pop(conn.key, None)
        conn.sock.close()
        conn.out.clear()

    def _drop_all(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._control.clear()
        self._rsts = 0

    # ---- the muxer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        set_thread_comm(THREAD_NAME)
        sandbox.enter(sandbox.ThreadKind.VSOCK_MUXER)  # its own seccomp filter, when on (docs/seccomp.md)
        while not self._stopping:
            try:
                kick = self.poll_once()
            except Exception:  # a bug here must not end the thread silently
                log.exception("%s: unexpected error", THREAD_NAME)
                kick = False
                time.sleep(0.1)
            if kick:
                self._kick_rx()

    def poll_once(self, timeout: float | None = None) -> bool:
        """Wait for host sockets (or a wake-up) and handle what happened; True when the receive queue has
        new work. `timeout` (seconds) caps the wait; tests drive the muxer with it."""
        poller = select.poll()
        targets: dict[int, Connection | Handshake | socket.socket | None] = {self._wake_fd: None}
        poller.register(self._wake_fd, select.POLLIN)
        with self._lock:
            if self._listener is not None:
                poller.register(self._listener.fileno(), select.POLLIN)
                targets[self._listener.fileno()] = self._listener
            for hs in self._handshakes:
                poller.register(hs.sock.fileno(), select.POLLIN)
                targets[hs.sock.fileno()] = hs
            for conn in self._conns.values():
                events = self._interest(conn)
                if events is not None:
                    poller.register(conn.sock.fileno(), events)
                    targets[conn.sock.fileno()] = conn
            wait = self._next_deadline()
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        ready = poller.poll(None if wait is None else max(0, int(wait * 1000) + 1))
        with self._lock:
            work = self._rx_work
            for fd, events in ready:
                target = targets.get(fd)
                if fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake_fd)
                elif isinstance(target, Connection):
                    self._conn_event(target, events)
                elif isinstance(target, Handshake):
                    self._read_handshake(target)
                elif target is not None and target is self._listener:
                    self._accept()
            self._expire()
            return self._rx_work != work and self._has_rx()

    def _interest(self, conn: Connection) -> int | None:
        """Poll events for `conn`'s socket; None: not polled (a hang-up already seen would wake the
        thread again and again; with nothing to ask for it waits for the guest or its deadline)."""
        events = 0
        if conn.out:
            events |= select.POLLOUT
        if (conn.state is not State.CONNECTING and not conn.readable and not conn.host_eof
                and ShutdownFlag.RCV not in conn.guest_shutdown and conn.credit.peer_free() > 0):
            events |= select.POLLIN
        return None if conn.host_hup and not events else events

    def _conn_event(self, conn: Connection, events: int) -> None:
        if conn.closed:
            return  # dropped meanwhile (its fd number may be someone else's now)
        hup = bool(events & select.POLLHUP) and not conn.host_hup
        if hup:
            conn.host_hup = True
        if conn.state is State.CONNECTING:
            if events & (select.POLLHUP | POLL_ERRORS):
                self._reset(conn)  # the client gave up before the guest answered
            return
        if events & POLL_ERRORS and not events & select.POLLIN:
            self._reset(conn)
            return
        if events & select.POLLOUT or (conn.out and hup):
            self._flush(conn)
            if conn.closed:
                return
        if events & (select.POLLIN | select.POLLHUP) and not conn.host_eof \
                and ShutdownFlag.RCV not in conn.guest_shutdown:
            conn.readable = True  # data, or the EOF that the receive path turns into a SHUTDOWN
            self._readable[conn.key] = conn
            self._rx_work += 1
        elif hup and conn.host_eof and conn.state is not State.CLOSING:
            # Half closed before, fully closed now: the guest may reset the connection.
            self._queue(conn, VsockOp.SHUTDOWN, int(SHUTDOWN_BOTH))
            conn.state, conn.deadline = State.CLOSING, self._clock() + CLOSE_TIMEOUT

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: leave the client in the backlog for now
                self._warn.warning("virtio-vsock: accept on %s: %s", self.path, exc.strerror)
                return
            if len(self._conns) + len(self._handshakes) >= MAX_CONNECTIONS:
                self._warn.warning("virtio-vsock: %d connections already; a host client on %s refused",
                                   MAX_CONNECTIONS, self.path)
                sock.close()
                continue
            sock.setblocking(False)
            self._handshakes.append(Handshake(sock, self._clock() + HANDSHAKE_TIMEOUT))

    def _read_handshake(self, hs: Handshake) -> None:
        """Read the client's line a byte at a time, so bytes after its newline stay for the guest."""
        while not hs.line.endswith(b"\n") and len(hs.line) <= MAX_HANDSHAKE_LINE:
            try:
                byte = hs.sock.recv(1)
            except BlockingIOError:
                return
            except OSError:
                byte = b""
            if not byte:
                self._close_handshake(hs)
                return
            hs.line += byte
        try:
            port = parse_connect_line(bytes(hs.line))
        except HandshakeError as exc:
            log.debug("virtio-vsock: host client on %s: %s", self.path, exc)
            self._close_handshake(hs)
            return
        self._handshakes.remove(hs)
        local = self._free_port(port)
        conn = Connection(hs.sock, local, port, State.CONNECTING, deadline=self._clock() + CONNECT_TIMEOUT)
        self._conns[conn.key] = conn
        self._queue(conn, VsockOp.REQUEST)

    def _free_port(self, peer_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < 0xFFFF_FFFE else FIRST_HOST_PORT
            if (port, peer_port) not in self._conns:
                return port

    def _close_handshake(self, hs: Handshake) -> None:
        if not hs.closed:
            hs.closed = True
            hs.sock.close()
        if hs in self._handshakes:
            self._handshakes.remove(hs)

    def _next_deadline(self) -> float | None:
        deadlines = [hs.deadline for hs in self._handshakes]
        deadlines += [c.deadline for c in self._conns.values() if c.deadline is not None]
        return max(0.0, min(deadlines) - self._clock()) if deadlines else None

    def _expire(self) -> None:
        now = self._clock()
        for hs in [hs for hs in self._handshakes if hs.deadline <= now]:
            log.debug("virtio-vsock: host client on %s wrote no CONNECT line in time", self.path)
            self._close_handshake(hs)
        for conn in [c for c in self._conns.values() if c.deadline is not None and c.deadline <= now]:
            if conn.state is State.CONNECTING:
                log.debug("virtio-vsock: guest port %d did not answer in time", conn.peer_port)
            self._reset(conn)
