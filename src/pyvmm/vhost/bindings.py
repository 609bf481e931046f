"""ctypes mirror of linux/vhost.h and linux/vhost_types.h: structures and request numbers, names as there."""

from __future__ import annotations

import ctypes
from enum import IntEnum

from pyvmm.ioctl import IO, IOR, IOW, IOWR

u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

VHOST_VIRTIO = 0xAF
VHOST_FILE_UNBIND = -1
VHOST_PAGE_SIZE = 0x1000
VHOST_VRING_F_LOG = 0
VHOST_F_LOG_ALL = 26
VHOST_NET_F_VIRTIO_NET_HDR = 27


class vhost_vring_state(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint), ("num", ctypes.c_uint)]


class vhost_vring_file(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint), ("fd", ctypes.c_int)]


class vhost_vring_addr(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("desc_user_addr", u64),
        ("used_user_addr", u64),
        ("avail_user_addr", u64),
        ("log_guest_addr", u64),
    ]


class vhost_memory_region(ctypes.Structure):
    _fields_ = [
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
        ("flags_padding", u64),
    ]


class vhost_memory(ctypes.Structure):
    """The header; `regions[]` (a flexible array) follows it: see vhost_memory_with()."""

    _fields_ = [("nregions", u32), ("padding", u32)]


def vhost_memory_with(count: int) -> type[ctypes.Structure]:
    """struct vhost_memory with room for `count` regions after the header."""

    class _VhostMemory(ctypes.Structure):
        _fields_ = [("nregions", u32), ("padding", u32), ("regions", vhost_memory_region * count)]

    return _VhostMemory


class VhostIoctl(IntEnum):
    VHOST_GET_FEATURES = IOR(VHOST_VIRTIO, 0x00, u64)
    VHOST_SET_FEATURES = IOW(VHOST_VIRTIO, 0x00, u64)
    VHOST_SET_OWNER = IO(VHOST_VIRTIO, 0x01)
    VHOST_RESET_OWNER = IO(VHOST_VIRTIO, 0x02)
    VHOST_SET_MEM_TABLE = IOW(VHOST_VIRTIO, 0x03, vhost_memory)
    VHOST_SET_VRING_NUM = IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
    VHOST_SET_VRING_ADDR = IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
    VHOST_SET_VRING_BASE = IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
    VHOST_GET_VRING_BASE = IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)
    VHOST_SET_VRING_KICK = IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
    VHOST_SET_VRING_CALL = IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
    VHOST_SET_VRING_ERR = IOW(VHOST_VIRTIO, 0x22, vhost_vring_file)
    VHOST_NET_SET_BACKEND = IOW(VHOST_VIRTIO, 0x30, vhost_vring_file)
