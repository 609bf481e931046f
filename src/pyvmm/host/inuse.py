"""Is a PCI function in use by the host itself? Block devices backing mounts or swap, held by a stacked
device or open in a process; network interfaces that are up, in any network namespace; a display that
carries the text console (fbcon) or whose DRM nodes a process has open; virtio-9p devices carrying a
mounted filesystem (the lab's own root). Each use says how to end it."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pyvmm import sandbox

SYS_BLOCK = Path("/sys/class/block")
SYS_NET = Path("/sys/class/net")
SYS_VTCONSOLE = Path("/sys/class/vtconsole")
PROC = Path("/proc")
RUN_NETNS = Path("/run/netns")  # `ip netns add` names
# Our own view and init's: a chrooted caller (the lab runs commands so) cannot see mounts outside its
# root in its own mountinfo, such as the 9p filesystem under the lab's overlay root.
MOUNTINFOS = (Path("/proc/self/mountinfo"), Path("/proc/1/mountinfo"))
SWAPS = Path("/proc/swaps")
_IFF_UP = 0x1


class UseKind(Enum):
    MOUNT = "mount"
    SWAP = "swap"
    HOLDER = "holder"
    OPEN = "open"
    NETWORK = "network"
    DISPLAY = "display"
    NINEP = "9p"


@dataclass(frozen=True)
class HostUse:
    kind: UseKind
    detail: str  # one phrase, e.g. "/dev/nvme0n1p1 is mounted at /mnt"
    fix: str = ""  # how to end it, e.g. "umount /mnt"

    def __str__(self) -> str:
        return f"{self.detail} ({self.fix})" if self.fix else self.detail


@dataclass(frozen=True)
class Mount:
    major: int
    minor: int
    mount_point: str
    fs_type: str
    source: str


def _under(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + "/")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/PID/mountinfo: `id parent major:minor root mountpoint opts [optional...] - type source super`."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields or len(fields) < 7:
            continue
        sep = fields.index("-")
        if sep + 2 >= len(fields):
            continue
        major, _, minor = fields[2].partition(":")
        mounts.append(
            Mount(int(major), int(minor), _unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2]))
        )
    return mounts


def parse_swaps(text: str) -> list[str]:
    """/proc/swaps: a header line, then one `filename type size used priority` line per swap area."""
    return [_unescape(line.split()[0]) for line in text.splitlines()[1:] if line.strip()]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _block_devices_under(devpath: str) -> dict[tuple[int, int], str]:
    """Block devices whose sysfs node lies below the function (disks, partitions), plus everything stacked
    on them (device-mapper, md) through `holders`, by device number."""
    found: dict[tuple[int, int], str] = {}
    pending = []
    try:
        names = os.listdir(SYS_BLOCK)
    except OSError:
        return found
    for name in names:
        if _under(os.path.realpath(SYS_BLOCK / name), devpath):
            pending.append(name)
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        numbers = _read(SYS_BLOCK / name / "dev").strip()
        if ":" in numbers:
            major, minor = numbers.split(":")
            found[(int(major), int(minor))] = name
        with contextlib.suppress(OSError):
            pending.extend(os.listdir(SYS_BLOCK / name / "holders"))
    return found


def _rdev(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return os.major(st.st_rdev), os.minor(st.st_rdev)
    return os.major(st.st_dev), os.minor(st.st_dev)  # a swap file: the filesystem holding it


def _ninep_tags(devpath: str) -> set[str]:
    """Mount tags of virtio-9p devices that are children (virtioN) of the function."""
    tags: set[str] = set()
    try:
        children = os.listdir(devpath)
    except OSError:
        return tags
    for child in children:
        if child.startswith("virtio"):
            tag = _read(Path(devpath) / child / "mount_tag").strip("\x00\n ")
            if tag:
                tags.add(tag)
    return tags


OpenNodes = dict[tuple[int, int, int], list[tuple[int, str]]]


def host_uses(devpath: str, opened: OpenNodes | None = None) -> list[HostUse]:
    """Every way the host uses the function whose resolved sysfs path is `devpath`. `opened` is
    open_device_nodes() when the caller checks many functions at once (it walks every process's fds)."""
    uses: list[HostUse] = []
    mounts: list[Mount] = []
    for source in MOUNTINFOS:
        mounts += [m for m in parse_mountinfo(_read(source)) if m not in mounts]
    blocks = _block_devices_under(devpath)
    if blocks:
        for m in mounts:
            key: tuple[int, int] | None = (m.major, m.minor)
            if key not in blocks and m.source.startswith("/dev/"):
                key = _rdev(m.source) or key
            if key in blocks:
                uses.append(HostUse(UseKind.MOUNT, f"{blocks[key]} is mounted at {m.mount_point}",
                                    f"umount {m.mount_point}"))
        for swap in parse_swaps(_read(SWAPS)):
            key = _rdev(swap)
            if key in blocks:
                uses.append(HostUse(UseKind.SWAP, f"{swap} is in use as swap", f"swapoff {swap}"))
    tags = _ninep_tags(devpath)
    for m in mounts:
        if m.fs_type == "9p" and m.source in tags:
            detail = f"its 9p filesystem {m.source!r} is mounted at {m.mount_point}"
            uses.append(HostUse(UseKind.NINEP, detail))
    for name in _held_block_devices(devpath):
        uses.append(HostUse(UseKind.HOLDER, f"{name} is held by {', '.join(_holders(name))}",
                            "remove the device stacked on it (dmsetup remove, mdadm --stop, ...)"))
    if opened is None:
        opened = open_device_nodes()
    for (major, minor), name in sorted(blocks.items()):
        for pid, comm in opened.get((stat.S_IFBLK, major, minor), []):
            uses.append(HostUse(UseKind.OPEN, f"/dev/{name} is open in process {pid} ({comm})",
                                f"end it: kill {pid}"))
    uses += _display_uses(devpath, opened)
    try:
        interfaces = sorted(os.listdir(SYS_NET))
    except OSError:
        interfaces = []
    for name in interfaces:
        link = SYS_NET / name / "device"
        if not link.exists() or not _under(os.path.realpath(link), devpath):
            continue
        flags = _read(SYS_NET / name / "flags").strip()
        if flags and int(flags, 16) & _IFF_UP:
            uses.append(HostUse(UseKind.NETWORK, f"network interface {name} is up",
                                f"ip link set {name} down"))
    uses += _other_netns_uses(devpath)
    return uses


# ---- block devices held or open -------------------------------------------------------------------------


def _holders(name: str) -> list[str]:
    try:
        return sorted(os.listdir(SYS_BLOCK / name / "holders"))
    except OSError:
        return []


def _held_block_devices(devpath: str) -> list[str]:
    """Disks and partitions of the function that something (device-mapper, md, bcache) is stacked on."""
    try:
        names = os.listdir(SYS_BLOCK)
    except OSError:
        return []
    return sorted(n for n in names if _under(os.path.realpath(SYS_BLOCK / n), devpath) and _holders(n))


def open_device_nodes() -> OpenNodes:
    """Every block or character device node open in a process other than this one, by (S_IFBLK or S_IFCHR,
    major, minor) -> [(pid, command name)]."""
    found: OpenNodes = {}
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir(PROC) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == me:
            continue
        fd_dir = PROC / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or a kernel thread
            continue
        comm = _read(PROC / str(pid) / "comm").strip() or "?"
        seen: set[tuple[int, int, int]] = set()
        for fd in fds:
            try:
                st = os.stat(fd_dir / fd)
            except OSError:
                continue
            kind = stat.S_IFMT(st.st_mode)
            if kind in (stat.S_IFBLK, stat.S_IFCHR):
                key = (kind, os.major(st.st_rdev), os.minor(st.st_rdev))
                if key not in seen:
                    seen.add(key)
                    found.setdefault(key, []).append((pid, comm))
    return found


# ---- displays -------------------------------------------------------------------------------------------


def _fbcon_binding() -> str | None:
    """The vtconsole entry through which fbcon is bound (it then draws the text console on every
    framebuffer), or None."""
    try:
        entries = sorted(os.listdir(SYS_VTCONSOLE))
    except OSError:
        return None
    for entry in entries:
        if "frame buffer" in _read(SYS_VTCONSOLE / entry / "name") and _read(
            SYS_VTCONSOLE / entry / "bind"
        ).strip() == "1":
            return str(SYS_VTCONSOLE / entry / "bind")
    return None


def _display_uses(devpath: str, opened: OpenNodes) -> list[HostUse]:
    uses = []
    with contextlib.suppress(OSError):
        framebuffers = sorted(os.listdir(Path(devpath) / "graphics"))
        bind = _fbcon_binding() if framebuffers else None
        if bind is not None:
            uses.append(HostUse(UseKind.DISPLAY, f"its framebuffer {framebuffers[0]} shows the host's text "
                                "console (fbcon)", f"echo 0 > {bind}"))
    with contextlib.suppress(OSError):
        for node in sorted(os.listdir(Path(devpath) / "drm")):
            numbers = _read(Path(devpath) / "drm" / node / "dev").strip()
            if ":" not in numbers:
                continue
            major, minor = (int(x) for x in numbers.split(":"))
            for pid, comm in opened.get((stat.S_IFCHR, major, minor), []):
                uses.append(HostUse(UseKind.DISPLAY, f"/dev/dri/{node} is open in process {pid} ({comm})",
                                    f"stop it (a display server, a compositor): kill {pid}"))
    return uses


# ---- network interfaces in other network namespaces ----------------------------------------------------

_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCETHTOOL = 0x8946
_ETHTOOL_GDRVINFO = 0x00000003
_DRVINFO_SIZE = 196  # struct ethtool_drvinfo
_BUS_INFO = slice(4 + 3 * 32, 4 + 4 * 32)  # its bus_info[32]


@dataclass(frozen=True)
class Namespace:
    path: Path  # something to open it by: /run/netns/NAME or /proc/PID/ns/net
    label: str  # "network namespace x", "the network namespace of process 12 (dhclient)"
    enter: str  # the command prefix that runs a command in it: "ip -n x", "nsenter -t 12 -n ip"


def other_network_namespaces() -> list[Namespace]:
    """Network namespaces other than ours: named ones (`ip netns`), then those only processes hold."""
    try:
        own = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return []
    found: dict[int, Namespace] = {}
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(RUN_NETNS)):
            with contextlib.suppress(OSError):
                inode = os.stat(RUN_NETNS / name).st_ino
                if inode != own:
                    found.setdefault(inode, Namespace(RUN_NETNS / name, f"network namespace {name}",
                                                      f"ip -n {name}"))
    with contextlib.suppress(OSError):
        for entry in sorted((p for p in os.listdir(PROC) if p.isdigit()), key=int):
            path = PROC / entry / "ns" / "net"
            with contextlib.suppress(OSError):
                inode = os.stat(path).st_ino
                if inode != own and inode not in found:
                    comm = _read(PROC / entry / "comm").strip() or "?"
                    found[inode] = Namespace(path, f"the network namespace of process {entry} ({comm})",
                                             f"nsenter -t {entry} -n ip")
    return list(found.values())


def _interfaces_in(namespace: Namespace) -> list[tuple[str, str, bool]]:
    """(name, bus_info, up) of every interface in `namespace`: read by a thread that joins it (setns moves
    only the calling thread; sockets it opens belong to that namespace), so that sysfs (which shows the
    namespace it was mounted in) is not needed."""
    result: list[tuple[str, str, bool]] = []

    def look() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(namespace.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                return
        finally:
            os.close(fd)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _, name in socket.if_nameindex():
                raw = name.encode()[:15]
                flags = fcntl.ioctl(sock, _SIOCGIFFLAGS, struct.pack("16s24x", raw))
                up = bool(struct.unpack_from("H", flags, 16)[0] & _IFF_UP)
                info = bytearray(struct.pack("I", _ETHTOOL_GDRVINFO) + bytes(_DRVINFO_SIZE - 4))
                buf = ctypes.create_string_buffer(bytes(info), len(info))
                request = struct.pack("16sP8x", raw, ctypes.addressof(buf))
                try:
                    fcntl.ioctl(sock, _SIOCETHTOOL, request)
                except OSError:  # no ethtool (loopback, tunnels): not a device's interface
                    continue
                bus = buf.raw[_BUS_INFO].split(b"\0", 1)[0].decode(errors="replace")
                result.append((name, bus, up))

    with contextlib.suppress(OSError):
        thread = threading.Thread(target=look, name="netns-scan", daemon=True)
        thread.start()
        thread.join(5.0)
    return result if not thread.is_alive() else []


def _bus_device_under(bus_info: str, devpath: str) -> bool:
    """ethtool's bus_info names the interface's device on its bus: the PCI function itself (e1000e, most
    NICs: `0000:01:00.0`) or a child device of it (virtio_net: `virtio0`, a directory of the function)."""
    if not bus_info or "/" in bus_info or bus_info in (".", ".."):
        return False
    return bus_info == os.path.basename(devpath) or os.path.isdir(os.path.join(devpath, bus_info))


def _other_netns_uses(devpath: str) -> list[HostUse]:
    namespaces = other_network_namespaces()
    if namespaces and sandbox.filtered():
        # Under --seccomp (a managed=on device plugged after the filters went on): reading another
        # namespace's interfaces means joining it and opening a socket there, which no list allows
        # (docs/seccomp.md#hot-plug). Refused rather than left unchecked.
        return [HostUse(UseKind.NETWORK,
                        f"its interfaces in {len(namespaces)} other network namespace(s) cannot be checked "
                        "under --seccomp",
                        "bind it beforehand with `pyvmm-host bind` and drop managed=on")]
    uses = []
    for namespace in namespaces:
        for name, bus, up in _interfaces_in(namespace):
            if up and _bus_device_under(bus, devpath):
                uses.append(HostUse(UseKind.NETWORK, f"network interface {name} is up in {namespace.label}",
                                    f"{namespace.enter} link set {name} down"))
    return uses
