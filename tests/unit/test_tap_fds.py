"""`--net fd=[...]`: the option's rules, and the checks of tap queue files opened by someone else, on real
taps of this host (skipped with the reason where it cannot create taps). The guest side is in
tests/lab/test_net.py."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.config import ConfigError, check_paths, parse_net, parse_vm_config
from pyvmm.host.tap import (
    IfReqFlag,
    Tap,
    TapError,
    TapSetup,
    TapUsageError,
    TunIoctl,
    check_tap_fds,
    ifreq,
)
from pyvmm.ioctl import IoctlError, ioctl
from pyvmm.options import OptionError

STANDARD = IfReqFlag.IFF_TAP | IfReqFlag.IFF_NO_PI | IfReqFlag.IFF_VNET_HDR
MULTI = STANDARD | IfReqFlag.IFF_MULTI_QUEUE


# ---- the option -----------------------------------------------------------------------------------------

def test_fd_list_gives_the_queue_count() -> None:
    net = parse_net("fd=[3,4],mac=12:34:56:78:9a:bc")
    assert (net.fds, net.num_queues, net.queue_pairs, net.tap) == ((3, 4), 4, 2, None)
    assert parse_net("fd=5").fds == (5,) and parse_net("fd=5").num_queues == 2
    assert parse_net("fd=[3,4],num_queues=4").num_queues == 4  # the same number, given explicitly


@pytest.mark.parametrize("text, message", [
    ("fd=[3],num_queues=4", r"fd=\[3\] is 1 tap queue file\(s\), so num_queues is 2, not 4"),
    ("fd=[3,4],num_queues=2", r"so num_queues is 4, not 2"),
    ("fd=[3],tap=t0", "fd= and tap=t0 both name the tap"),
    ("fd=[2]", "fd=2 is standard input, output or error"),
    ("fd=[0,3]", "fd=0 is standard input"),
    ("fd=[3,4,3]", "fd=3 is given twice"),
    ("fd=[]", r"fd=\[\] names no file"),
    ("fd=[x]", "is not an integer"),
])
def test_fd_list_refused(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_net(text)


def test_fd_rules_across_the_command_line() -> None:
    base = ["--kernel", "k", "--cpus", "boot=2"]
    with pytest.raises(ConfigError, match=r"^--net fd=\[3\],num_queues=4: fd=\[3\] is 1 tap queue file"):
        parse_vm_config([*base, "--net", "fd=[3],num_queues=4"])
    with pytest.raises(ConfigError, match=r"^--net fd=\[4\]: fd=4 is given to two --net devices"):
        parse_vm_config([*base, "--net", "fd=[3,4]", "fd=[4]"])
    with pytest.raises(ConfigError, match=r"^--net fd=\[3,4,5\]: num_queues=6 is 3 queue pairs, more than"):
        parse_vm_config([*base, "--net", "fd=[3,4,5]"])


# ---- the checks, on real taps ---------------------------------------------------------------------------

def _tap(name: str, flags: int) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    req = ifreq()
    req.ifr_name = name.encode()
    req.ifr_ifru.ifru_flags = flags
    try:
        ioctl(fd, TunIoctl.TUNSETIFF, req)
    except BaseException:
        os.close(fd)
        raise
    return fd


@pytest.fixture
def taps() -> Iterator[list[int]]:
    """Open taps here (the test's fds close at the end, and the taps with them: none is persistent)."""
    try:
        os.close(_tap(f"pyvmmut{os.getpid() % 10000}", STANDARD))
    except (OSError, IoctlError) as exc:
        pytest.skip(f"this host cannot create taps ({exc})")
    opened: list[int] = []
    yield opened
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def _name(n: int) -> str:
    return f"pyvmmut{os.getpid() % 10000}{n}"


def test_queue_files_of_one_tap_pass(taps: list[int]) -> None:
    taps += [_tap(_name(0), MULTI), _tap(_name(0), MULTI)]
    assert check_tap_fds(taps) == _name(0)
    single = _tap(_name(1), STANDARD)
    taps.append(single)
    assert check_tap_fds([single]) == _name(1)


def test_what_is_not_a_tap_queue_file_is_refused(taps: list[int]) -> None:
    r, w = os.pipe()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unattached = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    taps += [r, w, unattached]
    try:
        with pytest.raises(TapUsageError, match=rf"^fd {r} is not a tun/tap queue file \(not /dev/net/tun"):
            check_tap_fds([r])
        with pytest.raises(TapUsageError, match=rf"^fd {sock.fileno()} is not a tun/tap queue file"):
            check_tap_fds([sock.fileno()])
        with pytest.raises(TapUsageError, match=rf"^fd {closed} is not open \(Bad file descriptor\): the "
                                                "process that starts pyvmm must leave"):
            check_tap_fds([closed])
        with pytest.raises(TapUsageError, match=rf"^fd {unattached} is a /dev/net/tun file not attached"):
            check_tap_fds([unattached])
    finally:
        sock.close()


def test_tap_flags_queues_and_duplicates_are_checked(taps: list[int]) -> None:
    no_hdr = _tap(_name(0), IfReqFlag.IFF_TAP | IfReqFlag.IFF_NO_PI)
    tun = _tap(_name(1), IfReqFlag.IFF_NO_PI | IfReqFlag.IFF_VNET_HDR | 0x0001)  # IFF_TUN
    single, other = _tap(_name(2), STANDARD), _tap(_name(3), MULTI)
    multi = [_tap(_name(4), MULTI), _tap(_name(4), MULTI)]
    dup = os.dup(multi[0])
    taps += [no_hdr, tun, single, other, *multi, dup]
    with pytest.raises(TapUsageError, match=rf"^fd {no_hdr} is a queue file of {_name(0)} without "
                                            "IFF_VNET_HDR: open it with IFF_TAP"):
        check_tap_fds([no_hdr])
    with pytest.raises(TapUsageError, match="without IFF_TAP:"):
        check_tap_fds([tun])
    with pytest.raises(TapUsageError, match=f"{_name(2)} is a single-queue tap; 2 queue files need"):
        check_tap_fds([single, multi[0]])
    with pytest.raises(TapUsageError, match=rf"^fd {other} is a queue file of {_name(3)}, fd {multi[0]} of "
                                            f"{_name(4)}: all must be of one tap"):
        check_tap_fds([multi[0], other])
    with pytest.raises(TapUsageError, match=rf"^fd {multi[0]} and fd {dup} are the same open file"):
        check_tap_fds([multi[0], dup])
    assert check_tap_fds(multi) == _name(4)


def test_adopted_tap_is_left_as_found(taps: list[int]) -> None:
    fd = _tap(_name(0), STANDARD)
    taps.append(fd)
    mtu = Path(f"/sys/class/net/{_name(0)}/mtu")
    flags = Path(f"/sys/class/net/{_name(0)}/flags")
    before = (mtu.read_text(), flags.read_text())
    tap = Tap.adopt([fd], TapSetup())
    assert (tap.name, tap.created, len(tap.fds)) == (_name(0), False, 1) and tap.fds[0] != fd
    assert (mtu.read_text(), flags.read_text()) == before  # nothing asked for: neither MTU nor link state
    tap.close()
    os.fstat(fd)  # the caller's file stays open, and with it the tap
    assert mtu.exists()
    tap = Tap.adopt([fd], TapSetup(mtu=1400))  # what is asked for explicitly is applied (and the link up)
    try:
        assert mtu.read_text().strip() == "1400"
        assert int(flags.read_text(), 16) & IfReqFlag.IFF_UP
    finally:
        tap.close()


def test_check_paths_refuses_in_one_line(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    r, w = os.pipe()
    try:
        config = parse_vm_config(["--kernel", str(kernel), "--net", f"fd=[{r}]"])
        with pytest.raises(ConfigError) as caught:
            check_paths(config)
        assert str(caught.value) == f"--net fd=[{r}]: fd {r} is not a tun/tap queue file (not /dev/net/tun)"
    finally:
        os.close(r)
        os.close(w)


def test_pyvmm_exits_2_with_one_line(tmp_path: Path) -> None:
    """The whole program: a pipe and a closed number inherited as fd=, refused before anything opens."""
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    r, w = os.pipe()
    try:
        for fds, line in (([r], f"pyvmm: --net fd=[{r}]: fd {r} is not a tun/tap queue file (not "
                                "/dev/net/tun)"),
                          ([], "pyvmm: --net fd=[99]: fd 99 is not open (Bad file descriptor): the process "
                               "that starts pyvmm must leave the tap's queue files open across exec")):
            number = fds[0] if fds else 99
            proc = subprocess.run([sys.executable, "-m", "pyvmm", "--kernel", str(kernel),
                                   "--net", f"fd=[{number}]"], pass_fds=fds, capture_output=True, text=True,
                                  timeout=60)
            assert (proc.returncode, proc.stderr, proc.stdout) == (2, line + "\n", "")
    finally:
        os.close(r)
        os.close(w)


def test_tap_error_is_a_usage_error() -> None:
    assert issubclass(TapUsageError, TapError)
