"""The `pyvmm` command line turned into validated configuration (docs/cli.md).

`parse_vm_config(argv)` parses and validates everything that needs no file system, KVM or sysfs binding
state; `check_paths(config)` then checks that the files and PCI functions named exist. Both raise
`ConfigError`, whose str() is one line naming the option.

Project rules on top of cloud-hypervisor's:
- a key CH has but pyvmm does not implement is accepted only with CH's default value (so command lines
  that spell out defaults still work) and otherwise refused as "not supported by pyvmm yet";
- `x_nv_gpudirect_clique` must be 0-15 (the capability has 4 bits for it,
  docs/vfio.md#gpudirect-clique-capability);
- duplicate `--device path=`s are found after normalising (realpath), not textually;
- `max` above `boot` (CPU hotplug) is refused; `--disk image_type` may only be raw (and defaults to it);
- two devices asking for the same PCI slot are refused here rather than at device creation;
- a single-valued flag given twice is an error (argparse would silently keep the last one).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import NoReturn, TypeVar

from pyvmm import __version__, layout
from pyvmm.errors import UsageError
from pyvmm.events import EventMonitorConfig
from pyvmm.options import OptionError, Options, parse_byte_size, parse_options
from pyvmm.sandbox import SeccompMode

MAX_VCPUS = 8192  # KVM's limit on x86_64 as CH enforces it; the host's KVM_CAP_MAX_VCPUS is checked later
MAX_PCI_SEGMENTS = 96
PCI_SLOTS = 32
MAX_BAR_INDEX = 5
MAX_CLIQUE_ID = 15
MAX_DISK_SERIAL_BYTES = 20  # virtio-blk device ID size
PAGE_SIZE = 4096

T = TypeVar("T")


class ConfigError(UsageError):
    """A command-line error; str() is one line: `<option>: <message>`."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(option, message)
        self.option = option
        self.message = message

    def __str__(self) -> str:
        return f"{self.option}: {self.message}".replace("\n", "\\n")


class ConsoleMode(Enum):
    OFF = "off"
    NULL = "null"
    TTY = "tty"
    PTY = "pty"
    FILE = "file"
    SOCKET = "socket"


class ImageType(Enum):
    RAW = "raw"
    QCOW2 = "qcow2"
    VHD = "vhd"
    VHDX = "vhdx"
    VMDK = "vmdk"


SUPPORTED_IMAGE_TYPES = frozenset({ImageType.RAW})
# pty and socket= (CH has both) are refused until pyvmm serves them: accepting them meant dropping the output.
SERIAL_MODES = frozenset({ConsoleMode.OFF, ConsoleMode.NULL, ConsoleMode.TTY, ConsoleMode.FILE})
CONSOLE_MODES = frozenset({ConsoleMode.OFF, ConsoleMode.NULL, ConsoleMode.TTY, ConsoleMode.FILE})


@dataclass(frozen=True)
class PayloadConfig:
    kernel: Path | None = None
    initramfs: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class CpuTopology:
    threads_per_core: int
    cores_per_die: int
    dies_per_package: int
    packages: int

    @property
    def vcpus(self) -> int:
        return self.threads_per_core * self.cores_per_die * self.dies_per_package * self.packages


@dataclass(frozen=True)
class CpusConfig:
    boot: int = 1
    max: int = 1
    topology: CpuTopology | None = None
    max_phys_bits: int = layout.DEFAULT_MAX_PHYS_BITS


@dataclass(frozen=True)
class MemoryConfig:
    size: int = 512 * layout.MiB
    shared: bool = False
    hugepages: bool = False
    hugepage_size: int | None = None  # None: the host's default huge page size
    prefault: bool = False
    thp: bool = True
    mergeable: bool = False


@dataclass(frozen=True)
class ConsoleConfig:
    """`--serial` (16550 COM1) or `--console` (virtio-console); the PCI keys apply to --console only."""

    mode: ConsoleMode
    path: Path | None = None  # for FILE and SOCKET
    id: str | None = None
    pci_segment: int = 0
    pci_device_id: int | None = None


DEFAULT_RNG_SOURCE = Path("/dev/urandom")


@dataclass(frozen=True)
class RngConfig:
    """`--rng`: the virtio-rng every VM has (as under cloud-hypervisor) and where its bytes come from."""

    src: Path = DEFAULT_RNG_SOURCE


MIN_VSOCK_CID = 3  # 0-2 are the hypervisor's, the local and the host's addresses
MAX_VSOCK_CID = 0xFFFF_FFFE  # CIDs are 32 bits in Linux; all ones means "any"
UNIX_PATH_MAX = 107  # sun_path's 108 bytes, NUL included


@dataclass(frozen=True)
class VsockConfig:
    """`--vsock`: a virtio-vsock device with cloud-hypervisor's hybrid vsock on the Unix socket `socket`
    (docs/vsock.md)."""

    cid: int
    socket: Path
    id: str | None = None
    pci_segment: int = 0
    pci_device_id: int | None = None


VIRTIO_FS_TAG_MAX = 36  # the tag[36] of struct virtio_fs_config (<linux/virtio_fs.h>)
FS_DEFAULT_NUM_QUEUES = 1  # request queues, as cloud-hypervisor's default
FS_DEFAULT_QUEUE_SIZE = 1024


@dataclass(frozen=True)
class FsConfig:
    """`--fs`: a virtio-fs device whose queues a vhost-user backend (virtiofsd) serves on `socket`
    (docs/virtio-fs.md)."""

    tag: str  # what the guest mounts: mount -t virtiofs <tag> <dir>
    socket: Path
    num_queues: int = FS_DEFAULT_NUM_QUEUES  # request queues; the device has one more, the hiprio queue
    queue_size: int = FS_DEFAULT_QUEUE_SIZE
    id: str | None = None
    pci_segment: int = 0
    pci_device_id: int | None = None

    @property
    def label(self) -> str:
        """How messages name this device."""
        return f"--fs tag={self.tag},socket={self.socket}"


@dataclass(frozen=True)
class DiskConfig:
    path: Path | None  # the image; None for a vhost-user disk, whose backend has it
    readonly: bool = False
    direct: bool = False
    id: str | None = None
    num_queues: int = 1
    queue_size: int = 128
    pci_segment: int = 0
    pci_device_id: int | None = None
    serial: str | None = None
    image_type: ImageType = ImageType.RAW
    # CH's hidden `_disable_io_uring`: the qemu-storage-daemon serving the disk reads and writes with a
    # thread pool instead of io_uring (docs/virtio-blk.md#who-serves-a-disk)
    disable_io_uring: bool = False
    # served by the vhost-user backend on `socket` (docs/virtio-blk.md#vhost-user-blk)
    vhost_user: bool = False
    socket: Path | None = None

    @property
    def label(self) -> str:
        """How messages name this disk: `--disk path=IMAGE` or `--disk socket=PATH`."""
        return f"--disk socket={self.socket}" if self.vhost_user else f"--disk path={self.path}"

    @property
    def data_path(self) -> str:
        """Who serves the guest's requests (said by `-v`: docs/virtio-blk.md#who-serves-a-disk)."""
        queues = f"{self.num_queues} queue(s) of {self.queue_size}"
        if self.vhost_user:
            return f"the vhost-user backend on {self.socket} ({queues}; pyvmm sees no request)"
        mode = "O_DIRECT" if self.direct else "through the page cache"
        mode += ", read-only" if self.readonly else ""
        return f"pyvmm's in-process worker, one Python thread for the device ({queues}, {mode})"


@dataclass(frozen=True)
class NetConfig:
    """`--net`: a virtio-net on a tap served by vhost-net (docs/net.md)."""

    tap: str | None = None  # None: a new vmtapN (or the tap of `fds`)
    ip: ipaddress.IPv4Address | None = None  # None: cloud-hypervisor's default, on a tap pyvmm creates
    mask: ipaddress.IPv4Address | None = None
    mac: bytes = b""  # the guest's MAC; parse_net fills in a random locally administered one
    host_mac: bytes | None = None
    mtu: int | None = None
    num_queues: int = 2  # receive + transmit queues: 2 per queue pair
    queue_size: int = 256
    id: str | None = None
    pci_segment: int = 0
    pci_device_id: int | None = None
    offload_tso: bool = True
    offload_ufo: bool = True
    offload_csum: bool = True
    # fd=[...]: queue files of a tap someone else opened, one per queue pair, numbers in this process,
    # checked by check_paths before anything is opened (docs/net.md#taps-opened-by-someone-else)
    fds: tuple[int, ...] = ()

    @property
    def queue_pairs(self) -> int:
        return self.num_queues // 2


@dataclass(frozen=True)
class DeviceConfig:
    """One host PCI function passed through with VFIO."""

    path: Path  # the function's sysfs directory, as given
    id: str | None = None
    iommu: bool = False
    pci_segment: int = 0
    pci_device_id: int | None = None
    x_nv_gpudirect_clique: int | None = None
    x_exclude_mmap_bars: tuple[int, ...] = ()
    managed: bool = False  # pyvmm-only: bind to vfio-pci before the VM starts, restore the driver after
    x_allow_no_reset: bool = False  # pyvmm-only: pass it through even if it cannot be reset
    x_msix_relocation: bool = False  # pyvmm-only: relocate a page-aligned MSI-X table too (docs/vfio.md)


@dataclass(frozen=True)
class PlatformConfig:
    num_pci_segments: int = 1
    vfio_p2p_dma: bool = True
    iommu_segments: tuple[int, ...] = ()  # always empty for now: needs virtio-iommu
    iommu_address_width: int = 64  # always 64 for now: only a virtio-iommu would narrow it
    iommufd: bool = False  # always False for now: container/group mode only
    # pyvmm-only: run --devices on a host without interrupt remapping (not isolated; SECURITY.md)
    allow_unsafe_interrupts: bool = False
    # pyvmm-only: the MSI routes (GSIs) the guest's vectors may take (docs/interrupts.md#routing-failures)
    x_max_msi_routes: int = layout.MSI_ROUTES_MAX


@dataclass(frozen=True)
class PciSegmentConfig:
    pci_segment: int = 0
    mmio32_aperture_weight: int = 1
    mmio64_aperture_weight: int = 1


@dataclass(frozen=True)
class VmConfig:
    payload: PayloadConfig = field(default_factory=PayloadConfig)
    cpus: CpusConfig = field(default_factory=CpusConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    serial: ConsoleConfig = field(default_factory=lambda: ConsoleConfig(ConsoleMode.NULL))
    console: ConsoleConfig = field(default_factory=lambda: ConsoleConfig(ConsoleMode.TTY))
    rng: RngConfig = field(default_factory=RngConfig)
    disks: tuple[DiskConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    vsock: VsockConfig | None = None
    fs: tuple[FsConfig, ...] = ()
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    pci_segments: tuple[PciSegmentConfig, ...] = ()
    seccomp: SeccompMode = SeccompMode.TRUE  # docs/seccomp.md
    verbosity: int = 0
    dry_run: bool = False


@dataclass(frozen=True)
class ApiSocketConfig:
    """`--api-socket path=P | fd=N | P` (docs/api.md): where the REST API is served."""

    path: Path | None = None
    fd: int | None = None


@dataclass(frozen=True)
class CommandLine:
    """What `pyvmm` was asked for: a VM, the API socket, or both (then the VM boots and the API serves it)."""

    vm: VmConfig | None
    api_socket: ApiSocketConfig | None
    verbosity: int = 0
    event_monitor: EventMonitorConfig | None = None
    seccomp: SeccompMode = SeccompMode.TRUE  # the process's filters (docs/seccomp.md), with or without a VM


def aperture_weights(config: VmConfig) -> list[tuple[int, int]]:
    """(mmio32, mmio64) weight of every segment; later `--pci-segment` entries win
    (docs/cli.md#segment-weights)."""
    weights = [(1, 1)] * config.platform.num_pci_segments
    for seg in config.pci_segments:
        weights[seg.pci_segment] = (seg.mmio32_aperture_weight, seg.mmio64_aperture_weight)
    return weights


# ---------------------------------------------------------------------------------------------------
# Keys CH knows but pyvmm does not implement: the values accepted are CH's defaults (what pyvmm does).

_TOGGLE_WORDS = {"on": True, "true": True, "off": False, "false": False}

_CPUS_UNSUPPORTED: Mapping[str, frozenset[str]] = {
    "kvm_hyperv": frozenset({"off"}),
    "affinity": frozenset(),
    "features": frozenset(),
    "nested": frozenset({"on"}),
    "core_scheduling": frozenset({"off"}),
    "profile": frozenset({"host"}),
}
_MEMORY_UNSUPPORTED: Mapping[str, frozenset[str]] = {
    "hotplug_method": frozenset({"acpi"}),
    "hotplug_size": frozenset({"0"}),
    "hotplugged_size": frozenset({"0"}),
    "reserve": frozenset({"off"}),
}
_DISK_UNSUPPORTED: Mapping[str, frozenset[str]] = {
    "iommu": frozenset({"off"}),
    "vhost_user": frozenset({"off"}),
    "socket": frozenset(),
    "bw_size": frozenset(),
    "bw_one_time_burst": frozenset(),
    "bw_refill_time": frozenset(),
    "ops_size": frozenset(),
    "ops_one_time_burst": frozenset(),
    "ops_refill_time": frozenset(),
    "rate_limit_group": frozenset(),
    "queue_affinity": frozenset(),
    "backing_files": frozenset({"off"}),
    "sparse": frozenset({"on"}),
    "lock_granularity": frozenset(),
}
_NET_UNSUPPORTED: Mapping[str, frozenset[str]] = {
    "vhost_user": frozenset({"off"}),
    "socket": frozenset(),
    "vhost_mode": frozenset({"client"}),
    "iommu": frozenset({"off"}),
    **{key: frozenset() for key in ("bw_size", "bw_one_time_burst", "bw_refill_time", "ops_size",
                                    "ops_one_time_burst", "ops_refill_time", "rate_limit_group")},
}
_DEVICE_UNSUPPORTED: Mapping[str, frozenset[str]] = {
    "fd": frozenset(),
    "iommu": frozenset({"off"}),
}
_CONSOLE_UNSUPPORTED: Mapping[str, frozenset[str]] = {"iommu": frozenset({"off"})}
_RNG_UNSUPPORTED: Mapping[str, frozenset[str]] = {"iommu": frozenset({"off"})}
_VSOCK_UNSUPPORTED: Mapping[str, frozenset[str]] = {"iommu": frozenset({"off"})}
_FS_UNSUPPORTED: Mapping[str, frozenset[str]] = {"iommu": frozenset({"off"})}
_PLATFORM_UNSUPPORTED: Mapping[str, frozenset[str]] = {
    # the guest address width a virtio-iommu offers; 64 (the default) is what a guest without one has
    "iommu_address_width": frozenset({"64"}),
    "iommufd": frozenset({"off"}),
    "iommufd_fd": frozenset(),
    "tdx": frozenset({"off"}),
    "sev_snp": frozenset({"off"}),
    **{
        key: frozenset()
        for key in (
            "system_manufacturer",
            "system_product_name",
            "system_version",
            "system_serial_number",
            "system_uuid",
            "system_sku_number",
            "system_family",
            "chassis_asset_tag",
            "oem_strings",
            "serial_number",
            "uuid",
        )
    },
}
_UNSUPPORTED_HINTS = {
    "affinity": "pin the pyvmm process with taskset instead",
    "hotplug_size": "give the whole amount with size=",
    "hotplugged_size": "give the whole amount with size=",
    "iommufd": "the default container/group mode (iommufd=off) is used",
    "iommu_address_width": "it sets a virtio-iommu's address width, and pyvmm has no virtio-iommu",
    "iommu": "a virtio-iommu is not available; leave iommu off",
    "fd": "give the function's sysfs directory with path=",
    "vhost_user": "pyvmm serves --net with the kernel's vhost-net on a tap (tap=)",
    "socket": "pyvmm serves --net with the kernel's vhost-net on a tap (tap=)",
    "vhost_mode": "pyvmm serves --net with the kernel's vhost-net on a tap (tap=)",
}
_NET_HINTS = {
    **{key: "rate limiting is not implemented" for key in ("bw_size", "bw_one_time_burst", "bw_refill_time",
                                                         "ops_size", "ops_one_time_burst", "ops_refill_time",
                                                         "rate_limit_group")},
}


def _refuse_unsupported(opts: Options, table: Mapping[str, frozenset[str]],
                        hints: Mapping[str, str] | None = None) -> None:
    for key, accepted in table.items():
        raw = opts.get(key)
        if raw is None:
            continue
        value = raw.lower()
        if value in _TOGGLE_WORDS and accepted <= {"on", "off"}:
            value = "on" if _TOGGLE_WORDS[value] else "off"
        if value in accepted:
            continue
        what = f"{key}={raw}" if accepted else key
        hint = (hints or {}).get(key) or _UNSUPPORTED_HINTS.get(key)
        raise OptionError(f"{what} is not supported by pyvmm yet" + (f"; {hint}" if hint else ""))


def _check_id(opts: Options) -> str | None:
    ident = opts.get("id")
    if ident is not None and ident.startswith("__"):
        raise OptionError(f"Identifier {ident} is not valid: identifiers must not start with '__'")
    return ident


def _pci_placement(opts: Options) -> tuple[int, int | None]:
    segment = _required_int(opts, "pci_segment", 0, bits=16)
    slot = opts.integer("pci_device_id", None, bits=16)  # wide, so 300 gets the range message
    if slot is not None:
        if slot >= PCI_SLOTS:
            raise OptionError(f"Given PCI device ID ({slot}) is out of the supported range of 0..{PCI_SLOTS}")
        if slot == 0 and segment == 0:
            raise OptionError("Given PCI device ID (0) is reserved (segment 0's host bridge); use 1..31")
    return segment, slot


def _required_int(opts: Options, key: str, default: int, bits: int) -> int:
    value = opts.integer(key, default, bits=bits)
    assert value is not None
    return value


# ---------------------------------------------------------------------------------------------------
# One parser per flag. Each takes the option string and raises OptionError (the caller adds the flag).

_CPUS_KEYS = frozenset({"boot", "max", "topology", "max_phys_bits"})
_BARE_NUMBER = re.compile(r"\d+")


def parse_topology(text: str) -> CpuTopology:
    parts = text.split(":")
    example = "e.g. topology=1:2:1:1 for 2 single-threaded cores"
    if len(parts) != 4:
        raise OptionError(
            f"topology={text} must have 4 parts threads_per_core:cores_per_die:dies_per_package:packages, "
            + example
        )
    numbers = [int(p) for p in parts if _BARE_NUMBER.fullmatch(p.strip())]
    if len(numbers) != 4 or any(n > 255 for n in numbers):
        raise OptionError(f"topology={text}: each part must be an integer 1..255, {example}")
    if 0 in numbers:
        raise OptionError("No part of the CPU topology can be zero")
    topo = CpuTopology(*numbers)
    if topo.threads_per_core > 2:
        raise OptionError("CPU topology supports at most 2 threads per core")
    return topo


def parse_cpus(text: str) -> CpusConfig:
    if _BARE_NUMBER.fullmatch(text.strip()):
        text = f"boot={text.strip()}"  # older walkthroughs write `--cpus 2`
    return cpus_from_options(parse_options(text, _CPUS_KEYS, hidden=_CPUS_UNSUPPORTED))


def cpus_from_options(opts: Options) -> CpusConfig:
    """--cpus (or the API's `cpus` object) from its parsed keys: every check of the flag."""
    _refuse_unsupported(opts, _CPUS_UNSUPPORTED)
    boot = _required_int(opts, "boot", 1, bits=32)
    max_vcpus = _required_int(opts, "max", boot, bits=32)
    if boot == 0:
        raise OptionError("boot=0: a VM needs at least one vCPU")
    for n in (boot, max_vcpus):
        if n > MAX_VCPUS:
            raise OptionError(f"Too many CPUs: specified {n} but {MAX_VCPUS} is the limit")
    if max_vcpus < boot:
        raise OptionError(f"Max CPUs ({max_vcpus}) lower than boot CPUs ({boot})")
    if max_vcpus > boot:
        raise OptionError(
            f"CPU hotplug (max={max_vcpus} above boot={boot}) is not supported by pyvmm yet; "
            "drop max= or make it equal to boot"
        )
    topo_text = opts.get("topology")
    topology = parse_topology(topo_text) if topo_text is not None else None
    if topology is not None and topology.vcpus != max_vcpus:
        raise OptionError(
            f"Product of CPU topology parts does not match maximum vCPU ({topology.vcpus} != {max_vcpus})"
        )
    phys_bits = _required_int(opts, "max_phys_bits", layout.DEFAULT_MAX_PHYS_BITS, bits=8)
    if not 32 < phys_bits <= 64:
        raise OptionError(
            f"max_phys_bits={phys_bits} must be in 33..64 (default {layout.DEFAULT_MAX_PHYS_BITS})"
        )
    return CpusConfig(boot=boot, max=max_vcpus, topology=topology, max_phys_bits=phys_bits)


_MEMORY_KEYS = frozenset({"size", "shared", "hugepages", "hugepage_size", "prefault", "thp", "mergeable"})


def parse_memory(text: str) -> MemoryConfig:
    try:
        opts = parse_options(text, _MEMORY_KEYS, hidden=_MEMORY_UNSUPPORTED)
    except OptionError as e:
        if "=" not in text and "," not in text:
            try:
                parse_byte_size(text)
            except OptionError:
                pass
            else:
                raise OptionError(f"{e}; did you mean size={text.strip()}?") from None
        raise
    return memory_from_options(opts)


def memory_from_options(opts: Options) -> MemoryConfig:
    _refuse_unsupported(opts, _MEMORY_UNSUPPORTED)
    size = opts.byte_size("size", 512 * layout.MiB)
    assert size is not None
    if size == 0:
        raise OptionError(
            "size=0 (memory zones) is not supported by pyvmm yet; give the RAM size, e.g. size=1G"
        )
    hugepages = opts.toggle("hugepages", False)
    hugepage_size = opts.byte_size("hugepage_size")
    if hugepage_size is not None:
        if not hugepages:
            raise OptionError("Huge page size specified but huge pages not enabled: add hugepages=on")
        if hugepage_size & (hugepage_size - 1) or hugepage_size == 0:
            raise OptionError(f"Huge page size is not power of 2: {hugepage_size}")
    align = hugepage_size or PAGE_SIZE
    if size % align:
        raise OptionError(
            f"Memory size is misaligned with default page size or its hugepage size: {size} is not a "
            f"multiple of {align}"
        )
    shared = opts.toggle("shared", False)
    mergeable = opts.toggle("mergeable", False)
    if shared and mergeable:
        raise OptionError("Invalid to set both 'mergeable' and 'shared' for memory")
    if hugepages and mergeable:
        # cloud-hypervisor accepts it, but hugetlb RAM is mapped shared and KSM never merges it
        raise OptionError("Invalid to set both 'mergeable' and 'hugepages' for memory: KSM does not merge "
                          "huge pages")
    return MemoryConfig(
        size=size,
        shared=shared,
        hugepages=hugepages,
        hugepage_size=hugepage_size,
        prefault=opts.toggle("prefault", False),
        thp=opts.toggle("thp", True),
        mergeable=mergeable,
    )


_CONSOLE_VALUELESS = ("off", "pty", "tty", "null")  # CH's order: the first one present wins
_SERIAL_KEYS = frozenset({"file", "socket"})
_CONSOLE_KEYS = frozenset({"file", "socket", "id", "pci_segment", "pci_device_id"})


def parse_console(text: str, flag: str = "--console") -> ConsoleConfig:
    """`--serial` (flag="--serial") or `--console`: a mode and, for --console, PCI placement."""
    is_console = flag == "--console"
    if is_console:
        opts = parse_options(text, _CONSOLE_KEYS, _CONSOLE_VALUELESS, hidden=_CONSOLE_UNSUPPORTED)
    else:
        opts = parse_options(text, _SERIAL_KEYS, _CONSOLE_VALUELESS)
    return console_from_options(opts, flag)


def console_from_options(opts: Options, flag: str = "--console") -> ConsoleConfig:
    is_console = flag == "--console"
    mode: ConsoleMode | None = next((ConsoleMode(m) for m in _CONSOLE_VALUELESS if m in opts.flags), None)
    path: Path | None = None
    if mode is None:
        for key in ("file", "socket"):
            if opts.has(key) or key in opts.blank:
                mode = ConsoleMode(key)
                raw = opts.get(key)
                if raw is None:
                    raise OptionError(f"Path missing when using {key} console mode: write {key}=<path>")
                path = Path(raw)
                break
    if mode is None:
        raise OptionError("invalid console mode given: use off, null, tty, pty, file=<path> or socket=<path>")
    allowed = CONSOLE_MODES if is_console else SERIAL_MODES
    if mode not in allowed:
        names = ", ".join(m.value for m in ConsoleMode if m in allowed)
        raise OptionError(f"{mode.value} is not supported by pyvmm yet for {flag}; use one of {names}")
    if not is_console:
        return ConsoleConfig(mode=mode, path=path)
    _refuse_unsupported(opts, _CONSOLE_UNSUPPORTED)
    segment, slot = _pci_placement(opts)
    return ConsoleConfig(mode=mode, path=path, id=_check_id(opts), pci_segment=segment, pci_device_id=slot)


_DISK_KEYS = frozenset({
    "path", "readonly", "direct", "id", "num_queues", "queue_size", "pci_segment", "pci_device_id",
    "serial", "image_type", "_disable_io_uring", "_disable_aio",
})  # fmt: skip


# A vhost-user disk's image is the backend's: the options about opening an image are refused with it.
_VHOST_USER_DISK_REFUSED = ("path", "readonly", "direct", "image_type", "serial", "_disable_io_uring",
                            "_disable_aio", "backing_files", "sparse", "lock_granularity")
_DISK_HINTS = {
    "vhost_user": "vhost-user disks are taken on the command line only (--disk vhost_user=on,socket=PATH)",
    "socket": "socket= is a vhost-user backend's: give it on the command line with vhost_user=on",
}


def parse_disk(text: str) -> DiskConfig:
    return disk_from_options(parse_options(text, _DISK_KEYS | {"vhost_user", "socket"},
                                           hidden=_DISK_UNSUPPORTED), vhost_user_allowed=True)


def _vhost_user_disk(opts: Options) -> DiskConfig:
    """`vhost_user=on,socket=PATH[,num_queues=,queue_size=,id=,pci_segment=,pci_device_id=]`."""
    for key in _VHOST_USER_DISK_REFUSED:
        if opts.has(key) or key in opts.blank:
            raise OptionError(f"{key}= cannot be used with vhost_user=on: the vhost-user backend serves the "
                              "image and decides that")
    socket = opts.get("socket")
    if socket is None:
        raise OptionError("No socket provided when using vhost-user: add socket=<path of the backend's "
                          "Unix socket>")
    _refuse_unsupported(opts, {k: v for k, v in _DISK_UNSUPPORTED.items()
                               if k not in ("vhost_user", "socket")})
    num_queues, queue_size = _disk_queues(opts)
    segment, slot = _pci_placement(opts)
    return DiskConfig(path=None, id=_check_id(opts), num_queues=num_queues, queue_size=queue_size,
                      pci_segment=segment, pci_device_id=slot, vhost_user=True, socket=Path(socket))


def _disk_queues(opts: Options) -> tuple[int, int]:
    num_queues = _required_int(opts, "num_queues", 1, bits=16)
    if num_queues == 0:
        raise OptionError("num_queues must be at least 1")
    queue_size = _required_int(opts, "queue_size", 128, bits=16)
    if queue_size & (queue_size - 1) or queue_size == 0:
        raise OptionError(f"Queue size must be a power of 2, e.g. 128 or 256, not {queue_size}")
    if queue_size <= 2:
        raise OptionError(f"Block queue size must be greater than 2: {queue_size}")
    return num_queues, queue_size


def disk_from_options(opts: Options, vhost_user_allowed: bool = False) -> DiskConfig:
    """A --disk (`vhost_user_allowed`: the command line's, which may name a vhost-user backend; the API's
    vm.add-disk and VmConfig disks may not)."""
    if vhost_user_allowed:
        if opts.toggle("vhost_user", False):
            return _vhost_user_disk(opts)
        if opts.has("socket"):
            raise OptionError("socket= is a vhost-user backend's: add vhost_user=on")
    _refuse_unsupported(opts, _DISK_UNSUPPORTED, _DISK_HINTS)
    # The daemon serving a disk uses io_uring unless told not to; nothing uses Linux AIO, so the hidden
    # switch that disables it has nothing to disable.
    disable_io_uring = opts.toggle("_disable_io_uring", False)
    opts.toggle("_disable_aio", False)
    path = opts.get("path")
    if path is None:
        raise OptionError("path missing: give the raw disk image, e.g. path=rootfs.img")
    image_type = ImageType.RAW
    raw_type = opts.get("image_type")
    if raw_type is not None:
        try:
            image_type = ImageType(raw_type.lower())
        except ValueError:
            names = ", ".join(t.value for t in ImageType)
            raise OptionError(f"image_type={raw_type} is not one of {names}") from None
        if image_type not in SUPPORTED_IMAGE_TYPES:
            raise OptionError(
                f"image_type={image_type.value} is not supported by pyvmm yet; only raw images are "
                "(convert with: qemu-img convert -O raw <image> <image>.raw)"
            )
    num_queues, queue_size = _disk_queues(opts)
    serial = opts.get("serial")
    if serial is not None and len(serial.encode()) > MAX_DISK_SERIAL_BYTES:
        raise OptionError(
            f"serial is {len(serial.encode())} bytes; virtio-blk allows at most {MAX_DISK_SERIAL_BYTES}"
        )
    segment, slot = _pci_placement(opts)
    return DiskConfig(
        path=Path(path),
        readonly=opts.toggle("readonly", False),
        direct=opts.toggle("direct", False),
        id=_check_id(opts),
        num_queues=num_queues,
        queue_size=queue_size,
        pci_segment=segment,
        pci_device_id=slot,
        serial=serial,
        image_type=image_type,
        disable_io_uring=disable_io_uring,
    )


_NET_KEYS = frozenset({
    "tap", "ip", "mask", "mac", "host_mac", "mtu", "num_queues", "queue_size", "id", "pci_segment",
    "pci_device_id", "offload_tso", "offload_ufo", "offload_csum", "fd",
})  # fmt: skip
NET_DEFAULT_IP = ipaddress.IPv4Address("192.168.249.1")  # cloud-hypervisor's, for a tap it creates
NET_DEFAULT_MASK = ipaddress.IPv4Address("255.255.255.0")
NET_MIN_MTU = 68
NET_MAX_MTU = 65535
NET_MAX_QUEUE_SIZE = 32768
IFNAMSIZ = 16


def parse_net(text: str) -> NetConfig:
    return net_from_options(parse_options(text, _NET_KEYS, hidden=_NET_UNSUPPORTED))


def parse_mac(key: str, text: str) -> bytes:
    """`12:34:56:78:9a:bc` -> 6 bytes; a multicast address is refused (it cannot be a NIC's)."""
    parts = text.split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{1,2}", p) for p in parts):
        raise OptionError(f"{key}={text} is not a MAC address like 12:34:56:78:9a:bc")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise OptionError(f"{key}={text} is a multicast address; the first byte must be even")
    return mac


def random_mac() -> bytes:
    """A random locally administered unicast MAC, as cloud-hypervisor gives a --net without mac=."""
    mac = bytearray(os.urandom(6))
    mac[0] = (mac[0] & 0xFE) | 0x02
    return bytes(mac)


def _ipv4(opts: Options, key: str) -> ipaddress.IPv4Address | None:
    raw = opts.get(key)
    if raw is None:
        return None
    try:
        return ipaddress.IPv4Address(raw)
    except ValueError:
        raise OptionError(f"{key}={raw} is not an IPv4 address like 192.168.249.1") from None


def net_from_options(opts: Options) -> NetConfig:
    _refuse_unsupported(opts, _NET_UNSUPPORTED, _NET_HINTS)
    tap = opts.get("tap")
    if tap is not None and (not tap or len(tap.encode()) >= IFNAMSIZ or "/" in tap or tap.strip() != tap
                            or tap in (".", "..")):
        raise OptionError(f"tap={tap} is not an interface name (1-{IFNAMSIZ - 1} bytes, no '/' or spaces)")
    mask = _ipv4(opts, "mask")
    if mask is not None:
        try:
            ipaddress.IPv4Network(f"0.0.0.0/{mask}")
        except ValueError:
            raise OptionError(f"mask={mask} is not a netmask like 255.255.255.0") from None
    mac_text = opts.get("mac")
    host_mac_text = opts.get("host_mac")
    mtu = opts.integer("mtu", None, bits=32)
    if mtu is not None and not NET_MIN_MTU <= mtu <= NET_MAX_MTU:
        raise OptionError(f"mtu={mtu} is out of range {NET_MIN_MTU}..{NET_MAX_MTU}")
    fds = _tap_fds(opts, tap)
    num_queues = _required_int(opts, "num_queues", 2 * len(fds) or 2, bits=16)
    if num_queues < 2 or num_queues % 2:
        raise OptionError(f"num_queues={num_queues}: give an even number of at least 2 "
                          "(one receive and one transmit queue per pair)")
    if fds and num_queues != 2 * len(fds):
        # cloud-hypervisor's rule: every tap queue file serves one receive + transmit pair
        raise OptionError(f"fd=[{','.join(map(str, fds))}] is {len(fds)} tap queue file(s), so num_queues is "
                          f"{2 * len(fds)}, not {num_queues}; leave num_queues out or give one file per pair")
    queue_size = _required_int(opts, "queue_size", 256, bits=16)
    if queue_size < 2 or queue_size & (queue_size - 1):
        raise OptionError(f"Queue size must be a power of 2 of at least 2, e.g. 256, not {queue_size}")
    segment, slot = _pci_placement(opts)
    return NetConfig(
        fds=fds,
        tap=tap,
        ip=_ipv4(opts, "ip"),
        mask=mask,
        mac=parse_mac("mac", mac_text) if mac_text is not None else random_mac(),
        host_mac=parse_mac("host_mac", host_mac_text) if host_mac_text is not None else None,
        mtu=mtu,
        num_queues=num_queues,
        queue_size=queue_size,
        id=_check_id(opts),
        pci_segment=segment,
        pci_device_id=slot,
        offload_tso=opts.toggle("offload_tso", True),
        offload_ufo=opts.toggle("offload_ufo", True),
        offload_csum=opts.toggle("offload_csum", True),
    )


def _tap_fds(opts: Options, tap: str | None) -> tuple[int, ...]:
    """fd=[3,4]: the tap's queue files, inherited from whoever started pyvmm (checked open and a tap's by
    check_paths)."""
    if opts.get("fd") is None:
        return ()
    fds = opts.int_list("fd")
    if not fds:
        raise OptionError("fd=[] names no file: give the tap's queue files, e.g. fd=[3,4]")
    if tap is not None:
        raise OptionError(f"fd= and tap={tap} both name the tap: give one of them")
    low = [fd for fd in fds if fd <= 2]
    if low:
        raise OptionError(f"fd={low[0]} is standard input, output or error, not a tap's queue file")
    twice = sorted({fd for fd in fds if fds.count(fd) > 1})
    if twice:
        raise OptionError(f"fd={twice[0]} is given twice: each queue file once")
    return tuple(fds)


def net_fds_text(fds: Sequence[int]) -> str:
    return "fd=[" + ",".join(str(fd) for fd in fds) + "]"


def net_label(net: NetConfig) -> str:
    if net.fds:
        return f"--net {net_fds_text(net.fds)}"
    return f"--net tap={net.tap}" if net.tap is not None else "--net"


_DEVICE_KEYS = frozenset({
    "path", "id", "pci_segment", "pci_device_id", "x_nv_gpudirect_clique", "x_exclude_mmap_bars", "managed",
    "x_allow_no_reset", "x_msix_relocation",  # pyvmm-only (docs/cli.md#passthrough-devices)
})  # fmt: skip


def parse_device(text: str) -> DeviceConfig:
    return device_from_options(parse_options(text, _DEVICE_KEYS, hidden=_DEVICE_UNSUPPORTED))


def device_from_options(opts: Options) -> DeviceConfig:
    _refuse_unsupported(opts, _DEVICE_UNSUPPORTED)
    path = opts.get("path")
    if path is None:
        raise OptionError(
            "VFIO device config must specify path=: the host function's sysfs directory, "
            "e.g. path=/sys/bus/pci/devices/0000:01:00.0/"
        )
    clique = opts.integer("x_nv_gpudirect_clique", None, bits=8)
    if clique is not None and clique > MAX_CLIQUE_ID:
        raise OptionError(
            f"x_nv_gpudirect_clique={clique} is out of range 0..{MAX_CLIQUE_ID} "
            "(the P2P capability holds a 4-bit clique id)"
        )
    bars = opts.int_list("x_exclude_mmap_bars")
    for bar in bars:
        if bar > MAX_BAR_INDEX:
            raise OptionError(f"x_exclude_mmap_bars entry {bar} is out of range 0..{MAX_BAR_INDEX}")
    segment, slot = _pci_placement(opts)
    return DeviceConfig(
        path=Path(path),
        id=_check_id(opts),
        pci_segment=segment,
        pci_device_id=slot,
        x_nv_gpudirect_clique=clique,
        x_exclude_mmap_bars=tuple(sorted(set(bars))),
        managed=opts.toggle("managed", False),
        x_allow_no_reset=opts.toggle("x_allow_no_reset", False),
        x_msix_relocation=opts.toggle("x_msix_relocation", False),
    )


_PLATFORM_KEYS = frozenset({
    "num_pci_segments", "iommu_segments", "vfio_p2p_dma",
    "allow_unsafe_interrupts", "x_max_msi_routes",  # pyvmm-only (docs/cli.md#platform)
})


def parse_platform(text: str) -> PlatformConfig:
    return platform_from_options(parse_options(text, _PLATFORM_KEYS, hidden=_PLATFORM_UNSUPPORTED))


def platform_from_options(opts: Options) -> PlatformConfig:
    _refuse_unsupported(opts, _PLATFORM_UNSUPPORTED)
    num = _required_int(opts, "num_pci_segments", 1, bits=16)
    if not 1 <= num <= MAX_PCI_SEGMENTS:
        raise OptionError(f"Number of PCI segments ({num}) not in range of 1 to {MAX_PCI_SEGMENTS}")
    iommu_segments = opts.int_list("iommu_segments")
    for seg in iommu_segments:
        if seg >= num:
            raise OptionError(f"Invalid PCI segment id: {seg} in iommu_segments (num_pci_segments={num})")
    if iommu_segments:
        raise OptionError("iommu_segments is not supported by pyvmm yet (it needs a virtio-iommu)")
    routes = _required_int(opts, "x_max_msi_routes", layout.MSI_ROUTES_MAX, bits=32)
    if not 1 <= routes <= layout.MSI_ROUTES_MAX:
        raise OptionError(f"x_max_msi_routes={routes} is out of range 1..{layout.MSI_ROUTES_MAX}")
    return PlatformConfig(
        num_pci_segments=num,
        vfio_p2p_dma=opts.toggle("vfio_p2p_dma", True),
        allow_unsafe_interrupts=opts.toggle("allow_unsafe_interrupts", False),
        x_max_msi_routes=routes,
    )


_PCI_SEGMENT_KEYS = frozenset({"pci_segment", "mmio32_aperture_weight", "mmio64_aperture_weight"})


def parse_pci_segment(text: str) -> PciSegmentConfig:
    return pci_segment_from_options(parse_options(text, _PCI_SEGMENT_KEYS))


def pci_segment_from_options(opts: Options) -> PciSegmentConfig:
    weights = []
    for key in ("mmio32_aperture_weight", "mmio64_aperture_weight"):
        weight = _required_int(opts, key, 1, bits=32)
        if weight == 0:
            raise OptionError(f"Invalid PCI segment aperture weight: 0 ({key}); weights start at 1")
        weights.append(weight)
    return PciSegmentConfig(_required_int(opts, "pci_segment", 0, bits=16), *weights)


# ---------------------------------------------------------------------------------------------------
# Checks across flags.


def _device_label(kind: str, path: Path) -> str:
    return f"{kind} path={path}"


def parse_rng(text: str) -> RngConfig:
    """`--rng src=<path>[,iommu=off]`: cloud-hypervisor's keys (src defaults to /dev/urandom)."""
    return rng_from_options(parse_options(text, {"src"}, hidden=_RNG_UNSUPPORTED))


def rng_from_options(opts: Options) -> RngConfig:
    _refuse_unsupported(opts, _RNG_UNSUPPORTED)
    src = opts.get("src")
    return RngConfig(src=Path(src) if src is not None else DEFAULT_RNG_SOURCE)


_VSOCK_KEYS = frozenset({"cid", "socket", "id", "pci_segment", "pci_device_id"})


def parse_vsock(text: str) -> VsockConfig:
    """`--vsock cid=<n>,socket=<path>[,id=,pci_segment=,pci_device_id=,iommu=off]` (cloud-hypervisor's
    keys; both cid and socket are required)."""
    return vsock_from_options(parse_options(text, _VSOCK_KEYS, hidden=_VSOCK_UNSUPPORTED))


def vsock_from_options(opts: Options) -> VsockConfig:
    _refuse_unsupported(opts, _VSOCK_UNSUPPORTED)
    cid = opts.integer("cid", None, bits=64)
    if cid is None:
        raise OptionError("cid= is required: the guest's vsock address, e.g. cid=3")
    if not MIN_VSOCK_CID <= cid <= MAX_VSOCK_CID:
        raise OptionError(f"cid={cid} is out of range: use {MIN_VSOCK_CID}..{MAX_VSOCK_CID} (0-2 are "
                          "reserved: 2 is the host)")
    path = opts.get("socket")
    if not path:
        raise OptionError("socket= is required: the Unix socket path host programs connect to")
    # PATH_<port> (up to 11 more bytes) must fit a Unix socket address as well
    if len(os.fsencode(path)) + 11 > UNIX_PATH_MAX:
        raise OptionError(f"socket={path} is too long: a Unix socket path has at most {UNIX_PATH_MAX} "
                          "bytes and PATH_<port> needs up to 11 more; use a shorter path")
    segment, slot = _pci_placement(opts)
    return VsockConfig(cid=cid, socket=Path(path), id=_check_id(opts), pci_segment=segment,
                       pci_device_id=slot)


_FS_KEYS = frozenset({"tag", "socket", "num_queues", "queue_size", "id", "pci_segment", "pci_device_id"})


def parse_fs(text: str) -> FsConfig:
    """`--fs tag=<tag>,socket=<path>[,num_queues=,queue_size=,id=,pci_segment=,pci_device_id=]`
    (cloud-hypervisor's keys and defaults; docs/virtio-fs.md)."""
    return fs_from_options(parse_options(text, _FS_KEYS, hidden=_FS_UNSUPPORTED))


def fs_from_options(opts: Options) -> FsConfig:
    _refuse_unsupported(opts, _FS_UNSUPPORTED)
    tag = opts.get("tag")
    if not tag:
        raise OptionError("tag= is required: the name the guest mounts (mount -t virtiofs <tag> <dir>), "
                          "e.g. tag=myfs")
    size = len(tag.encode())
    if size > VIRTIO_FS_TAG_MAX:
        raise OptionError(f"tag={tag} is {size} bytes: the virtio-fs tag has at most {VIRTIO_FS_TAG_MAX}; "
                          "use a shorter one")
    # The guest reads the tag up to its first NUL; newer Linux refuses a tag with a newline (sysfs shows it).
    if "\0" in tag or "\n" in tag:
        raise OptionError("the tag must not contain a NUL or a newline")
    socket = opts.get("socket")
    if not socket:
        raise OptionError("socket= is required: the Unix socket the vhost-user backend (virtiofsd "
                          "--socket-path=) listens on")
    num_queues = _required_int(opts, "num_queues", FS_DEFAULT_NUM_QUEUES, bits=16)
    if num_queues == 0:
        raise OptionError("num_queues must be at least 1 (request queues; the guest driver needs one)")
    queue_size = _required_int(opts, "queue_size", FS_DEFAULT_QUEUE_SIZE, bits=16)
    if queue_size & (queue_size - 1) or queue_size < 2:
        raise OptionError(f"Queue size must be a power of 2 of at least 2, e.g. 1024, not {queue_size}")
    segment, slot = _pci_placement(opts)
    return FsConfig(tag=tag, socket=Path(socket), num_queues=num_queues, queue_size=queue_size,
                    id=_check_id(opts), pci_segment=segment, pci_device_id=slot)


def _normalised(path: Path) -> str:
    return os.path.realpath(path)  # also resolves /sys/bus/pci/devices/<BDF> symlinks


def validate(config: VmConfig) -> None:
    """Cross-flag checks of a parsed VmConfig (no file system access)."""
    num = config.platform.num_pci_segments
    boot = config.cpus.boot

    def check_segment(label: str, segment: int) -> None:
        if segment >= num:
            raise ConfigError(
                label,
                f"Invalid PCI segment id: {segment} (there are {num} segment(s); "
                f"raise --platform num_pci_segments)",
            )

    ids: dict[str, str] = {}
    slots: dict[tuple[int, int], str] = {}

    def claim(label: str, ident: str | None, segment: int, slot: int | None) -> None:
        check_segment(label, segment)
        if ident is not None:
            if ident in ids:
                raise ConfigError(label, f"Identifier {ident} is not unique (also used by {ids[ident]})")
            ids[ident] = label
        if slot is not None:
            if (segment, slot) in slots:
                raise ConfigError(
                    label,
                    f"PCI device ID {slot} on segment {segment} is already taken by {slots[segment, slot]}",
                )
            slots[segment, slot] = label

    console = config.console
    if console.mode is ConsoleMode.TTY and config.serial.mode is ConsoleMode.TTY:
        # cloud-hypervisor refuses this too: two devices would read the same terminal's keystrokes
        raise ConfigError("--serial tty --console tty", "only one of them can use the terminal; give the "
                          "other another mode (e.g. --console off, or --serial null)")
    if console.mode is not ConsoleMode.OFF:
        claim("--console", console.id, console.pci_segment, console.pci_device_id)
    for disk in config.disks:
        label = disk.label
        claim(label, disk.id, disk.pci_segment, disk.pci_device_id)
        if disk.num_queues > boot:
            raise ConfigError(label, f"Queue count ({disk.num_queues}) must not exceed boot vCPUs ({boot})")
        if disk.vhost_user and not (config.memory.shared or config.memory.hugepages):
            # the backend maps guest RAM from its memfd: private memory has none to hand over
            raise ConfigError(label, "Using vhost-user requires using shared memory or huge pages: add "
                                     "--memory shared=on (or hugepages=on)")
    for fs in config.fs:
        claim(fs.label, fs.id, fs.pci_segment, fs.pci_device_id)
        if fs.num_queues > boot:  # cloud-hypervisor's rule, as for disks
            raise ConfigError(fs.label, f"Queue count ({fs.num_queues}) must not exceed boot vCPUs ({boot})")
        if not (config.memory.shared or config.memory.hugepages):
            # virtiofsd maps guest RAM from its memfd: private memory has none to hand over
            raise ConfigError(fs.label, "Using vhost-user requires using shared memory or huge pages: add "
                                        "--memory shared=on (or hugepages=on)")
    if config.vsock is not None:
        vsock = config.vsock
        claim(f"--vsock socket={vsock.socket}", vsock.id, vsock.pci_segment, vsock.pci_device_id)
    taps: set[str] = set()
    fds: set[int] = set()
    for net in config.nets:
        label = net_label(net)
        claim(label, net.id, net.pci_segment, net.pci_device_id)
        if net.queue_pairs > boot:
            raise ConfigError(label, f"num_queues={net.num_queues} is {net.queue_pairs} queue pairs, more "
                                     f"than the {boot} boot vCPUs")
        if net.tap is not None:
            if net.tap in taps:
                raise ConfigError(label, f"tap {net.tap} is given to two --net devices")
            taps.add(net.tap)
        for fd in net.fds:
            if fd in fds:
                raise ConfigError(label, f"fd={fd} is given to two --net devices")
            fds.add(fd)
    seen_paths: dict[str, Path] = {}
    for dev in config.devices:
        label = _device_label("--device", dev.path)
        claim(label, dev.id, dev.pci_segment, dev.pci_device_id)
        key = _normalised(dev.path)
        if key in seen_paths:
            raise ConfigError(
                label, f"Duplicated device path: {dev.path} (same function as {seen_paths[key]})"
            )
        seen_paths[key] = dev.path
        if dev.x_nv_gpudirect_clique is not None and not config.platform.vfio_p2p_dma:
            raise ConfigError(
                label, "Device with x_nv_gpudirect_clique requires vfio_p2p_dma=on (--platform)"
            )
    for seg in config.pci_segments:
        check_segment(f"--pci-segment pci_segment={seg.pci_segment}", seg.pci_segment)

    start, end = layout.mmio64_area(config.memory.size, config.cpus.max_phys_bits)
    if end <= start:
        raise ConfigError(
            "--cpus",
            f"max_phys_bits={config.cpus.max_phys_bits} leaves no room for 64-bit PCI BARs above "
            f"{config.memory.size >> 20} MiB of RAM; raise it (default {layout.DEFAULT_MAX_PHYS_BITS})",
        )


# ---------------------------------------------------------------------------------------------------
# Files and PCI functions (kept apart so that grammar tests need no files).


def _check_tap_fds(net: NetConfig) -> None:
    """--net fd=[...]: each an open queue file of one tap with the flags virtio-net needs (host/tap.py)."""
    from pyvmm.host.tap import TapError, check_tap_fds

    try:
        check_tap_fds(net.fds)
    except TapError as exc:
        raise ConfigError(net_label(net), str(exc)) from None


def _check_readable_file(label: str, path: Path, what: str) -> None:
    if not path.exists():
        raise ConfigError(label, f"{what} {path} does not exist")
    if path.is_dir():
        raise ConfigError(label, f"{what} {path} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(label, f"{what} {path} is not readable (check its permissions)")


def check_paths(config: VmConfig) -> None:
    """Check that the kernel, initramfs, disk images, device directories and output files can be used."""
    payload = config.payload
    if payload.kernel is not None:
        _check_readable_file("--kernel", payload.kernel, "kernel")
    if payload.initramfs is not None:
        _check_readable_file("--initramfs", payload.initramfs, "initramfs")
    for disk in config.disks:
        if disk.path is None:  # vhost-user: the backend's socket is tried when the VM is built
            continue
        label = disk.label
        _check_readable_file(label, disk.path, "disk image")
        if not disk.readonly and not os.access(disk.path, os.W_OK):
            raise ConfigError(
                label, f"disk image {disk.path} is not writable; add readonly=on or fix permissions"
            )
    for dev in config.devices:
        label = _device_label("--device", dev.path)
        if not dev.path.is_dir():
            hint = ""
            if "/" not in str(dev.path):
                hint = f"; give the sysfs directory, e.g. path=/sys/bus/pci/devices/{dev.path}/"
            raise ConfigError(label, f"{dev.path} is not a directory{hint}")
        if not (dev.path / "config").is_file() or not (dev.path / "vendor").is_file():
            raise ConfigError(
                label,
                f"{dev.path} is not a PCI function (no config/vendor files); "
                "expected a directory like /sys/bus/pci/devices/0000:01:00.0/",
            )
    for net in config.nets:
        if net.fds:
            _check_tap_fds(net)
    _check_rng_source(config.rng.src)
    if config.vsock is not None:
        sock = config.vsock.socket
        label = f"--vsock socket={sock}"
        if not sock.parent.is_dir():
            raise ConfigError(label, f"directory {sock.parent} does not exist")
        if os.path.lexists(sock):
            raise ConfigError(label, f"{sock} already exists (a socket left by an earlier VM?); remove it")
    for flag, console in (("--serial", config.serial), ("--console", config.console)):
        if console.path is not None:
            parent = console.path.parent
            if not parent.is_dir():
                raise ConfigError(
                    f"{flag} {console.mode.value}={console.path}", f"directory {parent} does not exist"
                )


def _check_rng_source(src: Path) -> None:
    """--rng src= must be a readable regular file or character device (a FIFO or socket could block)."""
    label = f"--rng src={src}"
    try:
        mode = src.stat().st_mode
    except OSError as exc:
        raise ConfigError(label, f"entropy source {src}: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
        raise ConfigError(label, f"entropy source {src} is not a regular file or character device "
                                 "(e.g. src=/dev/urandom)")
    if not os.access(src, os.R_OK):
        raise ConfigError(label, f"entropy source {src} is not readable (check its permissions)")


# ---------------------------------------------------------------------------------------------------
# argparse.

_DESCRIPTION = """\
pyvmm: a virtual machine monitor on Linux KVM for VFIO PCI passthrough, with cloud-hypervisor's
command line. Structured options take one string of comma-separated key=value items; put a value that
contains commas in double quotes, and write lists in brackets: x_exclude_mmap_bars=[0,2-3]. An option
given as key= keeps its default; a key given twice keeps its last value. Sizes take the binary suffixes
K, M, G (upper case). Toggles are on|off (or true|false)."""

_EPILOG = """\
examples:
  boot a kernel with its console on the serial port:
    pyvmm --kernel bzImage --initramfs initrd.img --cmdline "console=ttyS0" \\
          --serial tty --console off

  pass through two host PCI functions, with 4 vCPUs, 4 GiB RAM and a raw root disk:
    pyvmm --kernel bzImage --cmdline "console=ttyS0 root=/dev/vda rw" \\
          --cpus boot=4 --memory size=4G --disk path=rootfs.img,image_type=raw \\
          --device path=/sys/bus/pci/devices/0000:01:00.0/ path=/sys/bus/pci/devices/0000:02:00.0/ \\
          --serial tty --console off

  two PCI segments, segment 0 getting 2/3 of the 32-bit MMIO space, a GPU on segment 1:
    pyvmm ... --platform num_pci_segments=2 \\
          --pci-segment pci_segment=0,mmio32_aperture_weight=2 \\
          --device path=/sys/bus/pci/devices/0000:41:00.0/,pci_segment=1,x_nv_gpudirect_clique=0

A function passed through must be bound to vfio-pci first (or given managed=on), e.g.:
  echo vfio-pci > /sys/bus/pci/devices/0000:01:00.0/driver_override
  echo 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind
  echo 0000:01:00.0 > /sys/bus/pci/drivers_probe

Exit status 2 means a command-line error."""

_HELP = {
    "--kernel": "guest kernel, a Linux bzImage (required)",
    "--initramfs": "initramfs image, loaded at the top of RAM below 3 GiB",
    "--cmdline": f"""kernel command line, passed verbatim, at most {layout.CMDLINE_MAX_SIZE - 1} bytes
  e.g. "console=ttyS0 root=/dev/vda rw\"""",
    "--cpus": f"""vCPUs (a bare number N means boot=N):
  boot=<n>              vCPUs at boot (default 1)
  max=<n>               must equal boot: CPU hotplug is not supported yet
  topology=<t>:<c>:<d>:<p>
                        threads per core (1-2) : cores per die : dies per
                        package : packages; the product must equal max
  max_phys_bits=<bits>  cap on guest physical address bits (default {layout.DEFAULT_MAX_PHYS_BITS})""",
    "--memory": """guest RAM (VFIO pins it, so all of it is allocated at start):
  size=<size>           RAM size, e.g. 4G (default 512M)
  shared=on|off         back RAM with a memfd mapped shared (default off)
  hugepages=on|off      back RAM with hugetlb pages from the host's pool
                        (/proc/sys/vm/nr_hugepages), mapped shared (default off)
  hugepage_size=<size>  huge page size, e.g. 2M or 1G (default: the host's)
  prefault=on|off       populate all RAM at start (default off)
  thp=on|off            transparent huge pages; not with hugepages (default on)
  mergeable=on|off      KSM; not with shared=on or hugepages=on (default off)""",
    "--serial": """16550 UART COM1 (I/O port 0x3f8, IRQ 4), one of (default null):
  off | null | tty | file=<path>  (pty and socket= are not supported yet)""",
    "--console": """virtio-console PCI device, the guest's hvc0 (default tty):
  off | null | tty | file=<path>  (pty and socket= are not supported yet)
  tty is refused when --serial is tty too (use --serial tty --console off)
  id=<name>, pci_segment=<n>, pci_device_id=<slot 1-31>""",
    "--rng": """virtio-rng PCI device (entropy); every VM has one:
  src=<path>            a readable file or character device
                        (default /dev/urandom); at most 64 KiB per request""",
    "--vsock": f"""virtio-vsock PCI device with cloud-hypervisor's hybrid vsock (docs/vsock.md):
  cid=<n>               the guest's CID, {MIN_VSOCK_CID}-{MAX_VSOCK_CID} (required)
  socket=<path>         Unix socket pyvmm listens on (required; must not
                        exist): a host program connects and writes
                        "CONNECT <port>\\n"; the guest connecting to host
                        port P reaches <path>_P
  id=<name>, pci_segment=<n>, pci_device_id=<slot 1-31>""",
    "--fs": f"""virtio-fs PCI device served by a vhost-user backend (virtiofsd); each
CONFIG is one file system, the option may be repeated; needs --memory
shared=on or hugepages=on (docs/virtio-fs.md):
  tag=<tag>             what the guest mounts (mount -t virtiofs <tag>
                        <dir>), 1-{VIRTIO_FS_TAG_MAX} bytes (required)
  socket=<path>         the backend's Unix socket (virtiofsd --socket-path=)
                        (required; it must be listening when pyvmm starts)
  num_queues=<n>        request queues, at most boot vCPUs (default {FS_DEFAULT_NUM_QUEUES})
  queue_size=<n>        power of 2 (default {FS_DEFAULT_QUEUE_SIZE})
  id=<name>, pci_segment=<n>, pci_device_id=<slot 1-31>""",
    "--disk": """virtio-blk disks; each CONFIG is one disk, the option may be repeated:
  path=<file>           raw disk image (required)
  readonly=on|off       (default off)
  direct=on|off         open with O_DIRECT (default off)
  image_type=raw        only raw images are supported (default raw)
  num_queues=<n>        at most boot vCPUs (default 1)
  queue_size=<n>        power of 2 above 2 (default 128)
  serial=<string>       up to 20 bytes
  id=<name>, pci_segment=<n> (default 0), pci_device_id=<slot 1-31>""",
    "--net": """virtio-net on a tap, its packets moved by the kernel's vhost-net; each
CONFIG is one NIC, the option may be repeated (docs/net.md):
  tap=<name>            the host tap (created if missing, removed at exit;
                        default: a new vmtapN)
  fd=[<n>,...]          instead of tap=: queue files of a tap opened by the
                        process that started pyvmm, left open across exec;
                        one per queue pair (num_queues = 2 x their number)
  ip=<a.b.c.d>          the tap's address (default 192.168.249.1 on a
                        tap pyvmm creates)
  mask=<a.b.c.d>        the tap's netmask (default 255.255.255.0 likewise)
  mac=<mac>             the guest's MAC (default: random)
  host_mac=<mac>        the tap's MAC
  mtu=<n>               68-65535, set on the tap and told to the guest
  num_queues=<n>        even; num_queues/2 queue pairs, at most boot vCPUs
                        (default 2)
  queue_size=<n>        power of 2 (default 256)
  offload_tso=on|off, offload_ufo=on|off, offload_csum=on|off (default on)
  id=<name>, pci_segment=<n>, pci_device_id=<slot 1-31>""",
    "--device": """VFIO passthrough; each CONFIG is one host PCI function, the option may
be repeated:
  path=<dir>            the function's sysfs directory (required),
                        e.g. /sys/bus/pci/devices/0000:01:00.0/
  managed=on|off        on: pyvmm binds the function to vfio-pci and gives
                        it back to its driver at exit; off: bind it
                        yourself beforehand (default off)
  id=<name>             device name (default: generated)
  pci_segment=<n>       guest PCI segment (default 0)
  pci_device_id=<slot>  guest slot 1-31 (default: lowest free)
  x_nv_gpudirect_clique=<0-15>
                        add the NVIDIA GPUDirect P2P capability with this
                        clique id (needs --platform vfio_p2p_dma=on)
  x_exclude_mmap_bars=[<bar>,...]
                        BARs 0-5 never mapped into the guest (every access
                        trapped), e.g. [0,2-3]
  x_allow_no_reset=on|off
                        on: pass the function through even when it cannot
                        be reset (what its last user left in it reaches
                        the guest; see SECURITY.md); off: refuse such a
                        function (default off)
  x_msix_relocation=on|off
                        on: move the MSI-X table (64-bit BAR) to a new
                        upper half of its BAR even when it starts a page,
                        as for a table that shares one (default off)""",
    "--platform": f"""PCI segments and DMA:
  num_pci_segments=<n>  PCI segments (host bridges), 1-{MAX_PCI_SEGMENTS} (default 1)
  vfio_p2p_dma=on|off   also DMA-map device BARs for peer-to-peer (default on;
                        turn off if the host IOMMU cannot reach them)
  allow_unsafe_interrupts=on|off
                        pass devices through on a host without interrupt
                        remapping: the guest is then not isolated from the
                        host's interrupts (default off: refused)
  x_max_msi_routes=<n>  MSI/MSI-X vectors the guest may route at once, 1-{layout.MSI_ROUTES_MAX}
                        (default {layout.MSI_ROUTES_MAX}); further vectors stay masked""",
    "--api-socket": """serve cloud-hypervisor's REST API (HTTP over a Unix socket, docs/api.md):
  path=<path> | fd=<n> | <path>
                        a new socket at <path>, or an already listening Unix
                        socket; with no VM options, pyvmm waits for vm.create""",
    "--event-monitor": """write the VMM's and the VM's events as JSON (cloud-hypervisor's format,
docs/api.md#event-monitor):
  path=<path> | fd=<n>  a file (created or truncated) or an open file descriptor""",
    "--seccomp": """system-call filter once the VM is built (docs/seccomp.md):
  true                  a call outside a thread's allow-list kills pyvmm
                        (default)
  log                   such calls go through and the kernel logs them
  false                 no filter""",
    "--pci-segment": """share of the 32-bit/64-bit MMIO apertures per segment; each CONFIG
is one segment, the option may be repeated (a later one for a segment wins):
  pci_segment=<n>               segment number (default 0)
  mmio32_aperture_weight=<w>    relative weight, at least 1 (default 1)
  mmio64_aperture_weight=<w>    relative weight, at least 1 (default 1)""",
}


class _ArgumentParser(argparse.ArgumentParser):
    """Raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        m = re.fullmatch(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if m:
            option = m.group(1).split("/")[-1]  # "-v/--verbose" -> "--verbose"
            raise ConfigError(option, m.group(2))
        m = re.fullmatch(r"unrecognized arguments: (.*)", message, re.DOTALL)
        if m:
            raise ConfigError(m.group(1).split()[0], "unrecognized argument (see pyvmm --help)")
        raise ConfigError("pyvmm", message)


class _Once(argparse.Action):
    """A single-valued option: giving it twice is an error rather than a silent override."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, "given more than once; give it once with all its keys")
        setattr(namespace, self.dest, values)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="pyvmm",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawTextHelpFormatter,
        allow_abbrev=False,
    )
    for flag, metavar in (
        ("--kernel", "PATH"),
        ("--initramfs", "PATH"),
        ("--cmdline", "STRING"),
        ("--cpus", "CONFIG"),
        ("--memory", "CONFIG"),
        ("--serial", "MODE"),
        ("--console", "CONFIG"),
        ("--rng", "CONFIG"),
        ("--vsock", "CONFIG"),
        ("--platform", "CONFIG"),
        ("--api-socket", "SOCKET"),
        ("--event-monitor", "CONFIG"),
        ("--seccomp", "true|false|log"),
    ):
        parser.add_argument(flag, action=_Once, metavar=metavar, help=_HELP[flag])
    for flag in ("--disk", "--net", "--fs", "--device", "--pci-segment"):
        parser.add_argument(flag, action="extend", nargs="+", default=[], metavar="CONFIG", help=_HELP[flag])
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output on stderr: -v info, -vv debug, -vvv trace",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the whole command line, read BAR sizes from sysfs and print where every segment window "
        "and device BAR would go, without opening KVM or VFIO",
    )
    parser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    return parser


def _parse_each(flag: str, texts: Iterable[str], parse: Callable[[str], T]) -> list[T]:
    results: list[T] = []
    for text in texts:
        try:
            results.append(parse(text))
        except OptionError as e:
            raise ConfigError(f"{flag} {text}", str(e)) from None
    return results


def _parse_one(flag: str, text: str | None, parse: Callable[[str], T], default: T) -> T:
    if text is None:
        return default
    return _parse_each(flag, [text], parse)[0]


def _parse_seccomp(text: str | None) -> SeccompMode:
    if text is None:
        return SeccompMode.TRUE
    try:
        return SeccompMode(text)
    except ValueError:
        raise ConfigError("--seccomp", f"invalid value {text!r}: use true, false or log") from None


def parse_api_socket(text: str) -> ApiSocketConfig:
    """`path=P`, `fd=N`, or (as Kata passes it) a bare path: whatever is not that option string is a path."""
    try:
        opts = parse_options(text, {"path", "fd"})
    except OptionError:
        opts = Options()
    if opts.has("path") and opts.has("fd"):
        raise ConfigError(f"--api-socket {text}", "give path= or fd=, not both")
    if opts.has("fd"):
        try:
            fd = opts.integer("fd", bits=31)
        except OptionError as e:
            raise ConfigError(f"--api-socket {text}", str(e)) from None
        return ApiSocketConfig(fd=fd)
    path = opts.get("path") or text
    if not path.strip():
        raise ConfigError("--api-socket", "empty path: give the socket's path, e.g. /run/vm.sock")
    return ApiSocketConfig(path=Path(path))


def parse_event_monitor(text: str) -> EventMonitorConfig:
    """`path=P` or `fd=N`, as cloud-hypervisor takes it."""
    label = f"--event-monitor {text}"
    try:
        opts = parse_options(text, {"path", "fd"})
        if opts.has("path") == opts.has("fd"):
            raise ConfigError(label, "give path=<file> or fd=<n> (one of them)")
        if opts.has("fd"):
            return EventMonitorConfig(fd=opts.integer("fd", bits=31))
    except OptionError as e:
        raise ConfigError(label, str(e)) from None
    path = opts.get("path") or ""
    if not path.strip():
        raise ConfigError(label, "empty path: give the file to write the events to")
    return EventMonitorConfig(path=Path(path))


_VM_FLAGS = ("kernel", "initramfs", "cmdline", "cpus", "memory", "serial", "console", "rng", "platform",
             "disk", "net", "fs", "device", "pci_segment", "vsock")


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """Parse and validate a pyvmm command line: with only --api-socket, no VM yet (it comes by vm.create)."""
    ns = build_arg_parser().parse_args(list(argv))
    api = parse_api_socket(ns.api_socket) if ns.api_socket is not None else None
    events = parse_event_monitor(ns.event_monitor) if ns.event_monitor is not None else None
    if events is not None and ns.dry_run:
        raise ConfigError("--dry-run", "checks a command line and exits: not with --event-monitor")
    if api is not None:
        if ns.dry_run:
            raise ConfigError("--dry-run", "checks a command line and exits: not with --api-socket")
        if not any(getattr(ns, flag) for flag in _VM_FLAGS):
            return CommandLine(None, api, ns.verbose, events, _parse_seccomp(ns.seccomp))
    return CommandLine(_vm_config(ns), api, ns.verbose, events, _parse_seccomp(ns.seccomp))


def parse_vm_config(argv: Sequence[str]) -> VmConfig:
    """Parse and validate a pyvmm command line (without the program name) that describes a VM."""
    ns = build_arg_parser().parse_args(list(argv))
    return _vm_config(ns)


def _vm_config(ns: argparse.Namespace) -> VmConfig:
    if not ns.kernel:
        raise ConfigError("--kernel", "no kernel given: pyvmm needs --kernel <bzImage> (see pyvmm --help)")
    cmdline = ns.cmdline or ""
    if len(cmdline.encode()) >= layout.CMDLINE_MAX_SIZE:
        raise ConfigError(
            "--cmdline", f"{len(cmdline.encode())} bytes is too long: at most {layout.CMDLINE_MAX_SIZE - 1}"
        )
    payload = PayloadConfig(
        kernel=Path(ns.kernel),
        initramfs=Path(ns.initramfs) if ns.initramfs else None,
        cmdline=cmdline,
    )
    config = VmConfig(
        payload=payload,
        cpus=_parse_one("--cpus", ns.cpus, parse_cpus, CpusConfig()),
        memory=_parse_one("--memory", ns.memory, parse_memory, MemoryConfig()),
        serial=_parse_one(
            "--serial", ns.serial, lambda t: parse_console(t, "--serial"), ConsoleConfig(ConsoleMode.NULL)
        ),
        console=_parse_one("--console", ns.console, parse_console, ConsoleConfig(ConsoleMode.TTY)),
        rng=_parse_one("--rng", ns.rng, parse_rng, RngConfig()),
        disks=tuple(_parse_each("--disk", ns.disk, parse_disk)),
        nets=tuple(_parse_each("--net", ns.net, parse_net)),
        devices=tuple(_parse_each("--device", ns.device, parse_device)),
        vsock=_parse_one("--vsock", ns.vsock, parse_vsock, None),
        fs=tuple(_parse_each("--fs", ns.fs, parse_fs)),
        platform=_parse_one("--platform", ns.platform, parse_platform, PlatformConfig()),
        pci_segments=tuple(_parse_each("--pci-segment", ns.pci_segment, parse_pci_segment)),
        seccomp=_parse_seccomp(ns.seccomp),
        verbosity=ns.verbose,
        dry_run=ns.dry_run,
    )
    validate(config)
    return config
