"""The virtio-vsock wire format (virtio 1.x §5.10, linux/virtio_vsock.h) and the pure parts of the hybrid
vsock protocol: the packet header codec, per-connection credit accounting and the host's `CONNECT <port>`
line. No sockets here: devices/virtio/vsock_muxer.py uses these. docs/vsock.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

VMADDR_CID_HOST = 2  # the host's address as every guest sees it
# struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt
HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44
U32 = 0xFFFF_FFFF
MAX_PORT = U32
# A host line is `CONNECT <port>\n`: 8 + 10 digits + 1. Anything longer is not one.
MAX_HANDSHAKE_LINE = 32


class VsockType(IntEnum):
    STREAM = 1
    SEQPACKET = 2


class VsockOp(IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ShutdownFlag(IntFlag):
    RCV = 1  # the sender will receive no more
    SEND = 2  # the sender will send no more


SHUTDOWN_BOTH = ShutdownFlag.RCV | ShutdownFlag.SEND


@dataclass(frozen=True, slots=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
                           self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        """Decode the first HEADER_SIZE bytes (ValueError when there are fewer). Values are not checked
        here: the muxer decides what a guest may send."""
        if len(data) < HEADER_SIZE:
            raise ValueError(f"a vsock header is {HEADER_SIZE} bytes, got {len(data)}")
        return cls(*HEADER.unpack_from(data))


class Credit:
    """The flow-control counters of one connection (all 32-bit, wrapping, as the header carries them).

    Ours: `buf_alloc` (what we may hold for the host peer), `rx_cnt` (bytes the guest sent us) and
    `fwd_cnt` (bytes of them written to the host socket); the guest may have at most
    buf_alloc - (rx_cnt - fwd_cnt) bytes in flight, and a guest sending more breaks the protocol.
    The guest's: `peer_buf_alloc` and `peer_fwd_cnt` from the last header it sent, against `tx_cnt`
    (bytes we sent it): we send at most `peer_free()` more.
    """

    def __init__(self, buf_alloc: int) -> None:
        self.buf_alloc = buf_alloc
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.advertised_fwd_cnt = 0  # the fwd_cnt the guest last saw
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0

    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc & U32
        self.peer_fwd_cnt = fwd_cnt & U32

    def peer_free(self) -> int:
        """Bytes we may still send the guest (0 when a confused guest reports more consumed than sent)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return self.peer_buf_alloc - in_flight if in_flight <= self.peer_buf_alloc else 0

    def sent(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & U32

    def buffered(self) -> int:
        """Guest bytes received and not yet forwarded to the host socket."""
        return (self.rx_cnt - self.fwd_cnt) & U32

    def receive(self, n: int) -> bool:
        """The guest sent `n` bytes; False (nothing counted) when that exceeds the credit we gave it."""
        if self.buffered() + n > self.buf_alloc:
            return False
        self.rx_cnt = (self.rx_cnt + n) & U32
        return True

    def forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & U32

    def stamp(self) -> tuple[int, int]:
        """(buf_alloc, fwd_cnt) for a header we send: the guest then knows everything forwarded so far."""
        self.advertised_fwd_cnt = self.fwd_cnt
        return self.buf_alloc, self.fwd_cnt

    def update_due(self) -> bool:
        """Whether to send a CREDIT_UPDATE now: the guest believes less than half the buffer is free and
        forwarding freed some of it since it was last told (so a guest waiting for credit is never left
        waiting, and a streaming one is not told after every write)."""
        if self.fwd_cnt == self.advertised_fwd_cnt:
            return False
        believed_free = self.buf_alloc - ((self.rx_cnt - self.advertised_fwd_cnt) & U32)
        return believed_free < self.buf_alloc // 2


class HandshakeError(ValueError):
    """The host client's first line is not `CONNECT <port>`."""


def parse_connect_line(line: bytes) -> int:
    """The port of `CONNECT <port>\\n` (the newline included; one or more spaces, a decimal port
    0..2^32-1, optional trailing spaces). HandshakeError for anything else."""
    if len(line) > MAX_HANDSHAKE_LINE:
        raise HandshakeError(f"line longer than {MAX_HANDSHAKE_LINE} bytes")
    if not line.endswith(b"\n"):
        raise HandshakeError("no newline at the end of the line")
    words = line[:-1].split(b" ")
    words = [w for w in words if w]
    if len(words) != 2 or words[0] != b"CONNECT":
        raise HandshakeError("expected `CONNECT <port>`")
    digits = words[1]
    if not digits.isdigit() or not digits.isascii():
        raise HandshakeError(f"port {digits[:12]!r} is not a decimal number")
    port = int(digits)
    if port > MAX_PORT:
        raise HandshakeError(f"port {port} is out of range (0..{MAX_PORT})")
    return port
