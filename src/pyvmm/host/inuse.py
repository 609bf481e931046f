"""Is a PCI function in use by the host itself? Block devices backing mounts or swap, up network
interfaces, and virtio-9p devices carrying a mounted filesystem (the lab's own root)."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

SYS_BLOCK = Path("/sys/class/block")
SYS_NET = Path("/sys/class/net")
# Our own view and init's: a chrooted caller (the lab runs commands so) cannot see mounts outside its
# root in its own mountinfo, such as the 9p filesystem under the lab's overlay root.
MOUNTINFOS = (Path("/proc/self/mountinfo"), Path("/proc/1/mountinfo"))
SWAPS = Path("/proc/swaps")
_IFF_UP = 0x1


class UseKind(Enum):
    MOUNT = "mount"
    SWAP = "swap"
    NETWORK = "network"
    NINEP = "9p"


@dataclass(frozen=True)
class HostUse:
    kind: UseKind
    detail: str  # one phrase, e.g. "/dev/nvme0n1p1 is mounted at /mnt"


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


def host_uses(devpath: str) -> list[HostUse]:
    """Every way the host uses the function whose resolved sysfs path is `devpath`."""
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
                uses.append(HostUse(UseKind.MOUNT, f"{blocks[key]} is mounted at {m.mount_point}"))
        for swap in parse_swaps(_read(SWAPS)):
            key = _rdev(swap)
            if key in blocks:
                uses.append(HostUse(UseKind.SWAP, f"{swap} is in use as swap"))
    tags = _ninep_tags(devpath)
    for m in mounts:
        if m.fs_type == "9p" and m.source in tags:
            detail = f"its 9p filesystem {m.source!r} is mounted at {m.mount_point}"
            uses.append(HostUse(UseKind.NINEP, detail))
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
            uses.append(HostUse(UseKind.NETWORK, f"network interface {name} is up"))
    return uses
