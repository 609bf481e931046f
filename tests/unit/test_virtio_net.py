"""`--net`: the option parser, and the virtio-net device's configuration space, feature negotiation,
hand-over to vhost-net, control queue and reset, driven through the PCI transport with recording fakes
of the tap and vhost-net (the real ones are in tests/lab/test_net.py)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from test_virtio_driver import BAR_ADDRESS, Driver, FakeVectors, wait_used

from pyvmm.config import ConfigError, NetConfig, parse_net, parse_vm_config
from pyvmm.devices.virtio.net import (
    NetFeature,
    NetParams,
    VirtioNet,
    net_config,
    offered_features,
    tap_offload_for,
)
from pyvmm.devices.virtio.pci import VirtioPciDevice, vector_count
from pyvmm.devices.virtio.spec import Feature, bit
from pyvmm.memory import GuestMemory
from pyvmm.options import OptionError
from pyvmm.vhost.backend import MemoryTableRegion, VhostError, VringSpec

MiB = 1 << 20
MAC = bytes.fromhex("52540012ab34")
VHOST_FEATURES = (bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX) | bit(Feature.VERSION_1)
                  | bit(NetFeature.MRG_RXBUF) | bit(27) | bit(26) | bit(24) | bit(30))
ALL_TUN = 0x1F


# ---- the option -----------------------------------------------------------------------------------------

def test_parse_net_keys() -> None:
    net = parse_net("tap=pyvmmtap0,ip=192.168.249.1,mask=255.255.255.0,mac=12:34:56:78:9a:bc,"
                    "host_mac=02:00:00:00:00:01,mtu=9000,num_queues=4,queue_size=1024,id=nic0,pci_segment=0,"
                    "offload_ufo=off")
    assert net == NetConfig(tap="pyvmmtap0", ip=ipaddress.IPv4Address("192.168.249.1"),
                            mask=ipaddress.IPv4Address("255.255.255.0"), mac=bytes.fromhex("123456789abc"),
                            host_mac=bytes.fromhex("020000000001"), mtu=9000, num_queues=4, queue_size=1024,
                            id="nic0", offload_ufo=False)
    assert net.queue_pairs == 2


def test_parse_net_defaults_are_chs() -> None:
    net = parse_net("tap=t0")
    assert (net.num_queues, net.queue_size, net.ip, net.mask, net.mtu) == (2, 256, None, None, None)
    assert net.offload_tso and net.offload_csum and net.offload_ufo
    # a random locally administered unicast MAC, a new one each time
    assert len(net.mac) == 6 and net.mac[0] & 0b11 == 0b10
    assert parse_net("").mac != parse_net("").mac and parse_net("").tap is None


@pytest.mark.parametrize("text, message", [
    ("tap=t0,fd=[3,4]", "fd= and tap=t0 both name the tap"),
    ("tap=t0,vhost_user=on,socket=/tmp/s", "vhost_user=on is not supported"),
    ("tap=t0,bw_size=1000", "rate limiting"),
    ("tap=t0,ops_refill_time=10", "rate limiting"),
    ("tap=t0,iommu=on", "iommu=on is not supported"),
    ("tap=t0,num_queues=3", "even number"),
    ("tap=t0,num_queues=0", "even number"),
    ("tap=t0,queue_size=100", "power of 2"),
    ("tap=t0,mtu=67", "out of range"),
    ("tap=t0,mtu=65536", "out of range"),
    ("tap=t0,mac=01:00:5e:00:00:01", "multicast"),
    ("tap=t0,mac=12:34:56:78:9a", "not a MAC"),
    ("tap=t0,host_mac=zz:34:56:78:9a:bc", "not a MAC"),
    ("tap=t0,ip=192.168.249", "not an IPv4 address"),
    ("tap=t0,mask=255.0.255.0", "not a netmask"),
    ("tap=a-name-that-is-too-long", "not an interface name"),
    ("tap=a/b", "not an interface name"),
    ("tap=t0,colour=blue", "Unknown option"),
])
def test_parse_net_refuses(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_net(text)


def test_vm_config_net_checks() -> None:
    base = ["--kernel", "k"]
    config = parse_vm_config([*base, "--net", "tap=t0", "tap=t1,num_queues=2"])
    assert [n.tap for n in config.nets] == ["t0", "t1"]
    with pytest.raises(ConfigError, match="more than the 1 boot vCPUs"):
        parse_vm_config([*base, "--net", "tap=t0,num_queues=4"])
    two = parse_vm_config([*base, "--cpus", "boot=2", "--net", "tap=t0,num_queues=4"])
    assert two.nets[0].queue_pairs == 2
    with pytest.raises(ConfigError, match="given to two --net"):
        parse_vm_config([*base, "--net", "tap=t0", "tap=t0"])
    with pytest.raises(ConfigError, match="not unique"):
        parse_vm_config([*base, "--net", "tap=t0,id=x", "--disk", "path=d,id=x"])
    with pytest.raises(ConfigError, match=r"^--net tap=t0,fd=\[3\]: fd= and tap=t0 both name the tap"):
        parse_vm_config([*base, "--net", "tap=t0,fd=[3]"])


# ---- configuration and features ------------------------------------------------------------------------

def test_config_space_layout() -> None:
    assert net_config(MAC, True, 2, 9000) == MAC + struct.pack("<HHH", 1, 2, 9000)
    assert net_config(MAC, False, 1, None) == MAC + struct.pack("<HHH", 0, 1, 0)


def test_offered_features_follow_tap_vhost_and_options() -> None:
    full = offered_features(NetParams(MAC, 2, mtu=1400), VHOST_FEATURES, ALL_TUN)
    for feature in NetFeature:
        assert full & bit(feature), feature.name
    # one pair: no MQ; no mtu=: no MTU; vhost without mergeable buffers: none offered
    plain = offered_features(NetParams(MAC), VHOST_FEATURES & ~bit(NetFeature.MRG_RXBUF), ALL_TUN)
    assert not plain & (bit(NetFeature.MQ) | bit(NetFeature.MTU) | bit(NetFeature.MRG_RXBUF))
    # a tap that takes no receive offloads: no GUEST_* at all, transmit offloads still there
    no_rx = offered_features(NetParams(MAC), VHOST_FEATURES, 0)
    guest = [NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN,
             NetFeature.GUEST_UFO, NetFeature.HOST_UFO]
    assert not any(no_rx & bit(f) for f in guest)
    assert no_rx & bit(NetFeature.HOST_TSO4) and no_rx & bit(NetFeature.CSUM)
    # offload_csum=off takes every offload with it (TSO depends on it); offload_tso=off keeps checksums
    no_csum = offered_features(NetParams(MAC, offload_csum=False), VHOST_FEATURES, ALL_TUN)
    assert not no_csum & ~(bit(NetFeature.MAC) | bit(NetFeature.STATUS) | bit(NetFeature.CTRL_VQ)
                           | bit(NetFeature.MRG_RXBUF))
    no_tso = offered_features(NetParams(MAC, offload_tso=False), VHOST_FEATURES, ALL_TUN)
    assert no_tso & bit(NetFeature.GUEST_CSUM) and not no_tso & bit(NetFeature.GUEST_TSO4)
    assert not no_tso & (bit(NetFeature.GUEST_ECN) | bit(NetFeature.HOST_TSO6))


def test_tap_offload_matches_the_receive_offloads_accepted() -> None:
    acked = bit(NetFeature.GUEST_CSUM) | bit(NetFeature.GUEST_TSO4) | bit(NetFeature.HOST_TSO6)
    assert tap_offload_for(acked) == 0x01 | 0x02
    assert tap_offload_for(0) == 0


# ---- the device behind the transport --------------------------------------------------------------------

class FakeTap:
    name = "t0"

    def __init__(self, pairs: int) -> None:
        self.fds = [100 + i for i in range(pairs)]
        self.offloads: list[int] = []
        self.enabled = [True] * pairs
        self.closed = False

    def set_offload(self, offload: int, check: bool = True) -> bool:
        self.offloads.append(offload)
        return True

    def set_queue_enabled(self, pair: int, enabled: bool) -> None:
        self.enabled[pair] = enabled

    def close(self) -> None:
        self.closed = True


class FakeVhost:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def get_features(self) -> int:
        return VHOST_FEATURES

    def set_features(self, features: int) -> None:
        self.calls.append(("features", features))

    def set_mem_table(self, regions: list[MemoryTableRegion]) -> None:
        self.calls.append(("mem", [(r.guest_phys_addr, r.memory_size) for r in regions]))

    def set_vring(self, spec: VringSpec, memory: GuestMemory) -> None:
        spec.host_addresses(memory)  # the real one checks the rings too
        self.calls.append(("vring", spec))

    def set_backend(self, index: int, fd: int) -> None:
        self.calls.append(("backend", index, fd))

    def stop_backend(self, index: int) -> None:
        self.calls.append(("backend", index, -1))

    def get_vring_base(self, index: int) -> int:
        self.calls.append(("base", index))
        return 0

    def unbind_vring_fds(self, index: int) -> None:
        self.calls.append(("unbind", index))

    def close(self) -> None:
        self.calls.append(("close",))


class EventfdVectors(FakeVectors):
    def eventfd(self, vector: int) -> int:
        return 1000 + vector


def _device(pairs: int) -> tuple[VirtioPciDevice, Driver, FakeTap, list[FakeVhost], GuestMemory]:
    memory = GuestMemory([(0, 4 * MiB)])
    tap = FakeTap(pairs)
    vhosts = [FakeVhost() for _ in range(pairs)]
    device = VirtioNet(NetParams(MAC, pairs, 256, 1500), tap, vhosts, ALL_TUN)
    dev = VirtioPciDevice(device, memory, EventfdVectors(vector_count(device)), bar64=True)
    dev.assign_bar(0, BAR_ADDRESS)
    return dev, Driver(dev, memory), tap, vhosts, memory


def test_driver_ok_hands_every_pair_to_vhost_net() -> None:
    dev, driver, tap, vhosts, memory = _device(2)
    try:
        assert dev.config_read(0x0A, 2) == 0x02 << 8  # class: network controller, Ethernet
        assert bytes(driver.device_cfg(i, 1) for i in range(6)) == MAC
        assert driver.device_cfg(6, 2) == 1  # link up
        assert (driver.device_cfg(8, 2), driver.device_cfg(10, 2)) == (2, 1500)  # pairs, mtu
        want = (bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX) | bit(NetFeature.MRG_RXBUF)
                | bit(NetFeature.MQ) | bit(NetFeature.CTRL_VQ) | bit(NetFeature.GUEST_CSUM)
                | bit(NetFeature.GUEST_TSO4) | bit(NetFeature.CSUM) | bit(NetFeature.MAC))
        acked = driver.init(want)
        assert acked == want
        assert dev.status & 4  # DRIVER_OK
        for pair, vhost in enumerate(vhosts):
            # only what vhost-net knows goes to it: no MAC, MQ, CSUM, ... bits
            assert vhost.calls[0] == ("features", acked & VHOST_FEATURES)
            assert vhost.calls[1] == ("mem", [(0, 4 * MiB)])
            rx, tx = vhost.calls[2][1], vhost.calls[4][1]
            for vring, spec, queue in ((0, rx, 2 * pair), (1, tx, 2 * pair + 1)):
                ring = driver.rings[queue]
                assert (spec.index, spec.size, spec.desc_addr, spec.avail_addr, spec.used_addr) == (
                    vring, 256, ring.desc, ring.avail, ring.used)
                assert spec.kick_fd == dev.queue_eventfds[queue]  # KVM's ioeventfd -> vhost, no Python
                assert spec.call_fd == 1000 + queue + 1  # the queue's MSI-X vector's irqfd eventfd
            assert vhost.calls[3] == ("backend", 0, tap.fds[pair])
            assert vhost.calls[5] == ("backend", 1, tap.fds[pair])
        assert tap.offloads[-1] == 0x01 | 0x02  # GUEST_CSUM, GUEST_TSO4
        assert tap.enabled == [True, False]  # one pair until the driver asks for more
    finally:
        dev.close()
        memory.close()
    assert tap.closed and all(("close",) in v.calls for v in vhosts)


def _ctrl(driver: Driver, memory: GuestMemory, queue: int, request: bytes) -> int:
    ring = driver.rings[queue]
    memory.write(0x300000, request)
    memory.write(0x301000, b"\xff")
    ring.publish(ring.add([(0x300000, len(request), False), (0x301000, 1, True)]))
    driver.notify(queue)
    assert wait_used(ring, 1) == [(ring.next_free - 2, 1)]
    return memory.read(0x301000, 1)[0]


def test_control_queue_sets_the_active_pairs() -> None:
    dev, driver, tap, _, memory = _device(2)
    try:
        driver.init()
        assert tap.enabled == [True, False]
        assert _ctrl(driver, memory, 4, bytes([4, 0]) + (2).to_bytes(2, "little")) == 0  # VQ_PAIRS_SET 2
        assert tap.enabled == [True, True]
        assert _ctrl(driver, memory, 4, bytes([4, 0]) + (1).to_bytes(2, "little")) == 0
        assert tap.enabled == [True, False]
        assert _ctrl(driver, memory, 4, bytes([4, 0]) + (3).to_bytes(2, "little")) == 1  # more than there are
        assert _ctrl(driver, memory, 4, bytes([4, 0]) + (0).to_bytes(2, "little")) == 1
        assert _ctrl(driver, memory, 4, bytes([0, 0, 1])) == 1  # CTRL_RX: not offered
        assert _ctrl(driver, memory, 4, bytes([4])) == 1  # truncated
        assert tap.enabled == [True, False]
    finally:
        dev.close()
        memory.close()


def test_reset_stops_the_vrings_and_a_reprobe_starts_them_again() -> None:
    dev, driver, tap, vhosts, memory = _device(1)
    try:
        driver.init()
        vhost = vhosts[0]
        vhost.calls.clear()
        driver.common_write(0x14, 1, 0)  # reset
        assert dev.status == 0
        for vring in (0, 1):
            stop = vhost.calls.index(("backend", vring, -1))
            assert vhost.calls.index(("base", vring)) > stop
            assert ("unbind", vring) in vhost.calls
        assert tap.offloads[-1] == 0
        vhost.calls.clear()
        driver.init(ring_base=0x20000)  # the driver probes again with new rings
        specs = [c[1] for c in vhost.calls if c[0] == "vring"]
        assert [s.desc_addr for s in specs] == [driver.rings[0].desc, driver.rings[1].desc]
        assert ("backend", 0, tap.fds[0]) in vhost.calls and ("backend", 1, tap.fds[0]) in vhost.calls
    finally:
        dev.close()
        memory.close()


class RefusingVhost(FakeVhost):
    def set_backend(self, index: int, fd: int) -> None:
        raise VhostError("/dev/vhost-net: vring 0: VHOST_NET_SET_BACKEND failed: Bad file descriptor")


def test_a_backend_that_refuses_leaves_the_device_needing_reset() -> None:
    memory = GuestMemory([(0, 4 * MiB)])
    vhost = RefusingVhost()
    dev = VirtioPciDevice(VirtioNet(NetParams(MAC), FakeTap(1), [vhost], ALL_TUN), memory, EventfdVectors(4),
                          bar64=True)
    dev.assign_bar(0, BAR_ADDRESS)
    try:
        Driver(dev, memory).init()
        assert dev.status & 0x40  # DEVICE_NEEDS_RESET, and the driver was told (config vector)
        assert dev.vectors.triggers[0] == 1  # type: ignore[attr-defined]
    finally:
        dev.close()
        memory.close()


def test_a_data_queue_kick_never_reaches_python() -> None:
    dev, driver, _, _, memory = _device(1)
    try:
        driver.init()
        ring = driver.rings[1]
        ring.publish(ring.add([(0x300000, 64, False)]))
        driver.notify(1)  # a trapped notify write: signals the eventfd vhost-net would poll
        assert ring.take_used() == []  # nothing in Python consumed it
        assert dev._worker is not None
        assert ring.used_idx == 0
    finally:
        dev.close()
        memory.close()


def test_control_request_with_readable_ack_is_ignored() -> None:
    dev, driver, _, _, memory = _device(1)
    try:
        driver.init()
        ring = driver.rings[2]
        ring.publish(ring.add([(0x300000, 4, False)]))  # no writable ack byte
        driver.notify(2)
        assert wait_used(ring, 1)[0][1] == 0
    finally:
        dev.close()
        memory.close()
