"""Loading vfio_iommu_type1 and vfio-pci, and allow_unsafe_interrupts only when asked: a modprobe
parameter when we load the module, a /sys/module write when it is already there (or built in)."""

from __future__ import annotations

import os

from . import modules, sysfs
from .actions import Changer
from .errors import HostError
from .journal import Journal, ParamRecord
from .modules import ModuleState
from .sysfs import VFIO_DRIVER


def ensure_vfio_modules(changer: Changer, journal: Journal, allow_unsafe_interrupts: bool) -> None:
    type1 = modules.module_state(modules.VFIO_IOMMU_TYPE1)
    if type1.present:
        if allow_unsafe_interrupts:
            current = modules.read_param(modules.VFIO_IOMMU_TYPE1, modules.UNSAFE_INTERRUPTS)
            if current is None:
                raise HostError(
                    f"{modules.VFIO_IOMMU_TYPE1} has no {modules.UNSAFE_INTERRUPTS} parameter in "
                    "/sys/module: this kernel cannot allow unsafe interrupts at run time"
                )
            if not modules.is_true(current):
                param = ParamRecord(modules.VFIO_IOMMU_TYPE1, modules.UNSAFE_INTERRUPTS, current)
                journal.record_param(param)
                changer.write(
                    modules.VFIO_IOMMU_TYPE1,
                    str(modules.param_path(modules.VFIO_IOMMU_TYPE1, modules.UNSAFE_INTERRUPTS)),
                    "1",
                )
    else:
        need_modprobe(changer, modules.VFIO_IOMMU_TYPE1, type1)
        params = {modules.UNSAFE_INTERRUPTS: "1"} if allow_unsafe_interrupts else {}
        if allow_unsafe_interrupts:
            journal.record_param(ParamRecord(modules.VFIO_IOMMU_TYPE1, modules.UNSAFE_INTERRUPTS, None))
        changer.run(modules.VFIO_IOMMU_TYPE1, modules.modprobe_argv(modules.VFIO_IOMMU_TYPE1, params))
    if not sysfs.driver_dir(VFIO_DRIVER).is_dir():
        need_modprobe(changer, "vfio-pci", modules.module_state(modules.VFIO_PCI))
        changer.run("vfio-pci", modules.modprobe_argv("vfio-pci"))
        if not changer.dry_run and not sysfs.settle(sysfs.driver_dir(VFIO_DRIVER).is_dir):
            raise HostError("vfio-pci: modprobe succeeded but no vfio-pci driver appeared in sysfs")


def need_modprobe(changer: Changer, name: str, state: ModuleState) -> None:
    if state is ModuleState.MISSING:
        raise HostError(
            f"{name}: kernel module is not loaded and not installed for kernel {os.uname().release}: "
            "use a kernel with VFIO (CONFIG_VFIO_PCI, CONFIG_VFIO_IOMMU_TYPE1)"
        )
    if not changer.dry_run and not modules.have_modprobe():
        raise HostError(f"{name}: kernel module is not loaded and modprobe is not installed: install kmod")
