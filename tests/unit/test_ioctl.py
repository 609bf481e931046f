"""pyvmm.ioctl: request-number encoding as <asm-generic/ioctl.h> does it, and the libc call's errors."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from pyvmm import ioctl as io
from pyvmm.errors import ExitStatus, PyvmmError
from pyvmm.kvm.bindings import KvmIoctl, kvm_regs


def test_ioc_encoding_and_limits() -> None:
    assert io.IOWR(0xAE, 0x05, 8) == 0xC008AE05
    assert io.IOR(0xAE, 0x81, kvm_regs) == 0x8090AE81
    assert io.IOW(0x3B, 0x64, 0) == 0x40003B64
    assert io.IOW(0xAE, 0x48, ctypes.c_uint64) == 0x4008AE48  # KVM_SET_IDENTITY_MAP_ADDR
    assert io.IO(0xAE, 0x80) == 0xAE80
    assert io.IO(ord(";"), 100) == 0x3B64  # VFIO_GET_API_VERSION
    assert io.IOC(io.IOC_READ | io.IOC_WRITE, 0xAE, 0x05, 8) == io.IOWR(0xAE, 0x05, 8)
    with pytest.raises(ValueError, match="does not fit"):
        io.IOW(0xAE, 1, 1 << 14)
    with pytest.raises(ValueError, match="out of range"):
        io.IO(0xAE, 0x100)
    with pytest.raises(ValueError, match="out of range"):
        io.IO(0x100, 0)


def test_request_name() -> None:
    assert io.request_name(KvmIoctl.KVM_CREATE_VM) == "KVM_CREATE_VM"
    assert io.request_name(0xAE01) == "ioctl 0xae01"


def test_failed_ioctl_raises_ioctl_error_naming_the_request() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)  # a closed descriptor: EBADF
    with pytest.raises(io.IoctlError) as info:
        io.ioctl(fd, KvmIoctl.KVM_CHECK_EXTENSION, 0)
    assert info.value.errno == errno.EBADF
    assert str(info.value) == f"KVM_CHECK_EXTENSION failed: {os.strerror(errno.EBADF)}"
    assert isinstance(info.value, OSError) and isinstance(info.value, PyvmmError)
    assert info.value.exit_status == ExitStatus.FAILURE


def test_interrupted_ioctl_is_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []

    def fake_ioctl(fd: int, request: int, value: int) -> int:
        calls.append((fd, request, value))
        if len(calls) < 3:
            ctypes.set_errno(errno.EINTR)
            return -1
        return 7

    monkeypatch.setattr(io, "libc_ioctl", fake_ioctl)
    arg = ctypes.c_uint64(0)
    assert io.ioctl(3, 0xAE03, arg) == 7
    assert calls == [(3, 0xAE03, ctypes.addressof(arg))] * 3
