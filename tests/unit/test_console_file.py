"""`--serial file=PATH`: created or truncated as a regular file, never through a symlink, never a device,
FIFO or directory (issue 19)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pyvmm.config import ConsoleConfig, ConsoleMode
from pyvmm.console import SERIAL_FILE_LIMIT, ConsoleOutput, open_output_file
from pyvmm.errors import ExitStatus, UsageError


def _refused(path: Path, match: str) -> str:
    with pytest.raises(UsageError, match=match) as err:
        open_output_file(path)
    assert "\n" not in str(err.value) and err.value.exit_status is ExitStatus.USAGE
    assert str(err.value).startswith(f"--serial file={path}: ")
    return str(err.value)


def test_a_new_file_is_created_and_an_old_one_truncated(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    output = ConsoleOutput(ConsoleConfig(ConsoleMode.FILE, path))
    output.write(b"hello\n")
    output.close()
    assert path.read_bytes() == b"hello\n"
    assert stat.S_IMODE(path.stat().st_mode) & 0o777 == 0o644 & ~_umask()
    output = ConsoleOutput(ConsoleConfig(ConsoleMode.FILE, path))
    output.write(b"again\n")
    output.close()
    assert path.read_bytes() == b"again\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "shadow"
    target.write_text("precious\n")
    link = tmp_path / "serial.log"
    link.symlink_to(target)
    message = _refused(link, "is a symbolic link, which pyvmm does not follow")
    assert message.endswith(f"name the file itself ({target})")
    assert target.read_text() == "precious\n"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    _refused(dangling, "is a symbolic link")
    assert not (tmp_path / "nowhere").exists()


def test_a_fifo_is_refused_without_waiting_for_a_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused(fifo, "is a FIFO, not a regular file: name a new or regular file")


def test_a_fifo_with_a_reader_is_refused_too(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        _refused(fifo, "is a FIFO, not a regular file")
    finally:
        os.close(reader)


def test_a_directory_and_a_device_are_refused(tmp_path: Path) -> None:
    _refused(tmp_path, "is a directory, not a regular file")
    _refused(Path("/dev/null"), "is a character device, not a regular file")


def test_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    _refused(tmp_path / "no" / "serial.log", "No such file or directory")


def test_console_file_is_opened_the_same_way_and_named_in_errors(tmp_path: Path) -> None:
    """`--console file=` (virtio-console) shares the safe open; its errors name --console."""
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    link = tmp_path / "hvc0.log"
    link.symlink_to(target)
    with pytest.raises(UsageError) as err:
        ConsoleOutput(ConsoleConfig(ConsoleMode.FILE, link), "--console")
    assert str(err.value).startswith(f"--console file={link}: is a symbolic link")
    assert target.read_bytes() == b"keep"
    with pytest.raises(UsageError, match=r"^--console file=.*: is a directory"):
        open_output_file(tmp_path, "--console")


def test_terminal_size_and_resize_signal() -> None:
    """What the virtio-console offers as VIRTIO_CONSOLE_F_SIZE, and SIGWINCH telling it the new size."""
    import fcntl
    import signal
    import struct
    import termios

    from pyvmm.console import TerminalResize, terminal_size

    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        assert terminal_size(slave) == (120, 40)
        r, w = os.pipe()
        assert terminal_size(r) is None  # a pipe has no size
        os.close(r)
        os.close(w)
        seen: list[tuple[int, int]] = []
        before = signal.getsignal(signal.SIGWINCH)
        resize = TerminalResize(lambda cols, rows: seen.append((cols, rows)), fd=slave)
        resize.start()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        signal.raise_signal(signal.SIGWINCH)
        resize.close()
        assert seen == [(132, 50)]
        assert signal.getsignal(signal.SIGWINCH) == before
    finally:
        os.close(master)
        os.close(slave)


def test_file_output_stops_at_its_bound_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "serial.log"
    output = ConsoleOutput(ConsoleConfig(ConsoleMode.FILE, path), file_limit=10)
    output.write(b"0123456")
    output.write(b"789abc")  # crosses the bound: cut at it
    for _ in range(100):
        output.write(b"a guest printing forever\n")
    output.close()
    assert path.read_bytes() == b"0123456789"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"--serial file={path}: the file reached its bound of 10 bytes; the guest's further "
                        "output is dropped"]


def test_the_default_bound_is_64_mib(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    output = ConsoleOutput(ConsoleConfig(ConsoleMode.FILE, path))
    chunk = b"x" * (1 << 20)
    for _ in range(65):
        output.write(chunk)
    output.write(b"more")
    output.close()
    assert SERIAL_FILE_LIMIT == 64 << 20 and path.stat().st_size == 64 << 20
