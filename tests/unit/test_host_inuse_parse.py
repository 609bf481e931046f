"""Parsers behind in-use detection: /proc/PID/mountinfo and /proc/swaps text."""

from __future__ import annotations

from pyvmm.host.inuse import Mount, parse_mountinfo, parse_swaps

MOUNTINFO = """\
25 1 0:22 / /lower ro,relatime - 9p hostroot ro,dirsync,loose,access=client,msize=262144,trans=virtio
29 1 0:24 / /host rw,relatime - overlay overlay rw,lowerdir=/lower,upperdir=/upper/upper
40 29 259:1 / /mnt/my\\040disk rw,relatime shared:5 master:1 - ext4 /dev/nvme0n1p1 rw
"""


def test_mountinfo_fields() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[0] == Mount(0, 22, "/lower", "9p", "hostroot")
    assert mounts[1].fs_type == "overlay"


def test_optional_fields_and_octal_escapes() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[2] == Mount(259, 1, "/mnt/my disk", "ext4", "/dev/nvme0n1p1")


def test_junk_lines_are_skipped() -> None:
    assert parse_mountinfo("nonsense\n\n1 2 3\n") == []


def test_swaps() -> None:
    text = (
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/dev/mmcblk0                            partition\t65532\t\t0\t\t-2\n"
        "/var/swap\\040file                       file\t\t1024\t\t0\t\t-3\n"
    )
    assert parse_swaps(text) == ["/dev/mmcblk0", "/var/swap file"]
    assert parse_swaps("Filename\tType\tSize\tUsed\tPriority\n") == []
