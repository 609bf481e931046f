"""A tap interface for `--net`: opened (created when missing) with one file per queue pair, configured as
cloud-hypervisor does (address, netmask, MAC, MTU, up) through ioctls, no `ip` subprocess
(docs/net.md#the-tap).

A tap pyvmm creates is not persistent: the kernel removes it when its last file closes, i.e. when pyvmm
exits, whichever way. A tap that existed before is left as it was found (only the values given on the
command line are applied to it).

`--net fd=[...]` hands pyvmm queue files of a tap someone else opened: `check_tap_fds` checks them before
anything else is opened, `Tap.adopt` takes duplicates of them (docs/net.md#taps-opened-by-someone-else).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from pathlib import Path

from pyvmm.errors import PyvmmError, UsageError
from pyvmm.ioctl import IOR, IOW, IoctlError, ioctl

TUN_PATH = "/dev/net/tun"
SYS_CLASS_NET = Path("/sys/class/net")
IFNAMSIZ = 16
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_mrg_rxbuf: what a VERSION_1 driver puts before every packet


class TapError(PyvmmError):
    """The tap could not be opened or configured (exit status 1)."""


class TapUsageError(TapError, UsageError):
    """The tap named cannot be used as asked (not a tap, wrong queue layout): exit status 2."""


class IfReqFlag(IntFlag):
    """struct ifreq's ifr_flags for TUNSETIFF (linux/if_tun.h) and SIOCSIFFLAGS (linux/if.h)."""

    IFF_UP = 0x1
    IFF_TAP = 0x0002
    IFF_MULTI_QUEUE = 0x0100
    IFF_ATTACH_QUEUE = 0x0200
    IFF_DETACH_QUEUE = 0x0400
    IFF_NO_PI = 0x1000
    IFF_VNET_HDR = 0x4000


class TunOffload(IntFlag):
    """TUNSETOFFLOAD bits: what the tap may hand the guest unsegmented/unchecksummed."""

    TUN_F_CSUM = 0x01
    TUN_F_TSO4 = 0x02
    TUN_F_TSO6 = 0x04
    TUN_F_TSO_ECN = 0x08
    TUN_F_UFO = 0x10


class _sockaddr_in(ctypes.Structure):
    _fields_ = [("sin_family", ctypes.c_uint16), ("sin_port", ctypes.c_uint16),
                ("sin_addr", ctypes.c_uint8 * 4), ("sin_zero", ctypes.c_uint8 * 8)]


class _sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_uint16), ("sa_data", ctypes.c_uint8 * 14)]


class _ifr_ifru(ctypes.Union):
    _fields_ = [("ifru_addr", _sockaddr_in), ("ifru_hwaddr", _sockaddr), ("ifru_flags", ctypes.c_short),
                ("ifru_mtu", ctypes.c_int), ("ifru_pad", ctypes.c_uint8 * 24)]


class ifreq(ctypes.Structure):
    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ), ("ifr_ifru", _ifr_ifru)]


class TunIoctl(IntEnum):
    TUNSETIFF = IOW(ord("T"), 202, ctypes.c_int)
    TUNSETOFFLOAD = IOW(ord("T"), 208, ctypes.c_uint)
    TUNGETIFF = IOR(ord("T"), 210, ctypes.c_uint)
    TUNSETVNETHDRSZ = IOW(ord("T"), 216, ctypes.c_int)
    TUNSETQUEUE = IOW(ord("T"), 217, ctypes.c_int)


class SockIoctl(IntEnum):
    """linux/sockios.h"""

    SIOCGIFFLAGS = 0x8913
    SIOCSIFFLAGS = 0x8914
    SIOCSIFADDR = 0x8916
    SIOCSIFNETMASK = 0x891C
    SIOCSIFMTU = 0x8922
    SIOCSIFHWADDR = 0x8924


ARPHRD_ETHER = 1
TUN_MAJOR, TUN_MINOR = 10, 200  # linux/miscdevice.h: /dev/net/tun
KCMP_FILE = 0  # linux/kcmp.h
SYS_KCMP = 312  # asm/unistd_64.h (x86-64)
# what a queue file must have for virtio-net on vhost-net: ethernet frames, no packet info, vnet headers
TAP_FLAGS_NEEDED = (("IFF_TAP", 0x0002), ("IFF_NO_PI", 0x1000), ("IFF_VNET_HDR", 0x4000))


@dataclass(frozen=True)
class TapSetup:
    """What to apply to the interface. `None` leaves a value as the kernel has it."""

    ip: ipaddress.IPv4Address | None = None
    mask: ipaddress.IPv4Address | None = None
    host_mac: bytes | None = None
    mtu: int | None = None


def _ifreq(name: str) -> ifreq:
    req = ifreq()
    req.ifr_name = name.encode()
    return req


def _kcmp_file(fd1: int, fd2: int) -> bool:
    """Whether two fds of this process are the same open file (kcmp KCMP_FILE). fstat cannot tell: every
    queue file's inode is /dev/net/tun's."""
    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.getpid()
    result = libc.syscall(SYS_KCMP, pid, pid, KCMP_FILE, fd1, fd2)
    if result < 0:
        err = ctypes.get_errno()
        raise TapError(f"cannot compare fd {fd1} and fd {fd2} (kcmp: {os.strerror(err)})")
    return bool(result == 0)


def tap_queue_file(fd: int) -> tuple[str, int]:
    """The interface and TUNGETIFF flags of `fd`, which must be an open tun/tap queue file attached to
    an interface; TapUsageError (one line) otherwise."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise TapUsageError(f"fd {fd} is not open ({exc.strerror}): the process that starts pyvmm must "
                            "leave the tap's queue files open across exec") from None
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (TUN_MAJOR, TUN_MINOR):
        raise TapUsageError(f"fd {fd} is not a tun/tap queue file (not /dev/net/tun)")
    req = ifreq()
    try:
        ioctl(fd, TunIoctl.TUNGETIFF, req)
    except IoctlError as exc:
        raise TapUsageError(f"fd {fd} is a /dev/net/tun file not attached to an interface "
                            f"({exc.strerror})") from None
    return req.ifr_name.decode(), int(req.ifr_ifru.ifru_flags) & 0xFFFF


def check_tap_fds(fds: Sequence[int]) -> str:
    """Check that `fds` are queue files of one tap, usable for virtio-net on vhost-net: each open and a
    tun/tap queue file (TUNGETIFF answers), IFF_TAP, IFF_NO_PI and IFF_VNET_HDR set, all of the same
    interface, IFF_MULTI_QUEUE with more than one, no open file twice. The interface's name."""
    names: list[str] = []
    for fd in fds:
        name, flags = tap_queue_file(fd)
        missing = [flag for flag, bit in TAP_FLAGS_NEEDED if not flags & bit]
        if missing:
            raise TapUsageError(f"fd {fd} is a queue file of {name} without {' and '.join(missing)}: open it "
                                "with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")
        if names and name != names[0]:
            raise TapUsageError(f"fd {fd} is a queue file of {name}, fd {fds[0]} of {names[0]}: all must "
                                "be of one tap")
        if len(fds) > 1 and not flags & IfReqFlag.IFF_MULTI_QUEUE:
            raise TapUsageError(f"fd {fd}: {name} is a single-queue tap; {len(fds)} queue files need one "
                                "opened with IFF_MULTI_QUEUE")
        names.append(name)
    for i, fd in enumerate(fds):
        for other in fds[:i]:
            if _kcmp_file(other, fd):
                raise TapUsageError(f"fd {other} and fd {fd} are the same open file: give each queue file "
                                    "once")
    return names[0]


class Tap:
    """An open tap: `fds[i]` is queue pair i's file (IFF_VNET_HDR, IFF_NO_PI)."""

    def __init__(self, name: str, fds: list[int], created: bool) -> None:
        self.name = name
        self.fds = fds
        self.created = created

    @classmethod
    def open(cls, name: str | None, queue_pairs: int, setup: TapSetup, defaults: TapSetup) -> Tap:
        """Open (or create) `name` (None: a new vmtapN) with `queue_pairs` queues; `setup` is applied in
        any case, `defaults` only to a tap created here (cloud-hypervisor's ip/mask defaults)."""
        wanted = name or "vmtap%d"
        if len(wanted.encode()) >= IFNAMSIZ:
            raise TapUsageError(f"tap name {wanted!r} is longer than {IFNAMSIZ - 1} bytes")
        created = name is None or not (SYS_CLASS_NET / name).exists()
        flags = IfReqFlag.IFF_TAP | IfReqFlag.IFF_NO_PI | IfReqFlag.IFF_VNET_HDR
        if queue_pairs > 1:
            flags |= IfReqFlag.IFF_MULTI_QUEUE
        tap = cls(wanted, [], created)
        try:
            for _ in range(queue_pairs):
                tap.fds.append(tap._attach(tap.name, flags))
            if created:
                setup = TapSetup(setup.ip or defaults.ip, setup.mask or defaults.mask,
                                 setup.host_mac or defaults.host_mac, setup.mtu or defaults.mtu)
            tap._configure(setup)
        except BaseException:
            tap.close()
            raise
        return tap

    @classmethod
    def adopt(cls, fds: Sequence[int], setup: TapSetup) -> Tap:
        """The tap whose queue files `fds` are, opened by someone else (--net fd=[...]): checked as
        check_tap_fds does, then duplicated (the Tap owns and closes its copies; the caller keeps its
        own). pyvmm did not create it and never deletes it; only `setup`'s explicit values are applied,
        and the interface is brought up only when one is. The vnet header size is set to what a virtio
        1.x driver sends."""
        name = check_tap_fds(fds)
        tap = cls(name, [], created=False)
        try:
            for fd in fds:
                tap.fds.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
            for fd in tap.fds:
                ioctl(fd, TunIoctl.TUNSETVNETHDRSZ, ctypes.c_int(VNET_HDR_SIZE))
            if setup != TapSetup():
                tap._configure(setup)
        except IoctlError as exc:
            tap.close()
            raise TapError(f"tap {name}: {exc}") from None
        except BaseException:
            tap.close()
            raise
        return tap

    def _attach(self, name: str, flags: int) -> int:
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(f"cannot open {TUN_PATH}: {exc.strerror} (is the tun module loaded?)") from None
        req = _ifreq(name)
        req.ifr_ifru.ifru_flags = flags
        try:
            ioctl(fd, TunIoctl.TUNSETIFF, req)
            ioctl(fd, TunIoctl.TUNSETVNETHDRSZ, ctypes.c_int(VNET_HDR_SIZE))
        except IoctlError as exc:
            os.close(fd)
            if exc.errno in (errno.EINVAL, errno.EBUSY):
                raise TapUsageError(
                    f"cannot attach to {name}: {exc.strerror} (is it a tap with "
                    f"{'multi-queue' if flags & IfReqFlag.IFF_MULTI_QUEUE else 'a single queue'}, "
                    "vnet headers and no other user?)"
                ) from None
            raise TapError(f"tap {name}: {exc}") from None
        self.name = req.ifr_name.decode()  # the kernel's choice for a vmtap%d
        return fd

    def _configure(self, setup: TapSetup) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            fd = sock.fileno()
            for what, address, request in (("address", setup.ip, SockIoctl.SIOCSIFADDR),
                                           ("netmask", setup.mask, SockIoctl.SIOCSIFNETMASK)):
                if address is None:
                    continue
                req = _ifreq(self.name)
                req.ifr_ifru.ifru_addr.sin_family = socket.AF_INET
                req.ifr_ifru.ifru_addr.sin_addr[:] = list(address.packed)
                self._sock_ioctl(fd, request, req, f"{what} {address}")
            if setup.host_mac is not None:
                req = _ifreq(self.name)
                req.ifr_ifru.ifru_hwaddr.sa_family = ARPHRD_ETHER
                req.ifr_ifru.ifru_hwaddr.sa_data[:6] = list(setup.host_mac)
                self._sock_ioctl(fd, SockIoctl.SIOCSIFHWADDR, req, "host_mac")
            if setup.mtu is not None:
                req = _ifreq(self.name)
                req.ifr_ifru.ifru_mtu = setup.mtu
                self._sock_ioctl(fd, SockIoctl.SIOCSIFMTU, req, f"mtu {setup.mtu}")
            req = _ifreq(self.name)
            self._sock_ioctl(fd, SockIoctl.SIOCGIFFLAGS, req, "flags")
            req.ifr_ifru.ifru_flags |= IfReqFlag.IFF_UP
            self._sock_ioctl(fd, SockIoctl.SIOCSIFFLAGS, req, "up")
        finally:
            sock.close()

    def _sock_ioctl(self, fd: int, request: SockIoctl, req: ifreq, what: str) -> None:
        try:
            ioctl(fd, request, req)
        except IoctlError as exc:
            raise TapError(f"tap {self.name}: cannot set {what}: {exc.strerror}") from None

    def supported_offloads(self) -> TunOffload:
        """The offload bits this tap accepts (each tried alone; left all off afterwards)."""
        accepted = TunOffload(0)
        for flag in TunOffload:
            wanted = flag | (TunOffload.TUN_F_CSUM if flag != TunOffload.TUN_F_CSUM else 0)
            if flag == TunOffload.TUN_F_TSO_ECN:
                wanted |= TunOffload.TUN_F_TSO4
            if self.set_offload(wanted, check=False):
                accepted |= flag
        self.set_offload(TunOffload(0), check=False)
        return accepted

    def set_offload(self, offload: int, check: bool = True) -> bool:
        """TUNSETOFFLOAD on the tap (one queue's file sets it for the interface)."""
        try:
            ioctl(self.fds[0], TunIoctl.TUNSETOFFLOAD, int(offload))
        except IoctlError as exc:
            if check:
                raise TapError(f"tap {self.name}: offloads {offload:#x} refused: {exc.strerror}") from None
            return False
        return True

    def set_queue_enabled(self, pair: int, enabled: bool) -> None:
        """Attach or detach queue pair `pair`'s file: the tap steers packets only to attached queues."""
        req = _ifreq("")
        req.ifr_ifru.ifru_flags = IfReqFlag.IFF_ATTACH_QUEUE if enabled else IfReqFlag.IFF_DETACH_QUEUE
        try:
            ioctl(self.fds[pair], TunIoctl.TUNSETQUEUE, req)
        except IoctlError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: already in that state
                raise TapError(f"tap {self.name}: queue {pair}: {exc.strerror}") from None

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
