"""vhost, tun and virtio-net layouts and numbers against the system's kernel headers (gcc-compiled probe),
and the vhost memory table and vring geometry built from guest RAM."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.devices.virtio import net
from pyvmm.host import tap
from pyvmm.memory import GuestMemory
from pyvmm.vhost import bindings as b
from pyvmm.vhost.backend import VhostError, VringSpec, memory_table

MiB = 1 << 20
STRUCTS = (b.vhost_vring_state, b.vhost_vring_file, b.vhost_vring_addr, b.vhost_memory_region, b.vhost_memory)
VALUES = {
    **{m.name: int(m) for m in b.VhostIoctl},
    **{m.name: int(m) for m in tap.TunIoctl},
    **{m.name: int(m) for m in tap.SockIoctl},
    **{m.name: int(m) for m in tap.IfReqFlag},
    **{m.name: int(m) for m in tap.TunOffload},
    **{f"VIRTIO_NET_F_{m.name}": int(m) for m in net.NetFeature},
    "VIRTIO_NET_CTRL_MQ": int(net.CtrlClass.VIRTIO_NET_CTRL_MQ),
    "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET": int(net.CtrlMqCmd.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET),
    "VIRTIO_NET_OK": net.VIRTIO_NET_OK,
    "VIRTIO_NET_ERR": net.VIRTIO_NET_ERR,
    "VIRTIO_NET_S_LINK_UP": net.VIRTIO_NET_S_LINK_UP,
    "VHOST_VIRTIO": b.VHOST_VIRTIO,
    "VHOST_FILE_UNBIND": b.VHOST_FILE_UNBIND,
    "VHOST_PAGE_SIZE": b.VHOST_PAGE_SIZE,
    "VHOST_F_LOG_ALL": b.VHOST_F_LOG_ALL,
    "VHOST_NET_F_VIRTIO_NET_HDR": b.VHOST_NET_F_VIRTIO_NET_HDR,
    "IFNAMSIZ": tap.IFNAMSIZ,
    "ARPHRD_ETHER": tap.ARPHRD_ETHER,
}


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <sys/ioctl.h>", "#include <net/if.h>",
             "#include <net/if_arp.h>", "#include <linux/if_tun.h>", "#include <linux/sockios.h>",
             "#include <linux/vhost.h>", "#include <linux/virtio_net.h>", "int main(void) {"]
    for struct in STRUCTS:
        name = struct.__name__
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        for field, *_ in struct._fields_:
            lines.append(f'printf("offsetof {name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    lines.append('printf("offsetof vhost_memory.regions %zu\\n", offsetof(struct vhost_memory, regions));')
    lines.append('printf("sizeof ifreq %zu\\n", sizeof(struct ifreq));')
    lines.append('printf("sizeof virtio_net_hdr_mrg_rxbuf %zu\\n", sizeof(struct virtio_net_hdr_mrg_rxbuf));')
    for field in ("mac", "status", "max_virtqueue_pairs", "mtu", "speed"):
        lines.append(f'printf("offsetof virtio_net_config.{field} %zu\\n", '
                     f"offsetof(struct virtio_net_config, {field}));")
    for name in VALUES:
        lines.append(f'printf("value {name} %lld\\n", (long long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    tmp: Path = tmp_path_factory.mktemp("vhost_probe")
    (tmp / "probe.c").write_text(_c_program())
    subprocess.run(["gcc", "-o", str(tmp / "probe"), str(tmp / "probe.c")], check=True, capture_output=True)
    out = subprocess.run([str(tmp / "probe")], check=True, capture_output=True, text=True).stdout
    return {f"{kind} {key}": int(value) for kind, key, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("struct", STRUCTS, ids=lambda s: s.__name__)
def test_vhost_struct_layout_matches_header(probe: dict[str, int], struct: type[ctypes.Structure]) -> None:
    name = struct.__name__
    assert ctypes.sizeof(struct) == probe[f"sizeof {name}"]
    for field, *_ in struct._fields_:
        assert getattr(struct, field).offset == probe[f"offsetof {name}.{field}"], field


def test_memory_table_regions_follow_the_header(probe: dict[str, int]) -> None:
    table = b.vhost_memory_with(3)
    assert table.regions.offset == probe["offsetof vhost_memory.regions"]
    assert ctypes.sizeof(table) == probe["sizeof vhost_memory"] + 3 * probe["sizeof vhost_memory_region"]


def test_ifreq_and_net_layouts(probe: dict[str, int]) -> None:
    assert ctypes.sizeof(tap.ifreq) == probe["sizeof ifreq"]
    assert probe["sizeof virtio_net_hdr_mrg_rxbuf"] == tap.VNET_HDR_SIZE
    # mac, status, max_virtqueue_pairs, mtu: what net_config packs, and where the unoffered speed begins
    fields = ("mac", "status", "max_virtqueue_pairs", "mtu")
    offsets = [probe[f"offsetof virtio_net_config.{f}"] for f in fields]
    assert offsets == [0, 6, 8, 10]
    assert probe["offsetof virtio_net_config.speed"] == net.CONFIG_SIZE


def test_constants_and_ioctl_numbers_match_headers(probe: dict[str, int]) -> None:
    for name, value in VALUES.items():
        assert value == probe[f"value {name}"], name


def test_memory_table_lists_every_ram_region_with_its_mapping() -> None:
    memory = GuestMemory([(0, 2 * MiB), (4 * MiB, 2 * MiB)])
    try:
        table = memory_table(memory)
        assert [(r.guest_phys_addr, r.memory_size) for r in table] == [(0, 2 * MiB), (4 * MiB, 2 * MiB)]
        for region, entry in zip(memory.regions, table, strict=True):
            assert entry.userspace_addr == region.host_address
            # the mapping really is that region's memory: a byte written through it is seen by the guest side
            ctypes.memmove(entry.userspace_addr + 123, b"\x5a", 1)
            assert memory.read(entry.guest_phys_addr + 123, 1) == b"\x5a"
    finally:
        memory.close()


def test_vring_addresses_are_translated_and_checked() -> None:
    memory = GuestMemory([(0, 2 * MiB)])
    try:
        spec = VringSpec(1, 256, 0x10000, 0x11000, 0x12000, kick_fd=5, call_fd=6)
        assert spec.ring_lengths() == (4096, 6 + 512, 6 + 2048)
        base = memory.regions[0].host_address
        assert spec.host_addresses(memory) == (base + 0x10000, base + 0x11000, base + 0x12000)
        # a used ring running past the end of RAM, a size that is not a power of two: refused here
        with pytest.raises(VhostError, match="not in guest RAM"):
            VringSpec(1, 256, 0x10000, 0x11000, 2 * MiB - 100, 5, 6).host_addresses(memory)
        with pytest.raises(VhostError, match="power of two"):
            VringSpec(0, 100, 0, 0x1000, 0x2000, 5, 6).host_addresses(memory)
    finally:
        memory.close()
