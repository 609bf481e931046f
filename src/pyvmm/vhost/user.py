"""A vhost-user frontend: the control messages of the vhost-user protocol over a Unix socket, so that a
backend in another process (qemu-storage-daemon's vhost-user-blk export, virtiofsd) serves the guest's
virtqueues straight from guest RAM (docs/virtio-blk.md#vhost-user-blk, docs/virtio-fs.md).

Every message is a 12-byte header (request, flags, payload size; little endian) and a payload; file
descriptors travel beside it as SCM_RIGHTS. pyvmm sends a message and, when the request has an answer
(or REPLY_ACK asks for one), waits for it with a bound on time and size: a backend that stops answering
or answers nonsense is an error, never a hang or a giant allocation.
"""

from __future__ import annotations

import array
import contextlib
import socket
import struct
from collections.abc import Sequence
from enum import IntEnum, IntFlag
from typing import Self

from pyvmm.memory import GuestMemory
from pyvmm.vhost.backend import MemoryTableRegion, VhostError, VringSpec


class VhostUserRequest(IntEnum):
    """Frontend requests (the front-end message types of the vhost-user specification)."""

    VHOST_USER_GET_FEATURES = 1
    VHOST_USER_SET_FEATURES = 2
    VHOST_USER_SET_OWNER = 3
    VHOST_USER_RESET_OWNER = 4
    VHOST_USER_SET_MEM_TABLE = 5
    VHOST_USER_SET_LOG_BASE = 6
    VHOST_USER_SET_LOG_FD = 7
    VHOST_USER_SET_VRING_NUM = 8
    VHOST_USER_SET_VRING_ADDR = 9
    VHOST_USER_SET_VRING_BASE = 10
    VHOST_USER_GET_VRING_BASE = 11
    VHOST_USER_SET_VRING_KICK = 12
    VHOST_USER_SET_VRING_CALL = 13
    VHOST_USER_SET_VRING_ERR = 14
    VHOST_USER_GET_PROTOCOL_FEATURES = 15
    VHOST_USER_SET_PROTOCOL_FEATURES = 16
    VHOST_USER_GET_QUEUE_NUM = 17
    VHOST_USER_SET_VRING_ENABLE = 18
    VHOST_USER_GET_CONFIG = 24
    VHOST_USER_SET_CONFIG = 25


class VhostUserFlag(IntFlag):
    """The header's flags: the protocol version in bits 0-1, then the reply bits."""

    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


VHOST_USER_VERSION_MASK = 0x3


class VhostUserProtocolFeature(IntEnum):
    """Protocol feature bit numbers (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15


# The virtio feature bit a backend sets when it speaks protocol features; acked back in SET_FEATURES, it
# also makes every ring start disabled until SET_VRING_ENABLE.
VHOST_USER_F_PROTOCOL_FEATURES = 30
# The protocol features pyvmm uses: the others need messages it does not implement.
FRONTEND_PROTOCOL_FEATURES = (
    (1 << VhostUserProtocolFeature.MQ)
    | (1 << VhostUserProtocolFeature.REPLY_ACK)
    | (1 << VhostUserProtocolFeature.CONFIG)
)
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8
# Without CONFIGURE_MEM_SLOTS a memory table holds at most this many regions.
VHOST_USER_MAX_REGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256

HEADER = struct.Struct("<III")  # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, descriptor, used, available, log (frontend addresses)
MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest address, size, frontend address, mmap offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
# The largest answer pyvmm reads: a config space; anything longer is a broken backend.
MAX_REPLY_PAYLOAD = CONFIG_HEADER.size + VHOST_USER_MAX_CONFIG_SIZE
REPLY_TIMEOUT = 10.0  # seconds a backend may take to answer one message

# Requests the backend always answers.
_ANSWERED = frozenset({
    VhostUserRequest.VHOST_USER_GET_FEATURES,
    VhostUserRequest.VHOST_USER_GET_PROTOCOL_FEATURES,
    VhostUserRequest.VHOST_USER_GET_VRING_BASE,
    VhostUserRequest.VHOST_USER_GET_QUEUE_NUM,
    VhostUserRequest.VHOST_USER_GET_CONFIG,
})  # fmt: skip


class VhostUserError(VhostError):
    """The vhost-user backend cannot be reached, refused a request or broke the protocol (exit status 1)."""


def encode(request: VhostUserRequest, payload: bytes = b"", need_reply: bool = False) -> bytes:
    """One message: header (version 1, NEED_REPLY when asked) and payload."""
    flags = VhostUserFlag.VERSION | (VhostUserFlag.NEED_REPLY if need_reply else 0)
    return HEADER.pack(int(request), int(flags), len(payload)) + payload


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a received header."""
    request, flags, size = HEADER.unpack(data)
    return request, flags, size


def vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def vring_file(index: int, has_fd: bool = True) -> bytes:
    """The u64 of SET_VRING_KICK/CALL: the ring index, and the no-fd bit when no descriptor comes along."""
    return U64.pack((index & VHOST_USER_VRING_IDX_MASK) | (0 if has_fd else VHOST_USER_VRING_NOFD_MASK))


def memory_table_payload(regions: Sequence[MemoryTableRegion]) -> bytes:
    """SET_MEM_TABLE's payload; the regions' memfds go with it, in the same order."""
    body = MEMORY_HEADER.pack(len(regions), 0)
    for r in regions:
        body += MEMORY_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.fd_offset)
    return body


def config_request(offset: int, size: int) -> bytes:
    """GET_CONFIG's payload: where and how much, and room for the answer."""
    return CONFIG_HEADER.pack(offset, size, 0) + bytes(size)


class VhostUserFrontend:
    """pyvmm's end of one vhost-user connection (a backend that listens: pyvmm connects, as cloud-hypervisor
    does by default). Not thread-safe: the device that owns it calls it from one thread at a time."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self.protocol_features = 0  # negotiated

    @classmethod
    def connect(cls, path: str, timeout: float = REPLY_TIMEOUT) -> Self:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            hint = " (is the vhost-user backend, e.g. qemu-storage-daemon or virtiofsd, serving it?)"
            raise VhostUserError(f"cannot connect to {path}: {exc.strerror or exc}{hint}") from None
        return cls(sock, path)

    def fileno(self) -> int:
        return self.sock.fileno()

    # ---- framing ------------------------------------------------------------------------------------------

    def _send(self, request: VhostUserRequest, payload: bytes = b"", fds: Sequence[int] = (),
              need_reply: bool = False) -> None:
        message = encode(request, payload, need_reply)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = self.sock.sendmsg([message], ancillary, socket.MSG_NOSIGNAL)
            if sent != len(message):  # the fds went with the first part: send the rest plainly
                self.sock.sendall(message[sent:], socket.MSG_NOSIGNAL)
        except OSError as exc:
            raise self._lost(request, exc) from None

    def _receive_exactly(self, request: VhostUserRequest, size: int) -> bytes:
        data = b""
        while len(data) < size:
            try:
                chunk, _anc, _flags, _addr = self.sock.recvmsg(size - len(data))
            except OSError as exc:
                raise self._lost(request, exc) from None
            if not chunk:
                raise VhostUserError(f"{self.path}: the backend closed the connection "
                                     f"(waiting for the answer to {request.name})")
            data += chunk
        return data

    def _reply(self, request: VhostUserRequest) -> bytes:
        """The answer to `request`: its header checked (same request, reply bit, version 1), its payload
        bounded."""
        got, flags, size = decode_header(self._receive_exactly(request, HEADER.size))
        if got != request or not flags & VhostUserFlag.REPLY or flags & VHOST_USER_VERSION_MASK != 1:
            raise VhostUserError(f"{self.path}: expected the answer to {request.name}, got request {got} "
                                 f"flags {flags:#x}")
        if size > MAX_REPLY_PAYLOAD:
            raise VhostUserError(f"{self.path}: answer to {request.name} is {size} bytes, too long")
        return self._receive_exactly(request, size) if size else b""

    def _lost(self, request: VhostUserRequest, exc: OSError) -> VhostUserError:
        if isinstance(exc, TimeoutError):
            return VhostUserError(f"{self.path}: no answer to {request.name} within {REPLY_TIMEOUT:g} s")
        return VhostUserError(f"{self.path}: {request.name}: {exc.strerror or exc}")

    def _call(self, request: VhostUserRequest, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send; read the answer if the request has one. A request without one asks for an ack when
        REPLY_ACK was negotiated, so a refusal is seen at once instead of at the guest's first I/O."""
        ack = request not in _ANSWERED and bool(
            self.protocol_features & (1 << VhostUserProtocolFeature.REPLY_ACK))
        self._send(request, payload, fds, need_reply=ack)
        if request in _ANSWERED:
            return self._reply(request)
        if ack:
            answer = self._reply(request)
            if len(answer) != U64.size:
                raise VhostUserError(f"{self.path}: {request.name}: an ack of {len(answer)} bytes")
            status = U64.unpack(answer)[0]
            if status != 0:
                raise VhostUserError(f"{self.path}: the backend refused {request.name} ({status})")
        return b""

    def _u64(self, request: VhostUserRequest, payload: bytes = b"") -> int:
        answer = self._call(request, payload)
        if len(answer) != U64.size:
            raise VhostUserError(f"{self.path}: {request.name}: an answer of {len(answer)} bytes")
        return int(U64.unpack(answer)[0])

    # ---- requests -----------------------------------------------------------------------------------------

    def set_owner(self) -> None:
        self._call(VhostUserRequest.VHOST_USER_SET_OWNER)

    def get_features(self) -> int:
        return self._u64(VhostUserRequest.VHOST_USER_GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._call(VhostUserRequest.VHOST_USER_SET_FEATURES, U64.pack(features))

    def get_protocol_features(self) -> int:
        return self._u64(VhostUserRequest.VHOST_USER_GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self._call(VhostUserRequest.VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(features))
        self.protocol_features = features  # REPLY_ACK applies from the next message on

    def get_queue_num(self) -> int:
        return self._u64(VhostUserRequest.VHOST_USER_GET_QUEUE_NUM)

    def get_config(self, size: int, offset: int = 0) -> bytes:
        """`size` bytes of the device's configuration space from `offset` (needs the CONFIG feature)."""
        if not 0 < size <= VHOST_USER_MAX_CONFIG_SIZE:
            raise ValueError(f"config size {size}")
        answer = self._call(VhostUserRequest.VHOST_USER_GET_CONFIG, config_request(offset, size))
        # A backend that fails the request answers with an empty or short payload.
        if len(answer) != CONFIG_HEADER.size + size:
            raise VhostUserError(f"{self.path}: the backend did not give its configuration space "
                                 f"({len(answer)} bytes for {size})")
        return answer[CONFIG_HEADER.size:]

    def set_mem_table(self, regions: Sequence[MemoryTableRegion]) -> None:
        if not 0 < len(regions) <= VHOST_USER_MAX_REGIONS:
            raise VhostUserError(f"{self.path}: {len(regions)} RAM regions (vhost-user takes 1 to "
                                 f"{VHOST_USER_MAX_REGIONS})")
        fds = []
        for r in regions:
            if r.fd is None:
                raise VhostUserError("guest RAM is not shared memory: use --memory shared=on")
            fds.append(r.fd)
        self._call(VhostUserRequest.VHOST_USER_SET_MEM_TABLE, memory_table_payload(regions), fds)

    def set_vring(self, spec: VringSpec, memory: GuestMemory) -> None:
        """NUM, BASE, ADDR, KICK and CALL for one ring; its addresses are pyvmm's mappings (what the memory
        table's frontend addresses translate), checked to lie inside guest RAM first."""
        desc, avail, used = spec.host_addresses(memory)
        self._call(VhostUserRequest.VHOST_USER_SET_VRING_NUM, vring_state(spec.index, spec.size))
        self._call(VhostUserRequest.VHOST_USER_SET_VRING_BASE, vring_state(spec.index, spec.base))
        self._call(VhostUserRequest.VHOST_USER_SET_VRING_ADDR,
                   VRING_ADDR.pack(spec.index, 0, desc, used, avail, 0))
        self._call(VhostUserRequest.VHOST_USER_SET_VRING_KICK, vring_file(spec.index), [spec.kick_fd])
        self._call(VhostUserRequest.VHOST_USER_SET_VRING_CALL, vring_file(spec.index), [spec.call_fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._call(VhostUserRequest.VHOST_USER_SET_VRING_ENABLE, vring_state(index, int(enable)))

    def get_vring_base(self, index: int) -> int:
        """Stops the ring; the next available index the backend would have served."""
        answer = self._call(VhostUserRequest.VHOST_USER_GET_VRING_BASE, vring_state(index, 0))
        if len(answer) != VRING_STATE.size:
            raise VhostUserError(f"{self.path}: GET_VRING_BASE: an answer of {len(answer)} bytes")
        return int(VRING_STATE.unpack(answer)[1])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
