"""The lab's pulse: a byte to the emulated host every second on its second serial port, and its answer.

Why (bench/README.md, "When the lab stalls"): under QEMU 7.2's TCG a lab CPU has sat for minutes with its
timer interrupt never arriving, idle in HLT or running a nested guest, until some other interrupt (the
serial break of a backtrace request) woke it. Each byte sent here is such an interrupt, so a lost timer
costs about a second instead of the run. The lab's init answers every byte from a shell loop (lab-init.sh),
which proves that the emulated host still schedules its own processes; a lab that stops answering has
stalled, whatever the command in it is doing, and the supervisor ends it at once instead of at its timeout.
"""

from __future__ import annotations

import select
import socket
import sys
import threading
import time
from pathlib import Path

POKE = b"\n"
POKE_INTERVAL = 1.0  # seconds between bytes
ANSWER = b"PULSE"


class Pulse:
    """Connects to the lab's pulse socket (QEMU's server end of ttyS1), pokes, and times the answers."""

    def __init__(self, path: Path, connect_for: float = 10.0) -> None:
        self.path = path
        self._connect_for = connect_for  # QEMU makes the socket as it starts
        self.answers = 0
        self.last_answer: float | None = None  # time.monotonic() of the latest answer
        self.connected = False  # a pulse that never reached QEMU's socket judges nothing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-pulse", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def silent_for(self, since: float, now: float) -> float:
        """Seconds without an answer, counted from `since` at the earliest (the lab's ready time); 0 when
        the pulse could not connect (then it cannot tell a stalled lab from its own failure)."""
        if not self.connected:
            return 0.0
        last = self.last_answer if self.last_answer is not None else since
        return now - max(last, since)

    def _run(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for _ in range(max(1, int(self._connect_for / 0.1))):
                try:
                    sock.connect(str(self.path))
                    self.connected = True
                    break
                except OSError:
                    if self._stop.wait(0.1):
                        return
            else:
                print(f"pyvmm-lab: no pulse (cannot connect to {self.path}): a stalled lab is found only by "
                      "its timeouts", file=sys.stderr)
                return
            pending = b""
            next_poke = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_poke:
                    sock.sendall(POKE)
                    next_poke = now + POKE_INTERVAL
                readable, _, _ = select.select([sock], [], [], max(0.0, next_poke - time.monotonic()))
                if not readable:
                    continue
                data = sock.recv(4096)
                if not data:
                    return  # QEMU is gone
                pending += data
                *lines, pending = pending.split(b"\n")
                if any(line.startswith(ANSWER) for line in lines):
                    self.answers += 1
                    self.last_answer = time.monotonic()
        except OSError:
            return  # QEMU gone
        finally:
            sock.close()
