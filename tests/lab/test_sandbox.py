"""Issue 19 in one lab: pyvmm unprivileged and under its seccomp filters.

Acceptance 1 (the reader half): `pyvmm-host bind --owner` hands the SD reader's /dev/vfio/N to a fresh
user, who runs pyvmm with `runuser` (in the kvm group, nothing else): the guest reads the card exactly; the
running pyvmm has NoNewPrivs and a filter on every thread (one on the main thread and the VFIO request
watcher, two on the vCPUs, three on the virtio-rng worker: filters stack). Too low a RLIMIT_MEMLOCK and
managed=on are refused in one line; `unbind` gives the node back.

Acceptance 2: a forbidden system call made from a vCPU thread after the filters are on kills pyvmm under
`--seccomp true` and is logged (and let through) under `log`. The call comes from a driver script that
runs pyvmm's own main() in-process with the UART's write patched to open a socket on its first byte, so it
is made on a vCPU thread by device-model code; pyvmm has no such hook."""

from __future__ import annotations

import re

import pytest
from helpers.lab_script import ORDINARY_USER, lab_script, sections

pytestmark = pytest.mark.lab

GUEST_SD = (
    "modprobe mmc_block; i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-SD=$(sha256sum /dev/mmcblk0); head -c 64 /dev/hwrng | wc -c; sleep 2"
)

SCRIPT = ORDINARY_USER + r"""GROUP=$(basename $(readlink /sys/bus/pci/devices/$SD/iommu_group))
PYVMM=$(command -v pyvmm)
PY=$(dirname "$PYVMM")/python
ARGS="--kernel $TMPDIR/u/kernel --initramfs $TMPDIR/u/initrd --serial tty --console off"
as_user() { runuser -u $U -- "$@"; }
sec bind
pyvmm-host bind $SD --owner $U >/dev/null; echo "rc=$?"
stat -c '%U %a' /dev/vfio/$GROUP
sec memlock
(ulimit -l 8192; as_user "$PYVMM" $ARGS --memory size=256M \
  --device path=/sys/bus/pci/devices/$SD/,x_allow_no_reset=on --cmdline x 2>&1; echo "rc=$?")
sec managed
as_user "$PYVMM" $ARGS --device path=/sys/bus/pci/devices/$SD/,managed=on,x_allow_no_reset=on --cmdline x 2>&1
echo "rc=$?"
sec threads
# As README.md says for a real host: runuser's pam_limits starts from init's limits, then applies these.
echo "$U - memlock 1048576" > /etc/security/limits.d/pyvmm-user.conf
as_user "$PYVMM" $ARGS --cpus boot=2 --memory size=256M \
  --device path=/sys/bus/pci/devices/$SD/,x_allow_no_reset=on \
  --cmdline 'console=ttyS0 panic=-1 pyvmm.cmd="@GUEST_SD@"' < /dev/null > $TMPDIR/threads.log 2>&1 &
i=0; pid=
while [ -z "$pid" ] && [ $i -lt 100 ]; do pid=$(pgrep -u $U -f "$PYVMM"); sleep 0.1; i=$((i+1)); done
echo "USER=$(stat -c %U /proc/$pid)"
i=0  # until the virtio-rng worker runs: the only thread with three filters
until grep -qs '^Seccomp_filters:.3' /proc/$pid/task/*/status || [ $i -ge 900 ]; do
  sleep 0.2; i=$((i+1))
done
for t in /proc/$pid/task/*; do
  echo "TASK $(awk '/^(Seccomp|NoNewPrivs|Seccomp_filters):/ {printf "%s%s ", $1, $2}' $t/status)"
done
wait; echo "rc=$?"
grep -e GUEST-SD -e 'pyvmm:' $TMPDIR/threads.log
echo "WANT=$PYVMM_LAB_SD_SHA256"
sec unbind
pyvmm-host unbind -v $SD; echo "rc=$?"
echo "DRIVER=$(drv $SD) JOURNAL=$(ls /run/pyvmm/host-journal.json 2>/dev/null || echo none)"
cat > $TMPDIR/forbid.py <<'EOF'
import socket, sys, threading
from pyvmm import cli
from pyvmm.devices.serial import Serial16550
original = Serial16550.write
fired = []
def write(self, offset, size, value):
    if not fired:
        fired.append(True)
        print(f"FORBIDDEN-CALL-FROM={threading.current_thread().name}", file=sys.stderr, flush=True)
        socket.socket().close()  # socket(2): in no allow-list
        print("FORBIDDEN-CALL-RETURNED", file=sys.stderr, flush=True)
    original(self, offset, size, value)
Serial16550.write = write
sys.exit(cli.main(sys.argv[1:]))
EOF
for mode in true log; do
  sec $mode
  dmesg -C
  "$PY" $TMPDIR/forbid.py $ARGS --memory size=256M --seccomp $mode \
    --cmdline 'console=ttyS0 pyvmm.cmd="echo GUEST-RAN"' < /dev/null > $TMPDIR/$mode.log 2>&1 &
  pid=$!; wait $pid; echo "rc=$?"
  grep -e FORBIDDEN -e GUEST-RAN -e PYVMM-GUEST-EXIT $TMPDIR/$mode.log
  dmesg | grep 'type=1326' | grep " pid=$pid " | grep -o -e 'syscall=[0-9]*' -e 'code=0x[0-9a-f]*' |
    tr '\n' ' '
  echo
done
""".replace("@GUEST_SD@", GUEST_SD)


def test_unprivileged_reader_and_seccomp(lab) -> None:
    proc = lab(lab_script(SCRIPT, SD="0000:00:03.0"), devices="sd", timeout=900)
    print(proc.stdout)  # shown when an assertion fails
    out = sections(proc.stdout)
    assert set(out) >= {"bind", "memlock", "managed", "threads", "unbind", "true", "log"}, proc.stdout

    assert out["bind"].splitlines() == ["rc=0", "pyvmm-user 600"], out["bind"]
    memlock = out["memlock"].splitlines()
    assert memlock[-1] == "rc=2" and len(memlock) == 2, out["memlock"]
    assert "RLIMIT_MEMLOCK allows 8 MiB" in memlock[0] and "ulimit -l 262144" in memlock[0], out["memlock"]
    managed = out["managed"].splitlines()
    assert managed[-1] == "rc=2" and len(managed) == 2 and "managed=on" in managed[0], out["managed"]
    assert "needs root" in managed[0], out["managed"]

    threads = out["threads"]
    assert "USER=pyvmm-user" in threads, threads
    fields = [dict(re.findall(r"(\w+):(\d+)", task)) for task in re.findall(r"^TASK (.*)$", threads, re.M)]
    assert fields and all(f.get("Seccomp") == "2" and f.get("NoNewPrivs") == "1" for f in fields), threads
    counts = sorted(int(f["Seccomp_filters"]) for f in fields)
    # main and the VFIO request watcher (VMM filter), the vCPUs (VMM + vCPU), the rng worker (+ worker)
    assert counts[0] == 1 and counts.count(2) >= 2 and counts[-1] == 3, threads
    assert "rc=0" in threads, threads
    want = re.search(r"WANT=(\w+)", threads).group(1)
    assert re.search(rf"GUEST-SD={want}\b", threads), threads

    unbind = out["unbind"]
    assert "chown 0:0 /dev/vfio/" in unbind and "rc=0" in unbind, unbind
    assert "DRIVER=sdhci-pci JOURNAL=none" in unbind, unbind

    killed = out["true"].splitlines()
    assert "rc=159" in killed, out["true"]  # 128 + SIGSYS (the shell also says "Bad system call")
    assert re.search(r"^FORBIDDEN-CALL-FROM=vcpu\d$", out["true"], re.M), out["true"]
    assert "FORBIDDEN-CALL-RETURNED" not in out["true"] and "GUEST-RAN" not in out["true"], out["true"]
    assert "syscall=41" in killed[-1] and "code=0x80000000" in killed[-1], out["true"]

    logged = out["log"]
    assert logged.splitlines()[0] == "rc=0", logged
    assert re.search(r"FORBIDDEN-CALL-FROM=vcpu\d\nFORBIDDEN-CALL-RETURNED", logged), logged
    assert "GUEST-RAN" in logged and "PYVMM-GUEST-EXIT=0" in logged, logged
    assert "syscall=41" in logged.splitlines()[-1] and "code=0x7ffc0000" in logged.splitlines()[-1], logged
