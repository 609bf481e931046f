"""A writer for the `newc` cpio format the Linux kernel unpacks as an initramfs."""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass, field
from pathlib import Path

_TRAILER = "TRAILER!!!"


@dataclass
class CpioArchive:
    """Files, directories and symlinks to be packed; later entries win over earlier ones."""

    entries: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # name -> (mode, data)

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            self.entries.setdefault(sub, (stat.S_IFDIR | mode, b""))

    def _add_parent(self, name: str) -> str:
        name = name.strip("/")
        if "/" in name:
            self.add_dir(name.rsplit("/", 1)[0])
        return name

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.entries[self._add_parent(name)] = (stat.S_IFREG | mode, data)

    def add_host_file(self, name: str, source: Path, mode: int | None = None) -> None:
        perm = mode if mode is not None else stat.S_IMODE(source.stat().st_mode)
        self.add_file(name, source.read_bytes(), perm)

    def add_symlink(self, name: str, target: str) -> None:
        self.entries[self._add_parent(name)] = (stat.S_IFLNK | 0o777, target.encode())

    def pack(self) -> bytes:
        out = bytearray()
        for ino, (name, (mode, data)) in enumerate(sorted(self.entries.items()), start=1):
            out += _entry(name, mode, data, ino)
        out += _entry(_TRAILER, 0, b"", 0)
        out += b"\0" * (-len(out) % 512)
        return bytes(out)

    def write_gzip(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(gzip.compress(self.pack(), compresslevel=6, mtime=0))
        tmp.replace(path)


def _entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    out = bytearray(header + encoded)
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return bytes(out)


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive (used by tests and by `pyvmm-lab build` to check what it wrote)."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == _TRAILER:
            return entries
        entries[name] = (mode, body)
