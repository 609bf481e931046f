"""`--disk vhost_user=on,socket=PATH` served by qemu-storage-daemon (issue 20 acceptance 2), one lab boot.

The lab serves a 257 MiB image (256 MiB of a known pattern, then 1 MiB of zeros) with qemu-storage-daemon's
vhost-user-blk export; a guest with `--memory size=512M,shared=on` gets it as /dev/vda and, as /dev/vdb, a
copy of the same image on pyvmm's in-process virtio-blk. The guest reads 256 MiB of each with dd (the MB/s
of both are printed: informative, not asserted), unbinds and binds vda's driver again (a device reset and a
new setup), hashes all of vda (SHA-256 against the lab's), and writes
a line to a sector of vda that the lab then finds in the image. Then the lab kills the daemon while the
guest goes on reading: pyvmm stops the VM with one line naming the disk and exit status 1, within seconds.
Before that, a socket nobody serves is one line and exit status 1, with no guest started.
"""

from __future__ import annotations

import re

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

NOTE = "written-by-the-guest-over-vhost-user"
NOTE_SECTOR = 256 * 2048 + 8  # in the zeros after the pattern
WAIT_DEV = "i=0; while [ ! -b /dev/$d ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done"
GUEST = (
    f"for d in vda vdb; do {WAIT_DEV}; done; "
    # busybox dd prints no rate: seconds from /proc/uptime around it, then MB/s (10^6 bytes, as dd's)
    "rd() { t0=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/$1 of=/dev/null bs=1M count=256 2>/dev/null; "
    "t1=$(cut -d' ' -f1 /proc/uptime); "
    "echo $2 $(awk -v a=$t0 -v b=$t1 'BEGIN{print b-a, 268.435456/(b-a)}'); }; "
    "rd vda VU-DD:; rd vdb INPROC-DD:; "
    # re-probe: the driver resets the device (the rings come back from the daemon) and sets it up again
    "v=$(basename $(readlink /sys/block/vda/device)); echo $v > /sys/bus/virtio/drivers/virtio_blk/unbind; "
    "echo $v > /sys/bus/virtio/drivers/virtio_blk/bind; d=vda; " + WAIT_DEV + "; "
    "[ -b /dev/vda ] && echo REPROBED; "
    "echo 3 > /proc/sys/vm/drop_caches; "
    "echo GUEST-SHA=$(sha256sum /dev/vda | cut -d' ' -f1); "
    f"echo {NOTE} | dd of=/dev/vda bs=512 seek={NOTE_SECTOR} conv=sync,fsync 2>/dev/null && echo WRITE-DONE; "
    # reads go on, uncached, until the VM stops under them
    "while :; do dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$((RANDOM % 60000)) 2>/dev/null; "
    "echo 1 > /proc/sys/vm/drop_caches; sleep 0.2; done"
)

SCRIPT = lab_script(
    r"""
PYVMM="pyvmm --kernel $PYVMM_GUEST_KERNEL --initramfs $PYVMM_GUEST_INITRAMFS --cpus boot=1 --serial tty
  --console off --memory size=512M,shared=on"
IMG=$TMPDIR/vu.img; COPY=$TMPDIR/inproc.img; SOCK=$TMPDIR/vu.sock
wait_log() {  # wait_log FILE PATTERN SECONDS
  i=0; while ! grep -q "$2" "$1" && [ $i -lt $(($3 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
}

sec daemon
QSD=$(command -v qemu-storage-daemon) && echo "qsd=$QSD" || echo qsd=missing

sec no-backend
$PYVMM --disk vhost_user=on,socket=$TMPDIR/nobody.sock --cmdline console=ttyS0 </dev/null \
  > $TMPDIR/none.out 2> $TMPDIR/none.err
echo "rc=$?"; sed 's/^/err: /' $TMPDIR/none.err

sec boot
yes pyvmm-vhost-user-blk-pattern-01 | head -c 268435456 > $IMG
head -c 1048576 /dev/zero >> $IMG
cp $IMG $COPY
echo "want-sha=$(sha256sum $IMG | cut -d' ' -f1)"
$QSD --blockdev driver=file,node-name=f,filename=$IMG \
  --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$SOCK,writable=on \
  > $TMPDIR/qsd.log 2>&1 &
qsd=$!
i=0; while [ ! -S $SOCK ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
$PYVMM --disk vhost_user=on,socket=$SOCK --disk path=$COPY \
  --cmdline "console=ttyS0 quiet pyvmm.cmd=\"$(cat $TMPDIR/guest_cmd)\"" </dev/null \
  > $TMPDIR/guest.out 2> $TMPDIR/guest.err &
pv=$!
wait_log $TMPDIR/guest.out WRITE-DONE 900
grep -e '^VU-DD: ' -e '^INPROC-DD: ' -e '^REPROBED' -e '^GUEST-SHA=' -e '^WRITE-DONE' $TMPDIR/guest.out
echo "image-note=$(dd if=$IMG bs=512 skip=@SECTOR@ count=1 2>/dev/null | tr -d '\000')"
sleep 2  # the guest's reads go on
kill -KILL $qsd; killed=$(date +%s.%N)
i=0; while kill -0 $pv 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $pv 2>/dev/null; then echo pyvmm=hung; kill -KILL $pv; else echo pyvmm=ended; fi
wait $pv; echo "rc=$?"
echo "stop-seconds=$(echo "$(date +%s.%N) $killed" | awk '{printf "%.1f", $1 - $2}')"
sed 's/^/err: /' $TMPDIR/guest.err
grep -e PYVMM-GUEST-EXIT $TMPDIR/guest.out
# under --seccomp true (the default): the kernel's records of a call a filter refused (none expected)
echo "seccomp-records=$(dmesg | grep -c 'type=1326')"
sec end
""".replace("@SECTOR@", str(NOTE_SECTOR)),
)


def _value(text: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}=(\S*)", text, re.MULTILINE)
    assert match, f"{key} missing:\n{text}"
    return match.group(1)


def _errors(text: str) -> list[str]:
    return [line[len("err: "):] for line in text.splitlines() if line.startswith("err: ")]


def test_vhost_user_blk_read_write_and_a_killed_daemon(lab) -> None:
    script = f"cat > $TMPDIR/guest_cmd <<'EOF'\n{GUEST}\nEOF\n" + SCRIPT
    proc = lab(script, devices="none", memory=3072, timeout=1500, stall=900)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout
    print("\n".join(line for line in out["boot"].splitlines() if "DD: " in line))  # seconds, MB/s

    assert _value(out["daemon"], "qsd") != "missing", out["daemon"]  # the lab sees the host's /usr

    none = out["no-backend"]  # nobody serves the socket: one line naming the disk and the socket, exit 1
    assert "rc=1" in none, none
    sock = re.search(r"socket=(\S+nobody\.sock)", none)
    assert sock, none
    (line,) = _errors(none)
    assert line.startswith(f"pyvmm: --disk socket={sock.group(1)}: cannot connect to {sock.group(1)}"), line

    boot = out["boot"]
    for name in ("VU-DD", "INPROC-DD"):  # 256 MiB read by each, the MB/s printed (not asserted)
        assert re.search(rf"^{name}: [0-9.]+ [0-9.]+$", boot, re.MULTILINE), boot
    assert re.search(r"^REPROBED", boot, re.MULTILINE), boot  # unbound, reset, bound again
    assert _value(boot, "GUEST-SHA") == _value(boot, "want-sha"), boot  # every byte read right, after it
    assert re.search(r"^WRITE-DONE", boot, re.MULTILINE), boot
    assert _value(boot, "image-note") == NOTE, boot  # the guest's write reached the image

    # the daemon killed under a running guest: the VM stops, one line naming the disk, exit status 1
    assert "pyvmm=ended" in boot and "rc=1" in boot, boot
    assert float(_value(boot, "stop-seconds")) < 15, boot
    errors = _errors(boot)
    assert len(errors) == 1, boot
    assert re.fullmatch(r"pyvmm: --disk socket=\S+vu\.sock: the vhost-user backend closed the connection; "
                        r"the VM stops", errors[0]), errors
    assert "PYVMM-GUEST-EXIT" not in boot, boot  # stopped by pyvmm, not ended by the guest
    assert _value(boot, "seccomp-records") == "0", boot
