"""virtio-vsock's pure parts (header codec, credit, the CONNECT line) and the hybrid muxer's state machine,
driven without its thread: the test plays the guest (guest_packet, fill) and the host (Unix sockets)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pyvmm.devices.virtio.queue import DescriptorChain
from pyvmm.devices.virtio.vsock import VirtioVsock
from pyvmm.devices.virtio.vsock_muxer import (
    BUF_ALLOC,
    CLOSE_TIMEOUT,
    CONNECT_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    VsockMuxer,
    VsockSocketError,
    listen_unix,
)
from pyvmm.devices.virtio.vsock_proto import (
    HEADER_SIZE,
    U32,
    Credit,
    HandshakeError,
    Header,
    ShutdownFlag,
    VsockOp,
    VsockType,
    parse_connect_line,
)

GUEST_CID = 3

# ---- the header codec ---------------------------------------------------------------------------------


def test_header_round_trip_and_layout() -> None:
    hdr = Header(3, 2, 1234, 5000, 7, VsockType.STREAM, VsockOp.RW, 2, 65536, 99)
    raw = hdr.pack()
    assert len(raw) == HEADER_SIZE == 44
    assert Header.unpack(raw) == hdr
    # little-endian fields at the offsets of struct virtio_vsock_hdr
    assert raw[0:8] == (3).to_bytes(8, "little") and raw[16:20] == (1234).to_bytes(4, "little")
    assert raw[28:30] == (1).to_bytes(2, "little") and raw[30:32] == (5).to_bytes(2, "little")
    assert raw[40:44] == (99).to_bytes(4, "little")
    assert Header.unpack(raw + b"payload") == hdr


def test_header_too_short() -> None:
    with pytest.raises(ValueError, match="44 bytes"):
        Header.unpack(b"\0" * 43)


# ---- credit -------------------------------------------------------------------------------------------


def test_credit_peer_free_and_wrap() -> None:
    c = Credit(1000)
    assert c.peer_free() == 0  # nothing known about the peer yet: send nothing
    c.update_peer(4096, 0)
    c.sent(4000)
    assert c.peer_free() == 96
    c.update_peer(4096, 4000)
    assert c.peer_free() == 4096
    c.tx_cnt = U32 - 10  # counters wrap at 32 bits
    c.update_peer(4096, U32 - 10)
    c.sent(100)
    assert c.tx_cnt == 89 and c.peer_free() == 3996
    c.update_peer(4096, 200)  # a peer claiming more consumed than sent gets nothing
    assert c.peer_free() == 0


def test_credit_receive_refuses_beyond_buf_alloc() -> None:
    c = Credit(100)
    assert c.receive(60) and c.buffered() == 60
    assert not c.receive(41) and c.buffered() == 60  # nothing counted
    c.forwarded(50)
    assert c.receive(41) and c.buffered() == 51


def test_credit_update_due_when_the_peer_believes_little_is_free() -> None:
    c = Credit(100)
    c.receive(40)
    c.forwarded(40)
    assert not c.update_due()  # the peer believes 60 free: no need to tell it
    c.receive(60)
    c.forwarded(10)
    assert c.update_due()  # it believes 0 free, and 10 were freed
    assert c.stamp() == (100, 50)
    assert not c.update_due()


# ---- the CONNECT line ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "port"), [
    (b"CONNECT 1234\n", 1234), (b"CONNECT  0 \n", 0), (b"CONNECT 4294967295\n", U32),
])
def test_connect_line(line: bytes, port: int) -> None:
    assert parse_connect_line(line) == port


@pytest.mark.parametrize(("line", "message"), [
    (b"HELLO 12\n", "CONNECT <port>"),
    (b"\x00\xff garbage\n", "CONNECT <port>"),
    (b"CONNECT 12", "no newline"),
    (b"CONNECT " + b"1" * 40 + b"\n", "longer than"),
    (b"CONNECT 4294967296\n", "out of range"),
    (b"CONNECT -1\n", "not a decimal"),
    (b"CONNECT \xd9\xa1\n", "not a decimal"),  # an Arabic-Indic digit is not a port
    (b"CONNECT 1 2\n", "CONNECT <port>"),
    (b"connect 1\n", "CONNECT <port>"),
])
def test_connect_line_refused(line: bytes, message: str) -> None:
    with pytest.raises(HandshakeError, match=message):
        parse_connect_line(line)


# ---- the muxer -----------------------------------------------------------------------------------------


class FakeRxQueue:
    """What the muxer uses of a Virtqueue: device-writable chains of `size` bytes, as many as posted."""

    index = 0

    def __init__(self) -> None:
        self.posted: list[bytearray] = []
        self.used: list[tuple[bytearray, int]] = []

    def post(self, count: int = 1, size: int = HEADER_SIZE + 4096) -> None:
        self.posted += [bytearray(size) for _ in range(count)]

    def pop(self) -> DescriptorChain | None:
        if not self.posted:
            return None
        buf = self.posted.pop(0)
        head = len(self.used)
        self.used.append((buf, -1))
        return DescriptorChain(head, [], [], [memoryview(buf)])

    def push(self, head: int, written: int) -> None:
        self.used[head] = (self.used[head][0], written)

    def enable_notifications(self) -> bool:
        return False


class Guest:
    """The guest's side of one muxer: its packets in, the muxer's packets out."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "vsock.sock")
        self.now = 1000.0
        self.kicks = 0
        self.mux = VsockMuxer(GUEST_CID, listen_unix(self.path), self.path, self._kick,
                              clock=lambda: self.now)
        self.rx = FakeRxQueue()
        self.seen = 0

    def _kick(self) -> None:
        self.kicks += 1

    def send(self, op: VsockOp, src_port: int = 1234, dst_port: int = 0, data: bytes = b"", *,
             flags: int = 0, buf_alloc: int = 256 << 10, fwd_cnt: int = 0, dst_cid: int = 2,
             type_: int = VsockType.STREAM) -> None:
        hdr = Header(GUEST_CID, dst_cid, src_port, dst_port, len(data), type_, op, flags, buf_alloc, fwd_cnt)
        self.mux.guest_packet(hdr, [memoryview(data)] if data else [])

    def poll(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.mux.poll_once(timeout=0.05)

    def receive(self, buffers: int = 8, size: int = HEADER_SIZE + 4096) -> list[tuple[Header, bytes]]:
        self.rx.post(buffers, size)
        self.mux.fill(self.rx)  # type: ignore[arg-type]
        self.rx.posted.clear()
        out = []
        for buf, n in self.rx.used[self.seen:]:
            if n > 0:
                hdr = Header.unpack(buf)
                out.append((hdr, bytes(buf[HEADER_SIZE : HEADER_SIZE + hdr.len])))
        self.seen = len(self.rx.used)
        return out

    def host_connect(self, port: int, guest_port: int | None = None) -> tuple[socket.socket, Header]:
        """A host client's handshake up to the guest's REQUEST (answered RESPONSE unless guest_port None)."""
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(2)
        client.connect(self.path)
        client.sendall(b"CONNECT %d\n" % port)
        self.poll()
        [(req, _)] = self.receive()
        assert req.op == VsockOp.REQUEST and req.dst_port == port and req.dst_cid == GUEST_CID
        if guest_port is not None:
            self.send(VsockOp.RESPONSE, src_port=port, dst_port=req.src_port)
        return client, req


def _small_buffers(guest: Guest, client: socket.socket) -> None:
    """A host peer that takes little: small socket buffers on both ends of the one connection."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for conn in guest.mux._conns.values():
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


@pytest.fixture
def guest(tmp_path: Path):
    fds_before = len(os.listdir("/proc/self/fd"))
    g = Guest(tmp_path)
    yield g
    g.mux.close()
    assert not os.path.exists(g.path)  # the socket file is removed
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every fd closed


def test_host_initiated_connection_echo_and_close(guest: Guest) -> None:
    client, req = guest.host_connect(1234, guest_port=1234)
    assert client.recv(64) == b"OK %d\n" % req.src_port
    client.sendall(b"to the guest")
    guest.poll()
    [(rw, data)] = guest.receive()
    assert (rw.op, data, rw.src_port, rw.dst_port) == (VsockOp.RW, b"to the guest", req.src_port, 1234)
    guest.send(VsockOp.RW, 1234, req.src_port, b"to the host")
    assert client.recv(64) == b"to the host"
    client.close()  # a full close: SHUTDOWN both ways, and the guest's RST ends it
    guest.poll()
    [(shut, _)] = guest.receive()
    assert shut.op == VsockOp.SHUTDOWN and shut.flags == ShutdownFlag.RCV | ShutdownFlag.SEND
    guest.send(VsockOp.RST, 1234, req.src_port)
    assert guest.mux.open_fds() == 1  # the listener only


def test_guest_reset_closes_the_host_client(guest: Guest) -> None:
    client, req = guest.host_connect(9999)
    guest.send(VsockOp.RST, 9999, req.src_port)
    assert client.recv(64) == b""  # closed, no OK
    assert guest.mux.open_fds() == 1


@pytest.mark.parametrize("line", [b"GARBAGE\n", b"CONNECT 99999999999\n", b"CONNECT " + b"9" * 64])
def test_bad_handshake_closes_the_client(guest: Guest, line: bytes) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(2)
    client.connect(guest.path)
    client.sendall(line)
    guest.poll()
    try:
        assert client.recv(64) == b""
    except ConnectionResetError:
        pass  # closed with the rest of an over-long line unread
    finally:
        client.close()
    assert guest.receive() == [] and guest.mux.open_fds() == 1


def test_silent_client_and_silent_guest_time_out(guest: Guest) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.settimeout(2)
    silent.connect(guest.path)
    silent.sendall(b"CONN")  # no newline, ever
    waiting, req = guest.host_connect(5)  # the guest never answers
    assert guest.mux.open_fds() == 3
    guest.now += max(HANDSHAKE_TIMEOUT, CONNECT_TIMEOUT) + 1
    guest.poll(1)
    assert silent.recv(8) == b"" and waiting.recv(8) == b""
    [(rst, _)] = guest.receive()
    assert rst.op == VsockOp.RST and rst.src_port == req.src_port  # the guest forgets it too
    assert guest.mux.open_fds() == 1
    silent.close()
    waiting.close()


def test_guest_initiated_connection(guest: Guest, tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{guest.path}_5000")
    server.listen()
    guest.send(VsockOp.REQUEST, 777, 5000)
    [(resp, _)] = guest.receive()
    assert (resp.op, resp.src_port, resp.dst_port) == (VsockOp.RESPONSE, 5000, 777)
    peer, _ = server.accept()
    guest.send(VsockOp.RW, 777, 5000, b"hello host")
    assert peer.recv(64) == b"hello host"
    guest.send(VsockOp.SHUTDOWN, 777, 5000, flags=ShutdownFlag.SEND)  # half close: the host sees EOF
    assert peer.recv(64) == b""
    peer.sendall(b"answer")
    guest.poll()
    [(rw, data)] = guest.receive()
    assert rw.op == VsockOp.RW and data == b"answer"
    guest.send(VsockOp.SHUTDOWN, 777, 5000, flags=ShutdownFlag.SEND | ShutdownFlag.RCV)
    [(rst, _)] = guest.receive()  # everything was flushed: the RST the guest waits for
    assert rst.op == VsockOp.RST
    # nobody listens on 5001: reset at once
    guest.send(VsockOp.REQUEST, 778, 5001)
    [(rst, _)] = guest.receive()
    assert (rst.op, rst.src_port, rst.dst_port) == (VsockOp.RST, 5001, 778)
    assert guest.mux.open_fds() == 1
    peer.close()
    server.close()


def test_peer_that_never_reads_is_held_back_by_credit(guest: Guest) -> None:
    client, req = guest.host_connect(1234, guest_port=1234)
    client.recv(64)
    _small_buffers(guest, client)
    chunk = b"g" * 4096
    sent = 0
    for _ in range(4 * BUF_ALLOC // len(chunk)):  # far more than the socket buffers and the credit
        guest.send(VsockOp.RW, 1234, req.src_port, chunk)
        if guest.mux.open_fds() == 1:
            break  # reset once the guest went past its credit
        sent += len(chunk)
        conn = next(iter(guest.mux._conns.values()))
        assert len(conn.out) <= BUF_ALLOC
    assert guest.mux.open_fds() == 1, "a guest writing past its credit is reset"
    assert sent >= BUF_ALLOC  # it got at least the credit we gave
    packets = guest.receive()
    assert packets[-1][0].op == VsockOp.RST
    client.close()


def test_credit_update_after_the_host_reads(guest: Guest) -> None:
    client, req = guest.host_connect(1234, guest_port=1234)
    client.recv(64)
    _small_buffers(guest, client)
    guest.receive()
    chunk = b"c" * 4096
    for _ in range(BUF_ALLOC // len(chunk)):
        guest.send(VsockOp.RW, 1234, req.src_port, chunk)
    conn = next(iter(guest.mux._conns.values()))
    assert conn.out  # the host did not take it all
    got = 0
    client.settimeout(0.5)
    while got < BUF_ALLOC:
        got += len(client.recv(65536))
        guest.poll(1)
    updates = [h for h, _ in guest.receive() if h.op == VsockOp.CREDIT_UPDATE]
    assert updates and updates[-1].fwd_cnt == BUF_ALLOC  # the guest learns the buffer is free again
    guest.send(VsockOp.CREDIT_REQUEST, 1234, req.src_port)
    [(upd, _)] = guest.receive()
    assert upd.op == VsockOp.CREDIT_UPDATE and upd.buf_alloc == BUF_ALLOC
    client.close()


def test_host_data_waits_for_guest_credit(guest: Guest) -> None:
    client, req = guest.host_connect(1234)
    guest.send(VsockOp.RESPONSE, 1234, req.src_port, buf_alloc=100)
    client.recv(64)
    client.sendall(b"h" * 1000)
    guest.poll()
    [(rw, data)] = guest.receive()
    assert rw.len == 100 and data == b"h" * 100  # no more than the guest's buf_alloc
    guest.poll()
    assert guest.receive() == []
    guest.send(VsockOp.CREDIT_UPDATE, 1234, req.src_port, buf_alloc=100, fwd_cnt=100)
    guest.poll()
    assert [len(d) for _, d in guest.receive()] == [100]
    client.close()


def test_small_receive_buffers_split_host_data(guest: Guest) -> None:
    client, _ = guest.host_connect(1234, guest_port=1234)
    client.recv(64)
    client.sendall(b"s" * 100)
    guest.poll()
    packets = guest.receive(buffers=8, size=HEADER_SIZE + 30)
    assert [len(d) for _, d in packets] == [30, 30, 30, 10]
    client.close()


@pytest.mark.parametrize("bad", ["wrong_cid", "seqpacket", "unknown_rw", "data_before_response"])
def test_guest_protocol_errors(guest: Guest, bad: str) -> None:
    if bad == "wrong_cid":
        guest.send(VsockOp.REQUEST, 1, 5000, dst_cid=7)
        assert guest.receive() == []  # not for the host: dropped
    elif bad == "seqpacket":
        guest.send(VsockOp.REQUEST, 1, 5000, type_=VsockType.SEQPACKET)
        assert [h.op for h, _ in guest.receive()] == [VsockOp.RST]
    elif bad == "unknown_rw":
        guest.send(VsockOp.RW, 1, 5000, b"lost")
        assert [h.op for h, _ in guest.receive()] == [VsockOp.RST]
    else:
        client, req = guest.host_connect(1234)
        guest.send(VsockOp.RW, 1234, req.src_port, b"early")
        assert [h.op for h, _ in guest.receive()] == [VsockOp.RST]
        assert client.recv(64) == b""
        client.close()
    assert guest.mux.open_fds() == 1


def test_full_shutdown_with_unread_data_is_reset_after_the_timeout(guest: Guest) -> None:
    client, req = guest.host_connect(1234, guest_port=1234)
    client.recv(64)
    _small_buffers(guest, client)
    for _ in range(8):
        guest.send(VsockOp.RW, 1234, req.src_port, b"u" * 4096)
    guest.send(VsockOp.SHUTDOWN, 1234, req.src_port, flags=ShutdownFlag.SEND | ShutdownFlag.RCV)
    guest.receive()
    assert guest.mux.open_fds() == 2  # still flushing to a host that does not read
    guest.now += CLOSE_TIMEOUT + 1
    guest.poll(1)
    assert [h.op for h, _ in guest.receive()] == [VsockOp.RST]
    assert guest.mux.open_fds() == 1
    client.close()


def test_reset_drops_every_connection(guest: Guest) -> None:
    clients = [guest.host_connect(1000 + i, guest_port=1000 + i)[0] for i in range(3)]
    assert guest.mux.open_fds() == 4
    guest.mux.reset()
    assert guest.mux.open_fds() == 1
    for c in clients:
        assert c.recv(64).startswith(b"OK ")
        assert c.recv(64) == b""
        c.close()


def test_listen_refuses_an_existing_path(tmp_path: Path) -> None:
    path = tmp_path / "taken"
    path.write_text("")
    with pytest.raises(VsockSocketError, match="already exists"):
        listen_unix(str(path))


def test_device_config_and_thread(tmp_path: Path) -> None:
    device = VirtioVsock.open(GUEST_CID, str(tmp_path / "v.sock"))
    try:
        assert device.read_config(0, 8) == GUEST_CID
        assert device.queue_sizes == [256, 256, 256] and device.features == 0
        thread = device.muxer._thread
        assert thread is not None and thread.name == "vsock-muxer" and thread.is_alive()
    finally:
        device.close()
    assert not thread.is_alive() and not (tmp_path / "v.sock").exists()


def test_muxer_stays_idle_while_the_guest_posts_no_receive_buffers(guest: Guest) -> None:
    """Packets waiting for buffers: neither thread keeps waking the other (no busy ping-pong)."""
    guest.send(VsockOp.RW, 1, 5000, b"unknown")  # queues a RST
    assert guest.mux.has_rx()
    empty = FakeRxQueue()
    assert guest.mux.fill(empty)  # type: ignore[arg-type]  # nothing posted: still pending
    assert not guest.mux.poll_once(timeout=0.01)  # no new work: no kick
    assert [h.op for h, _ in guest.receive()] == [VsockOp.RST]


def test_device_over_the_pci_transport(tmp_path: Path) -> None:
    """The guest driver's view: Linux 6.1's receive buffers (a 44-byte header descriptor and a 4 KiB one),
    a host client's handshake, the guest's RESPONSE and data over the transmit queue."""
    from test_virtio_driver import BAR_ADDRESS, Driver, FakeVectors, FakeVm, wait_used

    from pyvmm.devices.virtio import VirtioPciDevice, vector_count
    from pyvmm.memory import GuestMemory

    path = str(tmp_path / "v.sock")
    device = VirtioVsock.open(GUEST_CID, path)
    memory = GuestMemory([(0, 8 << 20)])
    dev = VirtioPciDevice(device, memory, FakeVectors(vector_count(device)), bar64=True, ioeventfds=FakeVm())
    dev.assign_bar(0, BAR_ADDRESS)
    driver = Driver(dev, memory)
    try:
        driver.init()
        assert dev.config_read(2, 2) == 0x1053  # modern virtio device 19
        assert driver.device_cfg(0, 4) == GUEST_CID and driver.common_read(0x12, 2) == 3
        rx, tx = driver.rings[0], driver.rings[1]
        buf = 0x400000
        heads = [rx.add([(buf + 0x2000 * i, HEADER_SIZE, True), (buf + 0x2000 * i + 0x100, 4096, True)])
                 for i in range(4)]
        rx.publish(*heads)
        driver.notify(0)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(path)
        client.sendall(b"CONNECT 1234\nearly")  # data right after the line reaches the guest too
        [(head, n)] = wait_used(rx, 1)
        req = Header.unpack(memory.read(buf + 0x2000 * heads.index(head), HEADER_SIZE))
        assert n == HEADER_SIZE and (req.op, req.dst_port, req.dst_cid) == (VsockOp.REQUEST, 1234, GUEST_CID)
        out = 0x600000
        resp = Header(GUEST_CID, 2, 1234, req.src_port, 0, VsockType.STREAM, VsockOp.RESPONSE, 0, 65536, 0)
        memory.write(out, resp.pack())
        tx.publish(tx.add([(out, HEADER_SIZE, False)]))
        driver.notify(1)
        assert client.recv(64) == b"OK %d\n" % req.src_port
        [(head, n)] = wait_used(rx, 1)
        slot = buf + 0x2000 * heads.index(head)
        rw = Header.unpack(memory.read(slot, HEADER_SIZE))
        assert (rw.op, n, memory.read(slot + 0x100, rw.len)) == (VsockOp.RW, HEADER_SIZE + 5, b"early")
        data = Header(GUEST_CID, 2, 1234, req.src_port, 3, VsockType.STREAM, VsockOp.RW, 0, 65536, 5)
        memory.write(out, data.pack())
        memory.write(out + 0x100, b"hey")
        tx.publish(tx.add([(out, HEADER_SIZE, False), (out + 0x100, 3, False)]))
        driver.notify(1)
        assert client.recv(64) == b"hey"
        client.close()
    finally:
        dev.close()
    assert not os.path.exists(path)


def test_connection_and_reset_bounds(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvmm.devices.virtio import vsock_muxer

    monkeypatch.setattr(vsock_muxer, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(vsock_muxer, "MAX_RST_BACKLOG", 3)
    kept = [guest.host_connect(10 + i, guest_port=10 + i)[0] for i in range(2)]
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(2)
    extra.connect(guest.path)
    guest.poll()
    assert extra.recv(8) == b""  # closed at once: no fd held for it
    guest.send(VsockOp.REQUEST, 99, 5000)  # the guest's own connection is refused too
    assert [h.op for h, _ in guest.receive()] == [VsockOp.RST]
    assert guest.mux.open_fds() == 3
    for _ in range(10):  # a guest that posts no receive buffers and keeps sending to nowhere
        guest.send(VsockOp.RW, 1, 7, b"?")
    assert [h.op for h, _ in guest.receive(buffers=20)] == [VsockOp.RST] * 3
    for sock in [*kept, extra]:
        sock.close()
