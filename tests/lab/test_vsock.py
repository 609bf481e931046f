"""virtio-vsock with cloud-hypervisor's hybrid vsock (issue 20, acceptance 3), one lab boot, one guest.

The guest runs two echo listeners (pyvmm-vsock, ports 1234 and 1235), connects to host port 5000 (PATH_5000:
the host answers) and then to 5001, which the host holds open until it is done. The host side, a driver
run inside the lab:
1. answers the guest's connection to PATH_5000;
2. connects to PATH with `CONNECT 1234`, gets `OK <port>`, and gets 200 KiB echoed back (more than the
   credit either side gives);
3. `CONNECT 9999` (no listener: the guest resets it) and a garbage line: both closed without an OK;
4. a peer that never reads: it pushes data to the 1235 echo and reads nothing; credit stalls the stream,
   pyvmm's memory stays flat and the 1234 echo still answers meanwhile;
5. 1,000 connect/echo/close cycles: pyvmm holds as many fds after them as before, and the VM still answers;
6. releases the guest (5001), which powers off; pyvmm exits 0 and removes PATH.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

CYCLES = 1000

DRIVER = r'''
import os, socket, subprocess, sys, threading, time
started = time.monotonic()
path = sys.argv[1]
def unix_listener(p):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(p)
    s.listen(4)
    s.settimeout(600)
    return s
answer, hold = unix_listener(path + "_5000"), unix_listener(path + "_5001")
pv = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
log = bytearray()
threading.Thread(target=lambda: [log.extend(c) for c in iter(lambda: pv.stdout.read1(4096), b"")],
                 daemon=True).start()
def fds():
    return len(os.listdir(f"/proc/{pv.pid}/fd"))
def rss_kib():
    with open(f"/proc/{pv.pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1])
def recv_line(s):
    line = b""
    while not line.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            break
        line += c
    return line
def hybrid(port, line=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    s.sendall(line if line is not None else b"CONNECT %d\n" % port)
    return s, recv_line(s)
def echo(port, data):
    for attempt in range(20):  # the guest's listener may not be up yet: it resets the connection then
        s, ok = hybrid(port)
        if ok.startswith(b"OK "):
            break
        s.close()
        time.sleep(1)
    else:
        return b"no OK", b""
    sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
    sender.start()
    got = bytearray()
    while chunk := s.recv(65536):
        got += chunk
    sender.join()
    s.close()
    return ok, bytes(got)

# 1. the guest's connection to host port 5000
c, _ = answer.accept()
c.settimeout(60)
first = b""
while chunk := c.recv(4096):
    first += chunk
c.sendall(b"HOST-REPLY\n")
c.close()
print("GUEST-TO-HOST=" + first.decode(errors="replace").strip(), flush=True)
held, _ = hold.accept()
print(f"BOOTED-SECONDS={time.monotonic() - started:.1f}", flush=True)
def thread_filters():  # name:number of seccomp filters, for each of pyvmm's threads (docs/seccomp.md)
    out = []
    for task in sorted(os.listdir(f"/proc/{pv.pid}/task")):
        with open(f"/proc/{pv.pid}/task/{task}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pv.pid}/task/{task}/status") as f:
            count = next(l for l in f if l.startswith("Seccomp_filters:")).split()[1]
        out.append(f"{comm}:{count}")
    return ",".join(out)
print(f"THREAD-FILTERS={thread_filters()}", flush=True)

# 2. host to guest, with the handshake, more data than any credit
data = os.urandom(200 << 10)
ok, got = echo(1234, data)
print(f"HANDSHAKE={ok.decode(errors='replace').strip()} ECHO-OK={got == data} ECHO-LEN={len(got)}",
      flush=True)

# 3. nobody listening on the guest's port 9999; not a CONNECT line
s, line = hybrid(9999)
print(f"NO-LISTENER-REPLY={line!r}", flush=True)
s.close()
s, line = hybrid(0, b"HELLO THERE\n")
print(f"GARBAGE-REPLY={line!r}", flush=True)
s.close()

# 4. a peer that never reads
rss0 = rss_kib()
stall, ok = hybrid(1235)
stall.setblocking(False)
pushed, t0 = 0, time.monotonic()
chunk = b"z" * 65536
while time.monotonic() - t0 < 20 and pushed < (64 << 20):
    try:
        pushed += stall.send(chunk)
    except BlockingIOError:
        time.sleep(0.2)
ok2, got2 = echo(1234, b"still here")
print(f"STALL-OK={ok.strip().startswith(b'OK ')} STALL-PUSHED-KIB={pushed >> 10} "
      f"STALL-RSS-GROWTH-KIB={rss_kib() - rss0} ECHO-DURING-STALL={got2 == b'still here'}", flush=True)
stall.close()

# 5. connect/close cycles leave no fd behind
time.sleep(2)
before, t0, failures = fds(), time.monotonic(), 0
for i in range(''' + str(CYCLES) + r'''):
    s, ok = hybrid(1234)
    if ok.startswith(b"OK "):
        s.sendall(b"x")
        failures += s.recv(1) != b"x"
    else:
        failures += 1
    s.close()
cycle_seconds = time.monotonic() - t0
deadline = time.monotonic() + 30
while fds() > before and time.monotonic() < deadline:
    time.sleep(0.5)
after = fds()
ok3, got3 = echo(1234, b"after the cycles")
print(f"CYCLES-FAILED={failures} CYCLE-SECONDS={cycle_seconds:.1f} FDS-BEFORE={before} FDS-AFTER={after} "
      f"ECHO-AFTER={got3 == b'after the cycles'}", flush=True)

# 6. let the guest finish
held.sendall(b"DONE\n")
held.close()
try:
    status = pv.wait(timeout=120)
except subprocess.TimeoutExpired:
    pv.kill()
    status = pv.wait()
time.sleep(0.5)
sys.stdout.write(log.decode(errors="replace").replace("\r", ""))
print(f"\nPYVMM-STATUS={status} SOCKET-LEFT={os.path.exists(path)} SECONDS={time.monotonic() - started:.1f}")
'''

GUEST_CMD = ("pyvmm-vsock listen 1234 & pyvmm-vsock listen 1235 & sleep 1; "
             "echo GUEST-HELLO | pyvmm-vsock connect 2 5000; pyvmm-vsock connect 2 5001 < /dev/null")

# pyvmm runs with --seccomp true (the default); the kernel's type 1326 records (a call a filter refused)
# are counted afterwards by thread name and system call number: none is expected.
SCRIPT = f"""
PY="$(dirname "$(command -v pyvmm)")/python"
cat > $TMPDIR/driver.py <<'EOF'
{DRIVER}
EOF
"$PY" $TMPDIR/driver.py $TMPDIR/vsock.sock pyvmm --kernel $PYVMM_GUEST_KERNEL \\
  --initramfs $PYVMM_GUEST_INITRAMFS --memory size=512M --serial tty --console off \\
  --vsock cid=3,socket=$TMPDIR/vsock.sock --cmdline 'console=ttyS0 pyvmm.cmd="{GUEST_CMD}"'; rc=$?
echo "SECCOMP-RECORDS:$(dmesg | grep 'type=1326' \\
  | sed -n 's/.* comm="\\([^"]*\\)".* syscall=\\([0-9]*\\) .*/\\1:\\2/p' | sort | uniq -c | tr -s ' \\n' ' ')"
exit $rc
"""


def _values(out: str) -> dict[str, str]:
    return dict(re.findall(r"([A-Z0-9-]+)=(\S+)", out))


def test_vsock_hybrid(lab) -> None:
    proc = lab(SCRIPT, devices="none", timeout=900)
    out = proc.stdout.replace("\r", "")
    print("\n".join(line for line in out.splitlines() if "SECONDS=" in line or "STALL" in line))
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    v = _values(out)
    # 1. guest -> host: PATH_5000 got the guest's line, the guest got the answer
    assert v.get("GUEST-TO-HOST") == "GUEST-HELLO", out
    assert "HOST-REPLY" in out, out
    # 2. host -> guest with the handshake
    assert re.search(r"^HANDSHAKE=OK \d+ ECHO-OK=True ECHO-LEN=204800$", out, re.MULTILINE), out
    # 3. refused connections are closed, nothing answered
    assert v.get("NO-LISTENER-REPLY") == "b''" and v.get("GARBAGE-REPLY") == "b''", out
    # 4. a peer that never reads is held back by credit: pyvmm buffers at most its per-connection credit
    assert v.get("STALL-OK") == "True" and v.get("ECHO-DURING-STALL") == "True", out
    assert int(v["STALL-PUSHED-KIB"]) < 8 << 10, out  # far below the 64 MiB offered
    assert int(v["STALL-RSS-GROWTH-KIB"]) < 8 << 10, out
    # 5. the cycles
    assert v.get("CYCLES-FAILED") == "0" and v.get("ECHO-AFTER") == "True", out
    assert int(v["FDS-AFTER"]) <= int(v["FDS-BEFORE"]), out  # no fd left behind by 1,000 connections
    # 6. the guest powered off, pyvmm exited 0 and removed its socket
    assert "PYVMM-GUEST-EXIT=0" in out, out
    assert v.get("PYVMM-STATUS") == "0" and v.get("SOCKET-LEFT") == "False", out
    # --seccomp true: the muxer thread (a service, started after the filters) has its own filter on the
    # VMM one; the queue worker, started by the vCPU thread at DRIVER_OK, a third; no call refused
    filters = v["THREAD-FILTERS"].split(",")
    assert "vsock-muxer:2" in filters and "vcpu0:2" in filters and "virtio-vsock-0:3" in filters, out
    assert re.search(r"^SECCOMP-RECORDS:$", out, re.MULTILINE), out
