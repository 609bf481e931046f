"""virtio-net (`--net`) with its data path in the kernel: every receive/transmit queue pair is served by a
/dev/vhost-net instance on one queue of a tap; Python configures it and never sees a packet. Only the
control queue (multiqueue on/off) is served in Python: it is the control path (docs/net.md).

Queues: receiveq1, transmitq1, ..., receiveqN, transmitqN, controlq (virtio 1.x §5.1.2).
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.queue import DescriptorChain, gather, split_views
from pyvmm.devices.virtio.spec import TRANSPORT_FEATURES, VirtioDeviceType, bit
from pyvmm.errors import PyvmmError
from pyvmm.host.tap import TunOffload
from pyvmm.memory import GuestMemory
from pyvmm.vhost.backend import MemoryTableRegion, VringSpec, memory_table
from pyvmm.vhost.net import VhostNetVring

log = logging.getLogger(__name__)

CTRL_QUEUE_SIZE = 64
ETH_ALEN = 6
CONFIG_SIZE = 12  # mac, status, max_virtqueue_pairs, mtu
VIRTIO_NET_S_LINK_UP = 1
MIN_MTU = 68
MAX_MTU = 65535


class NetFeature(IntEnum):
    """Feature bit numbers of linux/virtio_net.h."""

    CSUM = 0
    GUEST_CSUM = 1
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    MQ = 22


class CtrlClass(IntEnum):
    VIRTIO_NET_CTRL_MQ = 4


class CtrlMqCmd(IntEnum):
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0


VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

# What the tap accepts from the guest (IFF_VNET_HDR: checksum and segmentation offloads on transmit).
_HOST_CSUM = bit(NetFeature.CSUM)
_HOST_TSO = bit(NetFeature.HOST_TSO4) | bit(NetFeature.HOST_TSO6) | bit(NetFeature.HOST_ECN)


# Guest (receive) offload feature -> the tap offload that lets the tap hand such packets over.
GUEST_OFFLOADS = {
    NetFeature.GUEST_CSUM: TunOffload.TUN_F_CSUM,
    NetFeature.GUEST_TSO4: TunOffload.TUN_F_TSO4,
    NetFeature.GUEST_TSO6: TunOffload.TUN_F_TSO6,
    NetFeature.GUEST_ECN: TunOffload.TUN_F_TSO_ECN,
    NetFeature.GUEST_UFO: TunOffload.TUN_F_UFO,
}


class TapQueues(Protocol):
    """The tap side (host/tap.Tap): one file per queue pair."""

    name: str
    fds: list[int]

    def set_offload(self, offload: int, check: bool = True) -> bool: ...

    def set_queue_enabled(self, pair: int, enabled: bool) -> None: ...

    def close(self) -> None: ...


class VhostPair(Protocol):
    """One vhost-net instance (vhost/net.VhostNet)."""

    def get_features(self) -> int: ...

    def set_features(self, features: int) -> None: ...

    def set_mem_table(self, regions: list[MemoryTableRegion]) -> None: ...

    def set_vring(self, spec: VringSpec, memory: GuestMemory) -> None: ...

    def set_backend(self, index: int, fd: int) -> None: ...

    def stop_backend(self, index: int) -> None: ...

    def get_vring_base(self, index: int) -> int: ...

    def unbind_vring_fds(self, index: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class NetParams:
    mac: bytes
    queue_pairs: int = 1
    queue_size: int = 256
    mtu: int | None = None
    offload_csum: bool = True
    offload_tso: bool = True
    offload_ufo: bool = True


def offered_features(params: NetParams, vhost_features: int, tap_offloads: int) -> int:
    """The device-specific bits offered: what the tap and vhost-net can do, as far as `params` allow.
    Dependencies (virtio 1.x §5.1.3.1) are kept: TSO needs CSUM on the same side, ECN needs TSO."""
    features = bit(NetFeature.MAC) | bit(NetFeature.STATUS) | bit(NetFeature.CTRL_VQ)
    if params.queue_pairs > 1:
        features |= bit(NetFeature.MQ)
    if params.mtu is not None:
        features |= bit(NetFeature.MTU)
    if vhost_features & bit(NetFeature.MRG_RXBUF):
        features |= bit(NetFeature.MRG_RXBUF)
    if params.offload_csum:
        features |= _HOST_CSUM
        if params.offload_tso:
            features |= _HOST_TSO
        if params.offload_ufo and tap_offloads & TunOffload.TUN_F_UFO:
            features |= bit(NetFeature.HOST_UFO)
        if tap_offloads & TunOffload.TUN_F_CSUM:
            features |= bit(NetFeature.GUEST_CSUM)
            for feature in (NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN):
                if params.offload_tso and tap_offloads & GUEST_OFFLOADS[feature]:
                    features |= bit(feature)
            if params.offload_ufo and tap_offloads & TunOffload.TUN_F_UFO:
                features |= bit(NetFeature.GUEST_UFO)
    if not features & (bit(NetFeature.GUEST_TSO4) | bit(NetFeature.GUEST_TSO6)):
        features &= ~bit(NetFeature.GUEST_ECN)
    return features


def tap_offload_for(acked: int) -> int:
    """The TUNSETOFFLOAD bits matching the receive offloads the driver accepted."""
    offload = 0
    for feature, tun_bit in GUEST_OFFLOADS.items():
        if acked & bit(feature):
            offload |= tun_bit
    return offload


def net_config(mac: bytes, link_up: bool, max_pairs: int, mtu: int | None) -> bytes:
    """struct virtio_net_config up to mtu: mac, status, max_virtqueue_pairs, mtu (little endian)."""
    status = VIRTIO_NET_S_LINK_UP if link_up else 0
    return mac + struct.pack("<HHH", status, max_pairs, mtu or 0)


class VirtioNet(VirtioDevice):
    """A virtio-net device on `tap` (one file per queue pair) and one vhost-net instance per pair."""

    device_type = VirtioDeviceType.NET
    name = "net"
    pci_class = (0x02, 0x00)  # network controller, Ethernet

    def __init__(self, params: NetParams, tap: TapQueues, vhosts: Sequence[VhostPair], tap_offloads: int
                 ) -> None:
        if len(params.mac) != ETH_ALEN:
            raise ValueError("a MAC address has 6 bytes")
        if not params.queue_pairs == len(tap.fds) == len(vhosts):
            raise ValueError("one tap queue and one vhost-net per queue pair")
        pairs = params.queue_pairs
        super().__init__([params.queue_size] * (2 * pairs) + [CTRL_QUEUE_SIZE])
        self.params = params
        self.tap = tap
        self.vhosts = list(vhosts)
        self.vhost_features = vhosts[0].get_features()
        self._features = offered_features(params, self.vhost_features, tap_offloads)
        self.external_queues = frozenset(range(2 * pairs))
        # The rings vhost-net serves are Python-free only if it implements what the driver may ask for.
        self.transport_features = TRANSPORT_FEATURES & self.vhost_features
        self.ctrl_queue = 2 * pairs
        self.active_pairs = 1
        self._started: list[tuple[int, int]] = []  # (pair, vring) handed to vhost-net

    @property
    def features(self) -> int:
        return self._features

    def config_bytes(self) -> bytes:
        return net_config(self.params.mac, True, self.params.queue_pairs, self.params.mtu)

    # ---- the data path: handed to vhost-net -------------------------------------------------------------

    def start_external(self, rings: Sequence[VringSpec]) -> None:
        """DRIVER_OK: per queue pair, features, the memory table, both vrings and the tap queue."""
        assert self.memory is not None
        self._stop_vhost()
        acked = self.acked_features
        self.tap.set_offload(tap_offload_for(acked))
        table = memory_table(self.memory)
        by_queue = {ring.index: ring for ring in rings}
        for pair, vhost in enumerate(self.vhosts):
            specs = [by_queue.get(2 * pair + vring) for vring in VhostNetVring]
            if any(spec is None for spec in specs):
                continue  # the driver did not enable this pair's queues: it will never use them
            vhost.set_features(acked & self.vhost_features)
            vhost.set_mem_table(table)
            for vring, spec in zip(VhostNetVring, specs, strict=True):
                assert spec is not None
                vhost.set_vring(VringSpec(int(vring), spec.size, spec.desc_addr, spec.avail_addr,
                                          spec.used_addr, spec.kick_fd, spec.call_fd), self.memory)
                vhost.set_backend(int(vring), self.tap.fds[pair])
                self._started.append((pair, int(vring)))
        self._set_active_pairs(1)  # virtio 1.x §5.1.6.5.5: one pair until the driver asks for more

    def _set_active_pairs(self, count: int) -> None:
        """The tap steers packets only to the queues of the first `count` pairs."""
        for pair in range(len(self.vhosts)):
            self.tap.set_queue_enabled(pair, pair < count)
        self.active_pairs = count

    def _stop_vhost(self) -> None:
        """Stop every vring handed over (backend unset, then its base read back, which also stops it)."""
        started, self._started = self._started, []
        for pair, vring in started:
            vhost = self.vhosts[pair]
            with contextlib.suppress(Exception):
                vhost.stop_backend(vring)
            try:
                base = vhost.get_vring_base(vring)
                log.debug("virtio-net: pair %d vring %d stopped at %d", pair, vring, base)
            except OSError as exc:
                log.debug("virtio-net: pair %d vring %d: %s", pair, vring, exc)
            vhost.unbind_vring_fds(vring)

    def reset(self) -> None:
        self._stop_vhost()
        with contextlib.suppress(Exception):
            self.tap.set_offload(0)
        super().reset()

    # ---- the control queue (Python: the control path) --------------------------------------------------

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        if queue_index != self.ctrl_queue:
            return 0  # never: the data queues are vhost-net's
        if chain.error is not None or not chain.writable:
            log.debug("virtio-net: control request %d: %s", chain.head, chain.error or "no ack buffer")
            return 0
        request = gather(chain.readable)[:64]
        ack, _ = split_views(chain.writable, 1)
        ack[0][0] = self._control(request)
        return 1

    def _control(self, request: bytes) -> int:
        if len(request) < 2:
            return VIRTIO_NET_ERR
        cls, cmd, data = request[0], request[1], request[2:]
        if (cls, cmd) == (CtrlClass.VIRTIO_NET_CTRL_MQ, CtrlMqCmd.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET):
            if len(data) < 2 or not self.acked_features & bit(NetFeature.MQ):
                return VIRTIO_NET_ERR
            pairs = int.from_bytes(data[:2], "little")
            if not 1 <= pairs <= self.params.queue_pairs:
                return VIRTIO_NET_ERR
            try:
                self._set_active_pairs(pairs)
            except (OSError, PyvmmError) as exc:
                log.warning("virtio-net: %s", exc)
                return VIRTIO_NET_ERR
            return VIRTIO_NET_OK
        log.debug("virtio-net: control class %d command %d not supported", cls, cmd)
        return VIRTIO_NET_ERR

    def close(self) -> None:
        self._stop_vhost()
        for vhost in self.vhosts:
            vhost.close()
        self.tap.close()
