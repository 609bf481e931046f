"""virtio-vsock (virtio 1.x §5.10): `--vsock cid=N,socket=PATH`, cloud-hypervisor's hybrid vsock.

Three queues: rx (0, packets to the guest, filled when the muxer has some), tx (1, the guest's packets),
event (2, transport events: pyvmm never sends one, so its buffers stay posted). The configuration is the
guest's CID. No feature bits: stream sockets only (no SEQPACKET). The muxer (vsock_muxer.py) holds the
connections; docs/vsock.md describes the protocol.
"""

from __future__ import annotations

import logging
import struct

from pyvmm.devices.virtio.device import RateLimitedWarnings, VirtioDevice
from pyvmm.devices.virtio.queue import DescriptorChain, Virtqueue, gather, split_views
from pyvmm.devices.virtio.spec import VirtioDeviceType
from pyvmm.devices.virtio.vsock_muxer import VsockMuxer, listen_unix
from pyvmm.devices.virtio.vsock_proto import HEADER_SIZE, Header

log = logging.getLogger(__name__)

RXQ, TXQ, EVENTQ = 0, 1, 2
QUEUE_SIZE = 256
VSOCK_CONFIG = struct.Struct("<Q")  # struct virtio_vsock_config: guest_cid


class VirtioVsock(VirtioDevice):
    """Owns the muxer (and through it the listening socket at PATH)."""

    device_type = VirtioDeviceType.VSOCK
    name = "vsock"
    pci_class = (0xFF, 0x00)
    filled_queues = frozenset({RXQ, EVENTQ})

    def __init__(self, guest_cid: int, muxer: VsockMuxer, queue_size: int = QUEUE_SIZE) -> None:
        super().__init__([queue_size, queue_size, queue_size])
        self.guest_cid = guest_cid
        self.muxer = muxer
        self._warn = RateLimitedWarnings(log, name="virtio-vsock")

    @classmethod
    def open(cls, guest_cid: int, path: str, *, start: bool = True) -> VirtioVsock:
        """Listen at `path` (VsockSocketError, one line, when it cannot) and start the muxer's thread
        (start=False: the caller starts `muxer` later; the builder makes it a service that starts beside
        the vCPUs, once the seccomp filters are on: docs/seccomp.md#threads-and-their-lists)."""
        listener = listen_unix(path)
        device: VirtioVsock | None = None

        def kick_rx() -> None:
            if device is not None:
                device.kick(RXQ)

        try:
            muxer = VsockMuxer(guest_cid, listener, path, kick_rx)
        except BaseException:
            listener.close()
            raise
        device = cls(guest_cid, muxer)
        if start:
            muxer.start()
        return device

    @property
    def features(self) -> int:
        return 0

    def config_bytes(self) -> bytes:
        return VSOCK_CONFIG.pack(self.guest_cid)

    def reset(self) -> None:
        super().reset()
        self.muxer.reset()

    def fill_queue(self, queue: Virtqueue) -> None:
        if queue.index != RXQ:
            return  # the event queue: no transport events to report
        while True:
            pending = self.muxer.fill(queue)
            if not queue.enable_notifications() or not pending:
                return

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        if queue_index != TXQ:
            return 0
        if chain.error is not None or chain.writable:
            self._warn.warning("virtio-vsock: transmit chain %d dropped: %s", chain.head,
                               chain.error or "has device-writable buffers")
            return 0
        head, payload = split_views(chain.readable, HEADER_SIZE)
        raw = gather(head)
        if len(raw) < HEADER_SIZE:
            self._warn.warning("virtio-vsock: transmit chain %d is shorter than a header", chain.head)
            return 0
        self.muxer.guest_packet(Header.unpack(raw), payload)
        return 0

    def close(self) -> None:
        self.muxer.close()


class MuxerService:
    """The muxer's thread as a VM service (pyvmm.machine.Service): started beside the vCPUs, once the
    seccomp filters are on, so that it takes its own (docs/seccomp.md#threads-and-their-lists). The
    device's close stops it, with the transport."""

    def __init__(self, muxer: VsockMuxer) -> None:
        self.muxer = muxer

    def start(self) -> None:
        self.muxer.start()

    def close(self) -> None:
        pass  # the transport's close (VirtioVsock.close) stops the thread and closes the sockets
