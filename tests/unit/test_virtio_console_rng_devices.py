"""virtio-console and virtio-rng over the PCI transport, driven like a guest driver."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_virtio_driver import BAR_ADDRESS, F_NEXT, Driver, FakeVectors, FakeVm, MiB, wait_used

from pyvmm.devices.virtio import VirtioPciDevice, vector_count
from pyvmm.devices.virtio.console import (
    INPUT_BUFFER_MAX,
    RECEIVEQ,
    TRANSMITQ,
    TX_CHAIN_MAX,
    ConsoleFeature,
    VirtioConsole,
)
from pyvmm.devices.virtio.rng import MAX_BYTES_PER_REQUEST, RngSourceError, VirtioRng
from pyvmm.memory import GuestMemory

RAM = 8 * MiB
BUF = 0x400000


class Sink:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.writes.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


Plugged = tuple[VirtioPciDevice, Driver, GuestMemory]


def plug(device: VirtioConsole | VirtioRng, want: int | None = None) -> Plugged:
    memory = GuestMemory([(0, RAM)])
    dev = VirtioPciDevice(device, memory, FakeVectors(vector_count(device)), bar64=True, ioeventfds=FakeVm())
    dev.assign_bar(0, BAR_ADDRESS)
    driver = Driver(dev, memory)
    driver.init(want=want)
    return dev, driver, memory


@pytest.fixture
def console() -> Iterator[tuple[VirtioConsole, Sink, VirtioPciDevice, Driver, GuestMemory]]:
    sink = Sink()
    con = VirtioConsole(sink, size=(120, 40))
    dev, driver, memory = plug(con)
    yield con, sink, dev, driver, memory
    dev.close()


def test_console_identity_features_and_config(console) -> None:
    _, _, dev, driver, _ = console
    assert dev.config_read(2, 2) == 0x1043  # modern virtio device 3
    assert dev.config_read(0x0A, 2) == 0x0780  # simple communication controller
    assert driver.common_read(0x12, 2) == 2  # receiveq and transmitq, no control queues
    assert driver.features() >> ConsoleFeature.SIZE & 1
    assert not driver.features() >> ConsoleFeature.MULTIPORT & 1
    assert not driver.features() >> ConsoleFeature.EMERG_WRITE & 1
    assert (driver.device_cfg(0, 2), driver.device_cfg(2, 2)) == (120, 40)  # cols, rows


def test_console_without_a_terminal_offers_no_size() -> None:
    con = VirtioConsole(Sink())
    assert con.features == 0 and con.config_bytes()[:4] == bytes(4)
    assert not con.set_size(80, 25)  # nothing to tell a driver that was never offered a size


def test_console_resize_tells_the_driver(console) -> None:
    con, _, dev, driver, _ = console
    generation = driver.common_read(0x15, 1)
    assert con.set_size(100, 30)
    dev.notify_config_change()
    assert (driver.device_cfg(0, 2), driver.device_cfg(2, 2)) == (100, 30)
    assert driver.common_read(0x15, 1) == generation + 1
    assert dev.vectors.triggers[0] >= 1  # the configuration vector
    assert not con.set_size(100, 30)  # unchanged: nothing to tell
    assert con.set_size(1 << 20, -1) and con.config_bytes()[:4] == b"\xff\xff\x00\x00"  # clamped


def test_console_output_is_one_write_per_drain(console) -> None:
    _, sink, _, driver, memory = console
    tx = driver.rings[TRANSMITQ]
    heads = []
    for i, text in enumerate((b"Linux version ", b"6.1\n", b"second line\n")):
        memory.write(BUF + 0x1000 * i, text)
        heads.append(tx.add([(BUF + 0x1000 * i, len(text), False)]))
    memory.write(BUF + 0x8000, b"two ")
    memory.write(BUF + 0x9000, b"buffers\n")
    heads.append(tx.add([(BUF + 0x8000, 4, False), (BUF + 0x9000, 8, False)]))
    tx.publish(*heads)
    driver.notify(TRANSMITQ)
    used = wait_used(tx, 4)
    assert [h for h, _ in used] == heads and all(n == 0 for _, n in used)
    assert sink.data == b"Linux version 6.1\nsecond line\ntwo buffers\n"
    assert len(sink.writes) == 1


def test_console_bad_transmit_chains_are_returned_not_written(console) -> None:
    _, sink, _, driver, memory = console
    tx = driver.rings[TRANSMITQ]
    memory.write(BUF, b"ok\n")
    outside = tx.add([(RAM - 2, 16, False)])  # runs past the end of RAM
    huge = tx.add([(BUF, TX_CHAIN_MAX, False), (BUF, TX_CHAIN_MAX, False)])  # twice the per-chain budget
    fine = tx.add([(BUF, 3, False)])
    tx.publish(outside, huge, fine)
    driver.notify(TRANSMITQ)
    assert [h for h, _ in wait_used(tx, 3)] == [outside, huge, fine]
    assert len(sink.data) == TX_CHAIN_MAX + 3 and sink.data.endswith(b"ok\n")


def test_console_loop_in_a_chain_is_bounded(console) -> None:
    _, sink, _, driver, _ = console
    tx = driver.rings[TRANSMITQ]
    tx.write_desc(0, BUF, 8, F_NEXT, 1)
    tx.write_desc(1, BUF, 8, F_NEXT, 0)  # 0 -> 1 -> 0 ...
    tx.publish(0)
    driver.notify(TRANSMITQ)
    assert wait_used(tx, 1) == [(0, 0)]
    assert sink.data == b""


def post_rx(driver: Driver, count: int, size: int = 64) -> list[int]:
    rx = driver.rings[RECEIVEQ]
    heads = [rx.add([(BUF + 0x1000 * i, size, True)]) for i in range(count)]
    rx.publish(*heads)
    driver.notify(RECEIVEQ)
    return heads


def test_console_input_waits_for_receive_buffers(console) -> None:
    con, _, _, driver, memory = console
    rx = driver.rings[RECEIVEQ]
    assert con.queue_input(b"echo hi\r") == 8  # no buffer posted yet: held, not dropped
    time.sleep(0.05)
    assert rx.used_idx == 0 and con.pending_input == 8
    [head] = post_rx(driver, 1)
    assert wait_used(rx, 1) == [(head, 8)]
    assert memory.read(BUF, 8) == b"echo hi\r" and con.pending_input == 0


def test_console_input_spreads_over_buffers_in_order(console) -> None:
    con, _, _, driver, memory = console
    rx = driver.rings[RECEIVEQ]
    heads = post_rx(driver, 3, size=4)
    time.sleep(0.02)
    assert rx.used_idx == 0  # posting buffers alone returns none
    con.queue_input(b"abcdefghij")
    assert wait_used(rx, 3) == [(heads[0], 4), (heads[1], 4), (heads[2], 2)]
    assert b"".join(memory.read(BUF + 0x1000 * i, n) for i, n in enumerate((4, 4, 2))) == b"abcdefghij"
    # more input than buffers: the rest waits for the next buffer the driver posts
    con.queue_input(b"XYZ")
    time.sleep(0.02)
    assert con.pending_input == 3
    [head] = post_rx(driver, 1, size=64)
    assert wait_used(rx, 1) == [(head, 3)]


def test_console_input_buffer_is_bounded() -> None:
    con = VirtioConsole(Sink())
    assert con.queue_input(b"x" * (INPUT_BUFFER_MAX + 100)) == INPUT_BUFFER_MAX
    assert con.queue_input(b"more") == 0  # the reader is held back (TerminalInput retries)
    assert con.pending_input == INPUT_BUFFER_MAX


def test_console_receive_chain_with_readable_buffer_gets_nothing(console) -> None:
    con, _, _, driver, memory = console
    rx = driver.rings[RECEIVEQ]
    memory.write(BUF, b"\xee" * 8)
    bad = rx.add([(BUF, 8, False)])  # device-readable: not a receive buffer
    good = rx.add([(BUF + 0x1000, 8, True)])
    rx.publish(bad, good)
    driver.notify(RECEIVEQ)
    con.queue_input(b"key")
    assert wait_used(rx, 2) == [(bad, 0), (good, 3)]
    assert memory.read(BUF, 8) == b"\xee" * 8


@pytest.mark.parametrize("event_idx", [False, True])
def test_console_input_after_buffers_ran_out_rearms_notifications(event_idx: bool) -> None:
    """Buffers used up with input left over: the driver's next buffer must wake the device (for an
    EVENT_IDX driver, avail_event names the next index it makes available)."""
    con = VirtioConsole(Sink())
    want = None if event_idx else ~(1 << 29)
    dev, driver, _ = plug(con, want=want)
    try:
        rx = driver.rings[RECEIVEQ]
        post_rx(driver, 1, size=2)
        con.queue_input(b"abcd")
        wait_used(rx, 1)
        if event_idx:
            assert rx.avail_event == rx.avail_idx
        else:
            assert rx.used_flags == 0  # notifications on
        post_rx(driver, 1, size=2)
        assert wait_used(rx, 1)[0][1] == 2 and con.pending_input == 0
    finally:
        dev.close()


def test_console_input_from_another_thread_reaches_the_guest(console) -> None:
    con, _, _, driver, memory = console
    rx = driver.rings[RECEIVEQ]
    heads = post_rx(driver, 16, size=16)  # enough even if every 7-byte piece lands in a buffer of its own
    data = bytes(range(100))
    feeder = threading.Thread(target=lambda: [con.queue_input(data[i : i + 7]) for i in range(0, 100, 7)])
    feeder.start()
    feeder.join()
    got = b""
    used = []
    deadline = time.monotonic() + 5
    while len(got) < 100 and time.monotonic() < deadline:
        for head, n in rx.take_used():
            used.append(head)
            got += memory.read(BUF + 0x1000 * heads.index(head), n)
        time.sleep(0.002)
    assert got == data


# ---- virtio-rng -------------------------------------------------------------------------------------


@pytest.fixture
def rng_source(tmp_path: Path) -> Path:
    src = tmp_path / "entropy"
    src.write_bytes(bytes(range(256)) * 1024)  # 256 KiB of a known pattern
    return src


def test_rng_fills_requests_from_the_source(rng_source: Path) -> None:
    dev, driver, memory = plug(VirtioRng.open(str(rng_source)))
    try:
        assert dev.config_read(2, 2) == 0x1044  # modern virtio device 4
        assert driver.common_read(0x12, 2) == 1
        ring = driver.rings[0]
        memory.write(BUF, b"\xee" * 64)
        head = ring.add([(BUF, 16, True), (BUF + 0x1000, 16, True)])
        ring.publish(head)
        driver.notify(0)
        assert wait_used(ring, 1) == [(head, 32)]
        assert memory.read(BUF, 16) + memory.read(BUF + 0x1000, 16) == bytes(range(32))
    finally:
        dev.close()


def test_rng_request_is_bounded(rng_source: Path) -> None:
    dev, driver, memory = plug(VirtioRng.open(str(rng_source)))
    try:
        ring = driver.rings[0]
        memory.write(BUF + MAX_BYTES_PER_REQUEST, b"\xee" * 16)
        head = ring.add([(BUF, 2 * MAX_BYTES_PER_REQUEST, True)])  # the guest asks for twice the bound
        bad = ring.add([(BUF, 16, False)])  # device-readable: nothing to fill
        ring.publish(head, bad)
        driver.notify(0)
        assert wait_used(ring, 2) == [(head, MAX_BYTES_PER_REQUEST), (bad, 0)]
        assert memory.read(BUF + MAX_BYTES_PER_REQUEST, 16) == b"\xee" * 16  # nothing past the bound
    finally:
        dev.close()


def test_rng_from_urandom() -> None:
    dev, driver, memory = plug(VirtioRng.open("/dev/urandom"))
    try:
        ring = driver.rings[0]
        memory.write(BUF, bytes(64))
        head = ring.add([(BUF, 64, True)])
        ring.publish(head)
        driver.notify(0)
        assert wait_used(ring, 1) == [(head, 64)]
        assert memory.read(BUF, 64) != bytes(64)
    finally:
        dev.close()


def test_rng_source_refusals(tmp_path: Path) -> None:
    with pytest.raises(RngSourceError, match="No such file"):
        VirtioRng.open(str(tmp_path / "missing"))
    with pytest.raises(RngSourceError, match="not a regular file or character device"):
        VirtioRng.open(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RngSourceError, match="not a regular file or character device") as exc:
        VirtioRng.open(str(fifo))  # no writer: refused, not a hang
    assert exc.value.exit_status == 2


def test_console_input_after_close_is_harmless() -> None:
    con = VirtioConsole(Sink())
    dev, _, _ = plug(con)
    dev.close()
    assert dev.queue_eventfds == []
    assert con.queue_input(b"late") == 4  # buffered; the kick finds no eventfd and writes nothing


def test_rng_source_open_out_of_descriptors_is_not_a_usage_error() -> None:
    import resource

    from pyvmm.errors import VmError

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))  # the suite may hold many already
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
        with pytest.raises(VmError, match="Too many open files") as exc:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
                VirtioRng.open("/dev/urandom").close()
        assert exc.value.exit_status == 1
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
