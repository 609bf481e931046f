"""Drive a guest's serial console from inside the lab: run pyvmm on a pseudo-terminal, wait for the shell,
type commands, read their output, power the guest off, and report what happened.

    python3 serial_session.py LABEL CMD-FILE -- pyvmm ARG...

CMD-FILE holds one `NAME COMMAND` per line. Each COMMAND runs in the guest's root shell; its output is
printed after a `=== LABEL NAME` line (tests/lab/helpers/lab_script.py's `sections()` reads them). Last comes
`systemctl poweroff`, and a `SESSION LABEL ...` line gives pyvmm's exit status and the times (seconds
from pyvmm's start): to the shell prompt, to the end of the commands, to pyvmm's exit. Everything the
console printed is echoed as it arrives (prefixed `| `) so that a failure shows the boot log.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n]*# ")
BOOT_TIMEOUT = 600.0  # pyvmm start to the shell prompt (a 4-vCPU guest in a 2-CPU lab: about a minute)
COMMAND_TIMEOUT = 300.0
EXIT_TIMEOUT = 180.0


class Console:
    def __init__(self, argv: list[str]) -> None:
        self.start = time.monotonic()
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.fd = master
        self.buffer = b""
        self.line = b""

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: pyvmm and everything else holding the terminal have gone
            return False
        if not data:
            return False
        self.buffer += data
        self._echo(data)
        return True

    def _echo(self, data: bytes) -> None:
        self.line += data
        *lines, self.line = self.line.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace").replace("\r", "")
            print(f"| {text}", flush=True)

    def expect(self, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes] | None:
        """Wait for `pattern` in what arrived since the last match; None on timeout or end of output."""
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.buffer)
            if match:
                self.buffer = self.buffer[match.end():]
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 1.0)):
                return pattern.search(self.buffer)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait_exit(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self._read(0.5)
        return self.proc.poll()


def main() -> int:
    label, cmd_file, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: serial_session.py LABEL CMD-FILE -- pyvmm ARG..."
    with open(cmd_file) as f:
        commands = [line.strip().split(None, 1) for line in f if line.strip()]
    console = Console(argv)
    times: dict[str, float] = {}
    status: int | None = None
    if console.expect(PROMPT, BOOT_TIMEOUT) is None:
        print(f"SESSION {label} no shell prompt after {console.elapsed():.1f} s", flush=True)
    else:
        times["prompt"] = console.elapsed()
        for n, (name, command) in enumerate(commands):
            # The markers are typed split in two, so that the terminal's echo of the line never matches.
            begin, end = f"@@BEGIN-{n}@@", f"@@END-{n}@@"
            console.send(f"echo '{begin[:4]}''{begin[4:]}'; {command}; echo '{end[:4]}''{end[4:]}'\r")
            match = console.expect(re.compile(re.escape(begin.encode()) + rb"\r?\n(.*?)"
                                              + re.escape(end.encode()), re.S), COMMAND_TIMEOUT)
            if match is None:
                print(f"SESSION {label} command {command!r} gave no answer", flush=True)
                break
            print(f"=== {label} {name}", flush=True)
            print(match.group(1).decode(errors="replace").replace("\r", "").rstrip("\n"), flush=True)
        else:
            times["commands"] = console.elapsed()
            console.expect(PROMPT, 10.0)
            console.send("systemctl poweroff\r")
            status = console.wait_exit(EXIT_TIMEOUT)
            times["exit"] = console.elapsed()
    if console.proc.poll() is None:
        console.proc.kill()
        console.proc.wait()
    console._echo(b"\n")
    shown = " ".join(f"{k}={v:.1f}" for k, v in times.items())
    print(f"SESSION {label} status={status} {shown}", flush=True)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
