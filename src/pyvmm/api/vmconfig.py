"""cloud-hypervisor's VmConfig JSON <-> pyvmm's VmConfig (docs/api.md#vmconfig).

One validation path: each JSON object is turned into the parsed keys of the matching command-line flag
(`pyvmm.options.Options`) and goes through the same builder and the same cross-flag checks as the command
line, so the API accepts and refuses exactly what `pyvmm` does. Keys CH does not know are ignored (as CH
ignores them: clients send keys of newer or feature builds); keys CH knows and pyvmm does not implement are
accepted only with CH's default value. Every error is a `VmConfigError` naming the JSON key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from pyvmm import layout
from pyvmm.config import (
    NET_DEFAULT_IP,
    NET_DEFAULT_MASK,
    ConfigError,
    ConsoleConfig,
    ConsoleMode,
    DeviceConfig,
    DiskConfig,
    FsConfig,
    ImageType,
    NetConfig,
    PayloadConfig,
    VmConfig,
    console_from_options,
    cpus_from_options,
    device_from_options,
    disk_from_options,
    fs_from_options,
    memory_from_options,
    net_from_options,
    pci_segment_from_options,
    platform_from_options,
    rng_from_options,
    validate,
    vsock_from_options,
)
from pyvmm.options import OptionError, Options

T = TypeVar("T")


class VmConfigError(ConfigError):
    """A VmConfig JSON pyvmm refuses; `option` is the JSON key path, e.g. `disks[0].queue_size`."""


# Per object: CH's JSON key -> the flag's key (None: CH knows it, pyvmm has no such key; then only null,
# false, 0 or empty are accepted). Keys CH does not know are ignored.
_Keys = Mapping[str, str | None]


def _keys(*same: str, **renamed: str | None) -> dict[str, str | None]:
    """CH's JSON keys of one object: `same` are spelled as the flag's keys, `renamed` map to them."""
    out: dict[str, str | None] = {k: k for k in same}
    out.update(renamed)
    return out


_CPUS = _keys("topology", "max_phys_bits", "kvm_hyperv", "nested", "core_scheduling", boot_vcpus="boot",
              max_vcpus="max", affinity=None, features=None)
_MEMORY = _keys("size", "shared", "hugepages", "hugepage_size", "prefault", "thp", "mergeable",
                "hotplug_method", "hotplug_size", "hotplugged_size", "reserve", zones=None)
_PCI_KEYS = _keys("id", "pci_segment", "pci_device_id", "iommu")
_DISK = _keys("path", "readonly", "direct", "num_queues", "queue_size", "serial", "image_type", "vhost_user",
              "rate_limit_group", "backing_files", "sparse", "lock_granularity", vhost_socket="socket",
              disable_io_uring="_disable_io_uring", disable_aio="_disable_aio", rate_limiter_config=None,
              queue_affinity=None) | _PCI_KEYS
# `fd` is never taken from JSON (as CH: a number in a body means nothing in this process); managed and
# x_allow_no_reset and x_msix_relocation are pyvmm's own keys, as on the command line.
_DEVICE = _keys("path", "x_nv_gpudirect_clique", "x_exclude_mmap_bars", "managed",
                "x_allow_no_reset", "x_msix_relocation") | _PCI_KEYS
# `fds` is never taken from JSON (tap fds come with the request, SCM_RIGHTS: vm.add-net); vhost_user and
# vhost_mode go to the flag's checks, which refuse a vhost-user backend with their message.
_NET = _keys("tap", "ip", "mask", "mac", "host_mac", "mtu", "num_queues", "queue_size", "vhost_user",
             "vhost_mode", "offload_tso", "offload_ufo", "offload_csum", "rate_limit_group",
             vhost_socket="socket", rate_limiter_config=None) | _PCI_KEYS
_CONSOLE = _keys("file", "socket") | _PCI_KEYS
_SERIAL = _keys("file", "socket")
_RNG = _keys("src", "iommu", id=None, pci_segment=None, pci_device_id=None)
_VSOCK = _keys("cid", "socket") | _PCI_KEYS
_FS = _keys("tag", "socket", "num_queues", "queue_size") | _PCI_KEYS
_PLATFORM = _keys("num_pci_segments", "iommu_segments", "vfio_p2p_dma", "iommufd", "tdx", "sev_snp",
                  "system_manufacturer", "system_product_name", "system_version", "system_serial_number",
                  "system_uuid", "system_sku_number", "system_family", "chassis_asset_tag", "oem_strings",
                  "serial_number", "uuid", "allow_unsafe_interrupts", "x_max_msi_routes",
                  iommu_address_width_bits="iommu_address_width")
_PCI_SEGMENT = _keys("pci_segment", "mmio32_aperture_weight", "mmio64_aperture_weight")

_PAYLOAD_KEYS = ("kernel", "initramfs", "cmdline")
_PAYLOAD_UNSUPPORTED = ("firmware", "igvm", "host_data")
# Whole devices and features CH has and pyvmm does not: refused unless absent, null, empty or false.
_SECTIONS_UNSUPPORTED = (
    "balloon",
    "pmem",
    "user_devices",
    "vdpa",
    "numa",
    "tpm",
    "landlock_rules",
    "rate_limit_groups",
    "generic_vhost_user",
    "iommu",
    "watchdog",
    "pvpanic",
    "landlock_enable",
)


def _empty(value: Any) -> bool:
    """Absent, null, false, "", [] or an object of such (e.g. `"features": {"amx": false}`)."""
    if isinstance(value, dict):
        return all(_empty(v) for v in value.values())
    return value is None or value is False or value == [] or value == ""


def _text(where: str, value: Any) -> str | None:
    """A JSON value as the command line would spell it (None: not given)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        if value < 0:
            raise VmConfigError(where, f"{value} is negative")
        return str(value)
    if isinstance(value, str):
        return value or None
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "[" + ",".join(str(v) for v in value) + "]"
    if isinstance(value, list) and not value:
        return None
    raise VmConfigError(where, f"unexpected value {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _object(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise VmConfigError(where, f"expected a JSON object, got {_short(value)}")
    return value


def _options(where: str, obj: dict[str, Any], keys: _Keys, flags: frozenset[str] = frozenset()) -> Options:
    values: dict[str, str] = {}
    for key, value in obj.items():
        if key not in keys:
            continue  # unknown to CH too: ignored
        target = keys[key]
        if target is None:
            if not _empty(value) and value != 0:
                raise VmConfigError(f"{where}.{key}", "is not supported by pyvmm yet; leave it out")
            continue
        if key == "topology" and isinstance(value, dict):
            value = _topology(f"{where}.topology", value)
        text = _text(f"{where}.{key}", value)
        if text is not None:
            values[target] = text
    return Options(values=values, flags=flags)


def _topology(where: str, obj: dict[str, Any]) -> str:
    parts = []
    for key in ("threads_per_core", "cores_per_die", "dies_per_package", "packages"):
        value = obj.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise VmConfigError(f"{where}.{key}", "missing or not an integer")
        parts.append(str(value))
    return ":".join(parts)


def _build(where: str, build: Callable[[Options], T], opts: Options) -> T:
    try:
        return build(opts)
    except OptionError as exc:
        raise VmConfigError(where, str(exc)) from None


def _console(where: str, value: Any, flag: str, default: ConsoleConfig) -> ConsoleConfig:
    if value is None:
        return default
    obj = _object(where, value)
    mode = obj.get("mode")
    if not isinstance(mode, str):
        raise VmConfigError(f"{where}.mode", "required: one of Off, Pty, Tty, File, Socket, Null")
    name = mode.lower()
    keys = _CONSOLE if flag == "--console" else _SERIAL
    flags: frozenset[str] = frozenset()
    if name in ("off", "pty", "tty", "null"):
        flags = frozenset({name})
        keys = {k: v for k, v in keys.items() if k not in ("file", "socket")}
    elif name in ("file", "socket"):
        if not obj.get(name):
            raise VmConfigError(f"{where}.{name}", f"required with mode {mode}")
        keys = {k: v for k, v in keys.items() if k in (name, *_PCI_KEYS)}
    else:
        raise VmConfigError(f"{where}.mode", f"{mode!r} is not one of Off, Pty, Tty, File, Socket, Null")
    return _build(where, lambda o: console_from_options(o, flag), _options(where, obj, keys, flags))


def _list(where: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise VmConfigError(where, f"expected a JSON array, got {_short(value)}")
    return value


def vm_config_from_json(document: Any, verbosity: int = 0) -> VmConfig:
    """The validated VmConfig of a vm.create body (already decoded JSON). Raises VmConfigError."""
    top = _object("VmConfig", document)
    for key in _SECTIONS_UNSUPPORTED:
        if not _empty(top.get(key)):
            raise VmConfigError(key, "is not supported by pyvmm yet; leave it out")
    debug_console = top.get("debug_console")
    if debug_console is not None and str(_object("debug_console", debug_console).get("mode", "Off")) != "Off":
        raise VmConfigError("debug_console", "is not supported by pyvmm yet; leave it out or use mode Off")

    payload_obj = _object("payload", top.get("payload"))
    for key in _PAYLOAD_UNSUPPORTED:
        if not _empty(payload_obj.get(key)):
            raise VmConfigError(f"payload.{key}", "is not supported by pyvmm yet; give payload.kernel")
    strings = {}
    for key in _PAYLOAD_KEYS:
        value = payload_obj.get(key)
        if value is not None and not isinstance(value, str):
            raise VmConfigError(f"payload.{key}", f"expected a string, got {_short(value)}")
        strings[key] = value or None
    if strings["kernel"] is None:
        raise VmConfigError("payload.kernel", "required: the guest kernel (a bzImage or a PVH vmlinux)")
    cmdline = strings["cmdline"] or ""
    if len(cmdline.encode()) >= layout.CMDLINE_MAX_SIZE:
        raise VmConfigError(
            "payload.cmdline",
            f"{len(cmdline.encode())} bytes is too long: at most {layout.CMDLINE_MAX_SIZE - 1}",
        )
    payload = PayloadConfig(
        kernel=Path(strings["kernel"]),
        initramfs=Path(strings["initramfs"]) if strings["initramfs"] else None,
        cmdline=cmdline,
    )
    defaults = VmConfig()
    config = VmConfig(
        payload=payload,
        cpus=_section(top, "cpus", _CPUS, cpus_from_options, defaults.cpus),
        memory=_section(top, "memory", _MEMORY, memory_from_options, defaults.memory),
        serial=_console("serial", top.get("serial"), "--serial", defaults.serial),
        console=_console("console", top.get("console"), "--console", defaults.console),
        rng=_section(top, "rng", _RNG, rng_from_options, defaults.rng),
        vsock=_section(top, "vsock", _VSOCK, vsock_from_options, defaults.vsock),
        disks=tuple(
            disk_config_from_json(d, f"disks[{i}]") for i, d in enumerate(_list("disks", top.get("disks")))
        ),
        devices=tuple(
            device_config_from_json(d, f"devices[{i}]")
            for i, d in enumerate(_list("devices", top.get("devices")))
        ),
        nets=tuple(net_config_from_json(n, f"net[{i}]") for i, n in enumerate(_list("net", top.get("net")))),
        fs=tuple(
            _build(f"fs[{i}]", fs_from_options, _options(f"fs[{i}]", _object(f"fs[{i}]", f), _FS))
            for i, f in enumerate(_list("fs", top.get("fs")))
        ),
        platform=_section(top, "platform", _PLATFORM, platform_from_options, defaults.platform),
        pci_segments=tuple(
            _build(
                f"pci_segments[{i}]",
                pci_segment_from_options,
                _options(f"pci_segments[{i}]", _object(f"pci_segments[{i}]", s), _PCI_SEGMENT),
            )
            for i, s in enumerate(_list("pci_segments", top.get("pci_segments")))
        ),
        verbosity=verbosity,
    )
    try:
        validate(config)
    except VmConfigError:
        raise
    except ConfigError as exc:  # the cross-flag checks name flags; the message says the rest
        raise VmConfigError(exc.option, exc.message) from None
    return config


def device_config_from_json(document: Any, where: str = "DeviceConfig") -> DeviceConfig:
    """A DeviceConfig body (vm.add-device, or one of VmConfig's devices)."""
    return _build(where, device_from_options, _options(where, _object(where, document), _DEVICE))


def disk_config_from_json(document: Any, where: str = "DiskConfig") -> DiskConfig:
    """A DiskConfig body (vm.add-disk, or one of VmConfig's disks)."""
    return _build(where, disk_from_options, _options(where, _object(where, document), _DISK))


def net_config_from_json(document: Any, where: str = "NetConfig", fds: tuple[int, ...] = ()) -> NetConfig:
    """A NetConfig body (vm.add-net, with the tap fds received with it), or one of VmConfig's nets (no
    fds: vm.create's are not used). Through --net's own checks, `fds` as its fd=[...]. CH's defaults for
    `ip` and `mask`, which Kata's generated client sends in every NetConfig, count as not given: a tap
    pyvmm creates gets them anyway, and one it did not create is left as it is (docs/api.md#vmadd-net)."""
    obj = dict(_object(where, document))
    for key, default in (("ip", NET_DEFAULT_IP), ("mask", NET_DEFAULT_MASK)):
        if obj.get(key) == str(default):
            del obj[key]
    opts = _options(where, obj, _NET)
    if fds:
        opts = Options(values={**opts.values, "fd": "[" + ",".join(map(str, fds)) + "]"}, flags=opts.flags)
    return _build(where, net_from_options, opts)


def _section(top: dict[str, Any], key: str, keys: _Keys, build: Callable[[Options], T], default: T) -> T:
    value = top.get(key)
    if value is None:
        return default
    return _build(key, build, _options(key, _object(key, value), keys))


# ---------------------------------------------------------------------------------------------------------
# VmConfig -> JSON (vm.info's `config`): CH's shape with every default filled in, None fields left out.

_MODE_NAMES = {m: m.value.capitalize() for m in ConsoleMode}
_IMAGE_NAMES = {
    ImageType.RAW: "Raw",
    ImageType.QCOW2: "Qcow2",
    ImageType.VHD: "FixedVhd",
    ImageType.VHDX: "Vhdx",
    ImageType.VMDK: "Vmdk",
}


def _drop_none(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not None}


def _console_json(console: ConsoleConfig, pci: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": _MODE_NAMES[console.mode]}
    if console.path is not None:
        out[console.mode.value] = str(console.path)
    if pci:
        out |= _drop_none(
            {
                "id": console.id,
                "iommu": False,
                "pci_segment": console.pci_segment,
                "pci_device_id": console.pci_device_id,
            }
        )
    return out


def disk_json(disk: DiskConfig, ident: str | None = None) -> dict[str, Any]:
    return _drop_none(
        {
            "path": None if disk.path is None else str(disk.path),
            "readonly": disk.readonly,
            "direct": disk.direct,
            "iommu": False,
            "num_queues": disk.num_queues,
            "queue_size": disk.queue_size,
            "vhost_user": disk.vhost_user,  # a --disk on the command line only: the API refuses it
            "vhost_socket": None if disk.socket is None else str(disk.socket),
            "id": ident or disk.id,
            "pci_segment": disk.pci_segment,
            "pci_device_id": disk.pci_device_id,
            "serial": disk.serial,
            "backing_files": False,
            "sparse": True,
            "image_type": _IMAGE_NAMES[disk.image_type],
        }
    )


def device_json(device: DeviceConfig, ident: str | None = None) -> dict[str, Any]:
    return _drop_none(
        {
            "path": str(device.path),
            "iommu": device.iommu,
            "id": ident or device.id,
            "pci_segment": device.pci_segment,
            "pci_device_id": device.pci_device_id,
            "x_nv_gpudirect_clique": device.x_nv_gpudirect_clique,
            "x_exclude_mmap_bars": list(device.x_exclude_mmap_bars),
            "managed": device.managed or None,
            "x_allow_no_reset": device.x_allow_no_reset or None,
            "x_msix_relocation": device.x_msix_relocation or None,
        }
    )


def net_json(net: NetConfig, ident: str | None = None) -> dict[str, Any]:
    """One of vm.info's `net` (CH's NetConfig; the tap fds are not shown), and pyvmm-remote's add-net body
    (its fd=[...] go with the request)."""
    return _drop_none(
        {
            "tap": net.tap,
            "ip": str(net.ip or NET_DEFAULT_IP),
            "mask": str(net.mask or NET_DEFAULT_MASK),
            "mac": ":".join(f"{b:02x}" for b in net.mac),
            "host_mac": None if net.host_mac is None else ":".join(f"{b:02x}" for b in net.host_mac),
            "mtu": net.mtu,
            "iommu": False,
            "num_queues": net.num_queues,
            "queue_size": net.queue_size,
            "vhost_user": False,
            "vhost_mode": "Client",
            "id": ident or net.id,
            "pci_segment": net.pci_segment,
            "pci_device_id": net.pci_device_id,
            "offload_tso": net.offload_tso,
            "offload_ufo": net.offload_ufo,
            "offload_csum": net.offload_csum,
        }
    )


def fs_json(fs: FsConfig) -> dict[str, Any]:
    return _drop_none(
        {
            "tag": fs.tag,
            "socket": str(fs.socket),
            "num_queues": fs.num_queues,
            "queue_size": fs.queue_size,
            "id": fs.id,
            "iommu": False,
            "pci_segment": fs.pci_segment,
            "pci_device_id": fs.pci_device_id,
        }
    )


def vm_config_to_json(config: VmConfig, ids: Mapping[int, str] | None = None) -> dict[str, Any]:
    """vm.info's `config`. `ids` names the disks and devices by their index in disks + devices (once booted,
    the generated names)."""
    ids = ids or {}
    cpus, memory, platform = config.cpus, config.memory, config.platform
    topology = cpus.topology
    out: dict[str, Any] = {
        "cpus": _drop_none(
            {
                "boot_vcpus": cpus.boot,
                "max_vcpus": cpus.max,
                "topology": None
                if topology is None
                else {
                    "threads_per_core": topology.threads_per_core,
                    "cores_per_die": topology.cores_per_die,
                    "dies_per_package": topology.dies_per_package,
                    "packages": topology.packages,
                },
                "kvm_hyperv": False,
                "max_phys_bits": cpus.max_phys_bits,
                "nested": True,
            }
        ),
        "memory": _drop_none(
            {
                "size": memory.size,
                "mergeable": memory.mergeable,
                "hotplug_method": "Acpi",
                "shared": memory.shared,
                "hugepages": memory.hugepages,
                "hugepage_size": memory.hugepage_size,
                "prefault": memory.prefault,
                "thp": memory.thp,
            }
        ),
        "payload": _drop_none(
            {
                "kernel": str(config.payload.kernel) if config.payload.kernel else None,
                "cmdline": config.payload.cmdline or None,
                "initramfs": str(config.payload.initramfs) if config.payload.initramfs else None,
            }
        ),
        "rng": {"src": str(config.rng.src), "iommu": False},
        "serial": _console_json(config.serial, pci=False),
        "console": _console_json(config.console, pci=True),
        "iommu": False,
        "watchdog": False,
        "pvpanic": False,
        "platform": _drop_none(
            {
                "num_pci_segments": platform.num_pci_segments,
                "iommu_segments": list(platform.iommu_segments) or None,
                "iommu_address_width_bits": platform.iommu_address_width,
                "iommufd": False,
                "vfio_p2p_dma": platform.vfio_p2p_dma,
                "allow_unsafe_interrupts": platform.allow_unsafe_interrupts or None,
                "x_max_msi_routes": (
                    platform.x_max_msi_routes if platform.x_max_msi_routes != layout.MSI_ROUTES_MAX else None
                ),
            }
        ),
    }
    if config.vsock is not None:
        vsock = config.vsock
        out["vsock"] = _drop_none({"cid": vsock.cid, "socket": str(vsock.socket), "iommu": False,
                                   "id": vsock.id, "pci_segment": vsock.pci_segment,
                                   "pci_device_id": vsock.pci_device_id})
    if config.disks:
        out["disks"] = [disk_json(d, ids.get(i)) for i, d in enumerate(config.disks)]
    if config.nets:
        out["net"] = [net_json(n) for n in config.nets]
    if config.fs:
        out["fs"] = [fs_json(f) for f in config.fs]
    if config.devices:
        base = len(config.disks)
        out["devices"] = [device_json(d, ids.get(base + i)) for i, d in enumerate(config.devices)]
    if config.pci_segments:
        out["pci_segments"] = [
            {
                "pci_segment": s.pci_segment,
                "mmio32_aperture_weight": s.mmio32_aperture_weight,
                "mmio64_aperture_weight": s.mmio64_aperture_weight,
            }
            for s in config.pci_segments
        ]
    return out


def with_device(config: VmConfig, device: DeviceConfig | DiskConfig | NetConfig) -> VmConfig:
    """`config` with `device` (a passed-through function, a disk or a NIC) added, checked as a whole
    (vm.add-device, vm.add-disk, vm.add-net before boot)."""
    if isinstance(device, DiskConfig):
        new = replace(config, disks=(*config.disks, device))
    elif isinstance(device, NetConfig):
        new = replace(config, nets=(*config.nets, device))
    else:
        new = replace(config, devices=(*config.devices, device))
    try:
        validate(new)
    except ConfigError as exc:
        raise VmConfigError(exc.option, exc.message) from None
    return new
