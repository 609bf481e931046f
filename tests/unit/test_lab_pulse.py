"""The lab's pulse (pyvmm/lab/pulse.py) against a stand-in for QEMU's end of the lab's ttyS1: a Unix socket
server that answers each byte as the lab's init does, or stops answering as a stalled lab does."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from pyvmm.lab.pulse import Pulse


def _serve(path: Path, answer_for: float) -> tuple[socket.socket, list[bytes]]:
    """QEMU's server socket; the 'lab' answers every byte with PULSE for `answer_for` seconds, then only
    reads (a lab that stopped running its processes)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    received: list[bytes] = []

    def lab() -> None:
        conn, _ = server.accept()
        until = time.monotonic() + answer_for
        with conn:
            while data := conn.recv(64):
                received.append(data)
                if time.monotonic() < until:
                    conn.sendall(b"PULSE\n" * data.count(b"\n"))

    threading.Thread(target=lab, daemon=True).start()
    return server, received


def test_answers_are_counted_and_silence_is_measured_from_the_last(tmp_path) -> None:
    server, received = _serve(tmp_path / "pulse.sock", answer_for=1.5)
    pulse = Pulse(tmp_path / "pulse.sock")
    start = time.monotonic()
    pulse.start()
    try:
        time.sleep(3.3)
        now = time.monotonic()
        assert pulse.connected and pulse.answers == 2, pulse.answers  # the pokes at 0 s and 1 s
        assert b"".join(received) == b"\n" * 4  # a poke a second, answered or not
        assert pulse.last_answer is not None and 1.5 < pulse.silent_for(start, now) < 3.3
        assert pulse.silent_for(now, now) == 0  # never counted from before `since` (the lab's ready time)
    finally:
        pulse.stop()
        server.close()


def test_a_pulse_that_cannot_connect_never_calls_a_lab_stalled(tmp_path, capsys) -> None:
    pulse = Pulse(tmp_path / "nobody.sock", connect_for=0.5)
    pulse.start()
    pulse._thread.join(timeout=5)
    assert not pulse.connected and pulse.silent_for(0.0, 1e9) == 0.0
    assert "no pulse (cannot connect to" in capsys.readouterr().err
