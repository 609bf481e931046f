"""A raw disk image: opened and locked before boot, read and written in place with preadv/pwritev.

Locks are whole-file OFD locks (shared for readonly=on, exclusive otherwise), the same kind
cloud-hypervisor takes, so a second VMM - pyvmm or cloud-hypervisor - cannot write an image in use.
With direct=on (O_DIRECT) guest buffers are used as they are when aligned; otherwise the transfer goes
through an aligned bounce buffer.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from pyvmm.devices.virtio.queue import split_views
from pyvmm.errors import UsageError

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_BOUNCE_CHUNK = 1 << 20
_ZERO_CHUNK = 1 << 20

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


class DiskImageError(UsageError):
    """The image cannot be used (missing, unreadable, locked...); the message is one line."""


def _lock(fd: int, exclusive: bool) -> None:
    # struct flock on x86_64: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
    lock_type = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    request = struct.pack("hhqqi4x", lock_type, os.SEEK_SET, 0, 0, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _advance(buffers: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first `n` bytes of a buffer list (after a short transfer)."""
    rest = []
    for b in buffers:
        if n >= len(b):
            n -= len(b)
        else:
            rest.append(b[n:] if n else b)
            n = 0
    return rest


class RawImage:
    """An open, locked raw image. I/O methods raise OSError; the caller turns that into IOERR."""

    def __init__(self, path: Path | str, readonly: bool = False, direct: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.direct = direct
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        label = f"--disk {self.path}"
        try:
            self.fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise DiskImageError(f"{label}: no such file") from None
        except IsADirectoryError:
            raise DiskImageError(f"{label}: is a directory, not a disk image") from None
        except PermissionError:
            what = "readable" if readonly else "readable and writable (or use readonly=on)"
            raise DiskImageError(f"{label}: permission denied: the image must be {what}") from None
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise DiskImageError(f"{label}: its file system does not support direct=on") from None
            raise DiskImageError(f"{label}: cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise DiskImageError(f"{label}: not a regular file or block device")
            try:
                _lock(self.fd, exclusive=not readonly)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise DiskImageError(
                        f"{label}: the image is in use by another VM (it holds a lock on it)"
                    ) from None
                raise DiskImageError(f"{label}: cannot lock the image: {exc.strerror}") from None
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            self.identity = f"{st.st_dev:x}{st.st_rdev:x}{st.st_ino:x}"
            self.align = self._probe_alignment() if direct else 1
        except BaseException:
            os.close(self.fd)
            raise
        self._bounce: mmap.mmap | None = None

    @property
    def sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def _probe_alignment(self) -> int:
        """The smallest alignment O_DIRECT accepts here (512 or 4096)."""
        if self.size < 4096:
            return SECTOR_SIZE
        buf = mmap.mmap(-1, 4096)
        try:
            view = memoryview(buf)
            for align in (SECTOR_SIZE, 4096):
                try:
                    os.preadv(self.fd, [view[:align]], align)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            return 4096
        finally:
            del view
            buf.close()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # also drops the OFD lock
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    # ---- data transfer --------------------------------------------------------------------------------

    def _aligned(self, offset: int, buffers: list[memoryview]) -> bool:
        a = self.align
        if a == 1:
            return True
        if offset % a:
            return False
        return all(len(b) % a == 0 and (not len(b) or _address(b) % a == 0) for b in buffers)

    def readv(self, offset: int, buffers: list[memoryview], length: int | None = None) -> None:
        """Fill `buffers` (`length` bytes in all, when the caller knows) from the image at `offset`."""
        if self.align == 1 or self._aligned(offset, buffers):
            self._transfer(os.preadv, offset, buffers, length)
        else:
            self._bounced(offset, buffers, write=False)

    def writev(self, offset: int, buffers: list[memoryview], length: int | None = None) -> None:
        """Write `buffers` (`length` bytes in all, when the caller knows) to the image at `offset`."""
        if self.readonly:
            raise OSError(errno.EROFS, "read-only image")
        if self.align == 1 or self._aligned(offset, buffers):
            self._transfer(os.pwritev, offset, buffers, length)
        else:
            self._bounced(offset, buffers, write=True)

    def _transfer(self, op: Callable[..., int], offset: int, buffers: list[memoryview],
                  length: int | None = None) -> None:
        if length is None:
            length = sum(map(len, buffers))
        if not length:
            return
        if len(buffers) <= _IOV_MAX:  # the usual case: one system call moves everything
            done = op(self.fd, buffers, offset)
            if done == length:
                return
            if done <= 0:
                raise OSError(errno.EIO, "unexpected end of image")
            offset += done
            buffers = _advance(buffers, done)
        buffers = [b for b in buffers if len(b)]
        while buffers:
            batch = buffers[:_IOV_MAX]
            done = op(self.fd, batch, offset)
            if done <= 0:
                raise OSError(errno.EIO, "unexpected end of image")
            offset += done
            buffers = _advance(buffers, done)

    def _bounce_buffer(self) -> memoryview:
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, _BOUNCE_CHUNK + 2 * 4096)  # page aligned, for O_DIRECT
        return memoryview(self._bounce)

    def _bounced(self, offset: int, buffers: list[memoryview], write: bool) -> None:
        """O_DIRECT through an aligned buffer, chunk by chunk (read-modify-write at unaligned edges)."""
        a = self.align
        total = sum(len(b) for b in buffers)
        bounce = self._bounce_buffer()
        pos = 0  # bytes of `buffers` done
        while pos < total:
            start = offset + pos
            lo = start - start % a
            n = min(total - pos, _BOUNCE_CHUNK - (start - lo))
            hi = -(-(start + n) // a) * a
            window = bounce[: hi - lo]
            skip = start - lo
            if not write or skip or (start + n) % a:
                self._transfer(os.preadv, lo, [window])
            piece, _ = split_views(_advance(buffers, pos), n)
            cursor = skip
            for b in piece:
                if write:
                    window[cursor : cursor + len(b)] = b
                else:
                    b[:] = window[cursor : cursor + len(b)]
                cursor += len(b)
            if write:
                self._transfer(os.pwritev, lo, [window])
            pos += n
        del bounce

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range (a hint: hosts that cannot punch holes keep the data)."""
        if self.readonly:
            raise OSError(errno.EROFS, "read-only image")
        try:
            self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only image")
        mode = FALLOC_FL_PUNCH_HOLE if may_unmap else FALLOC_FL_ZERO_RANGE
        try:
            self._fallocate(mode | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        zeros = mmap.mmap(-1, min(_ZERO_CHUNK, length))  # page aligned zeros, fine for O_DIRECT too
        try:
            view = memoryview(zeros)
            while length:
                n = min(length, len(zeros))
                self.writev(offset, [view[:n]])
                offset += n
                length -= n
            del view
        finally:
            zeros.close()

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if _fallocate(self.fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

