"""Constants of the virtio 1.x specification shared by the transport and every device type."""

from __future__ import annotations

from enum import IntEnum, IntFlag

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040  # modern (non-transitional) device id = base + device type
VIRTIO_PCI_SUBSYSTEM_ID = 0x0040  # non-transitional devices use 0x40 or higher
VIRTIO_MSI_NO_VECTOR = 0xFFFF


class VirtioDeviceType(IntEnum):
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    VSOCK = 19
    FS = 26


class DeviceStatus(IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class Feature(IntEnum):
    """Device-independent feature bit numbers."""

    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34


def bit(feature: int) -> int:
    return 1 << int(feature)


# What the transport and split-ring code implement for every device.
TRANSPORT_FEATURES = bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX) | bit(Feature.VERSION_1)


class PciCapType(IntEnum):
    """cfg_type of a virtio vendor-specific PCI capability."""

    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5


class IsrStatus(IntFlag):
    QUEUE = 1
    CONFIG = 2
