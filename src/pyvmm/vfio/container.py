"""The VFIO container (/dev/vfio/vfio: one IOMMU context, DMA mappings) and groups (/dev/vfio/<id>).

Container/group mode with the type1v2 IOMMU (docs/vfio.md#host-setup-order). The IOMMU model can only be
set once a group is attached, so `VfioContainer.attach(group)` does it with the first group.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os

from pyvmm import pci_sysfs
from pyvmm.ioctl import IoctlError, ioctl
from pyvmm.vfio.bindings import (
    VFIO_API_VERSION,
    VfioDmaMapFlag,
    VfioExtension,
    VfioGroupFlag,
    VfioIoctl,
    vfio_group_status,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info,
)
from pyvmm.vfio.errors import VfioError

log = logging.getLogger(__name__)

CONTAINER_PATH = "/dev/vfio/vfio"


def _open(path: str, what: str, hint: str = "") -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise VfioError(f"cannot open {what} {path}: {e.strerror}{hint}") from e


class VfioContainer:
    """/dev/vfio/vfio: checks the API, owns the type1v2 IOMMU context and its DMA mappings."""

    def __init__(self, path: str = CONTAINER_PATH) -> None:
        self.fd = _open(path, "the VFIO container", " (is the vfio module loaded?)")
        self.groups: list[VfioGroup] = []
        self.iommu_set = False
        self.mappings: dict[int, int] = {}  # iova -> size
        try:
            version = ioctl(self.fd, VfioIoctl.VFIO_GET_API_VERSION)
            if version != VFIO_API_VERSION:
                raise VfioError(f"{path}: VFIO API version {version}, expected {VFIO_API_VERSION}")
            if ioctl(self.fd, VfioIoctl.VFIO_CHECK_EXTENSION, VfioExtension.VFIO_TYPE1v2_IOMMU) != 1:
                raise VfioError(
                    f"{path}: the type1v2 IOMMU is not available (load vfio_iommu_type1; an IOMMU must be "
                    "enabled, e.g. intel_iommu=on)"
                )
        except BaseException:
            self.close()
            raise

    def check_extension(self, extension: VfioExtension | int) -> int:
        return ioctl(self.fd, VfioIoctl.VFIO_CHECK_EXTENSION, int(extension))

    def attach(self, group: VfioGroup) -> None:
        """Put `group` into this container; the first group also selects the type1v2 IOMMU."""
        group.set_container(self)
        if not self.iommu_set:
            try:
                ioctl(self.fd, VfioIoctl.VFIO_SET_IOMMU, VfioExtension.VFIO_TYPE1v2_IOMMU)
            except IoctlError as e:
                group.unset_container()
                raise VfioError(f"VFIO_SET_IOMMU(type1v2) failed: {e.strerror}") from e
            self.iommu_set = True
        self.groups.append(group)

    def detach(self, group: VfioGroup) -> None:
        if group in self.groups:
            self.groups.remove(group)
            group.unset_container()
            if not self.groups:
                # The kernel drops the IOMMU context (and every mapping) with the last group.
                self.iommu_set = False
                self.mappings.clear()

    def iommu_info(self) -> vfio_iommu_type1_info:
        info = vfio_iommu_type1_info(argsz=ctypes.sizeof(vfio_iommu_type1_info))
        ioctl(self.fd, VfioIoctl.VFIO_IOMMU_GET_INFO, info)
        return info

    def map_dma(self, iova: int, size: int, vaddr: int, read: bool = True, write: bool = True) -> None:
        """Let devices in this container access `size` bytes at `vaddr` through I/O address `iova`."""
        if not self.iommu_set:
            raise VfioError("DMA mapping needs a group in the container first")
        flags = VfioDmaMapFlag(0)
        if read:
            flags |= VfioDmaMapFlag.VFIO_DMA_MAP_FLAG_READ
        if write:
            flags |= VfioDmaMapFlag.VFIO_DMA_MAP_FLAG_WRITE
        request = vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(vfio_iommu_type1_dma_map), flags=flags, vaddr=vaddr, iova=iova, size=size
        )
        try:
            ioctl(self.fd, VfioIoctl.VFIO_IOMMU_MAP_DMA, request)
        except IoctlError as e:
            hint = (
                " (locked-memory limit: raise `ulimit -l` or run with CAP_IPC_LOCK)"
                if e.errno in (errno.ENOMEM, errno.EPERM)
                else ""
            )
            raise VfioError(
                f"VFIO DMA map of {size:#x} bytes at IOVA {iova:#x} failed: {e.strerror}{hint}"
            ) from e
        self.mappings[iova] = size

    def unmap_dma(self, iova: int, size: int) -> None:
        argsz = ctypes.sizeof(vfio_iommu_type1_dma_unmap)
        request = vfio_iommu_type1_dma_unmap(argsz=argsz, iova=iova, size=size)
        try:
            ioctl(self.fd, VfioIoctl.VFIO_IOMMU_UNMAP_DMA, request)
        except IoctlError as e:
            what = f"VFIO DMA unmap of {size:#x} bytes at IOVA {iova:#x}"
            raise VfioError(f"{what} failed: {e.strerror}") from e
        self.mappings.pop(iova, None)
        # The kernel writes back how much it unmapped; anything else means the ranges did not line up.
        if request.size != size:
            raise VfioError(
                f"VFIO DMA unmap at IOVA {iova:#x}: asked for {size:#x} bytes, {request.size:#x} "
                "were unmapped"
            )

    def close(self) -> None:
        for group in list(self.groups):
            self.detach(group)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def not_viable_message(group_id: int, device_hint: str) -> str:
    """Why the kernel calls the group not viable, by the rule `pyvmm-host` uses (pyvmm.pci_sysfs)."""
    blockers = pci_sysfs.blockers(pci_sysfs.SYSFS.group_members(group_id))
    who = "; ".join(f"{m.name} is on {m.driver}" for m in blockers) or "a member is bound to a host driver"
    bridges = [m.name for m in blockers if pci_sysfs.member_role(m) is pci_sysfs.MemberRole.DRIVEN_BRIDGE]
    if bridges:
        return (
            f"IOMMU group {group_id} is not viable ({who}): {', '.join(bridges)} is a bridge, which cannot "
            "be passed through; move the device to a slot with its own group "
            f"(see `pyvmm-host check {device_hint}`)"
        )
    return (
        f"IOMMU group {group_id} is not viable ({who}): give the whole group to VFIO with "
        f"`pyvmm-host bind --group {device_hint}` and pass every member to the guest"
    )


class VfioGroup:
    """/dev/vfio/<id>: must be viable (every member on vfio-pci or no driver) before use."""

    def __init__(self, group_id: int, device_hint: str = "") -> None:
        self.id = group_id
        self.container: VfioContainer | None = None
        self.device_hint = device_hint or f"<a device of group {group_id}>"
        path = f"/dev/vfio/{group_id}"
        if not os.path.exists(path):
            raise VfioError(
                f"{path} does not exist: no device of IOMMU group {group_id} is bound to vfio-pci "
                f"(run `pyvmm-host bind {self.device_hint}`)"
            )
        hint = " (is another VMM using this group?)"
        self.fd = _open(path, f"IOMMU group {group_id}", hint)
        try:
            if not self.status() & VfioGroupFlag.VFIO_GROUP_FLAGS_VIABLE:
                raise VfioError(not_viable_message(group_id, self.device_hint))
        except BaseException:
            self.close()
            raise

    def status(self) -> VfioGroupFlag:
        status = vfio_group_status(argsz=ctypes.sizeof(vfio_group_status))
        ioctl(self.fd, VfioIoctl.VFIO_GROUP_GET_STATUS, status)
        return VfioGroupFlag(status.flags)

    @property
    def viable(self) -> bool:
        return bool(self.status() & VfioGroupFlag.VFIO_GROUP_FLAGS_VIABLE)

    def set_container(self, container: VfioContainer) -> None:
        try:
            ioctl(self.fd, VfioIoctl.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container.fd))
        except IoctlError as e:
            raise VfioError(f"IOMMU group {self.id}: VFIO_GROUP_SET_CONTAINER failed: {e.strerror}") from e
        self.container = container

    def unset_container(self) -> None:
        if self.container is not None and self.fd >= 0:
            with contextlib.suppress(OSError):
                ioctl(self.fd, VfioIoctl.VFIO_GROUP_UNSET_CONTAINER)
        self.container = None

    def get_device_fd(self, name: str) -> int:
        """VFIO_GROUP_GET_DEVICE_FD for the device named `name` (its PCI address, 0000:01:00.0)."""
        buf = ctypes.create_string_buffer(name.encode())
        try:
            return ioctl(self.fd, VfioIoctl.VFIO_GROUP_GET_DEVICE_FD, ctypes.addressof(buf))
        except IoctlError as e:
            raise VfioError(f"{name}: VFIO_GROUP_GET_DEVICE_FD failed: {e.strerror}") from e

    def close(self) -> None:
        if self.container is not None:
            self.container.detach(self)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
