"""The vhost-user devices in one lab boot: `--disk vhost_user=on,socket=PATH` served by qemu-storage-daemon
(issue 20 acceptance 2) and `--fs tag=,socket=` served by virtiofsd (QEMU 7.2's, /usr/lib/qemu/virtiofsd),
both needing `--memory shared=on`.

Before the boot, a socket nobody serves is one line and exit status 1, with no guest started.

The guest (`--memory size=512M,shared=on`) gets three things. As /dev/vda, a 257 MiB image (256 MiB of a
known pattern, then 1 MiB of zeros) on qemu-storage-daemon's vhost-user-blk export, and as /dev/vdb a copy
of it on pyvmm's in-process virtio-blk (PYVMM_STORAGE_DAEMON=off): it reads 256 MiB of each with dd (the
MB/s of both are printed: informative, not asserted), unbinds and binds vda's driver again (a device reset
and a new setup), hashes all of vda (SHA-256 against the lab's) and writes a line to a sector of vda that
the lab then finds in the image. As `--fs tag=myfs`, a lab directory holding a 1 MiB file of random bytes,
and as `tag=other` a second one, each with its own virtiofsd: the guest mounts myfs (`-t virtiofs myfs
/mnt`), hashes the file, writes a file the lab then finds in the directory with the guest's content, mounts
other beside it and reads it, unmounts both, unbinds and binds their driver again (device resets, then a new
setup), mounts myfs and hashes once more. Then the lab kills qemu-storage-daemon while the guest goes on
reading vda: pyvmm stops the VM with one line naming the disk and exit status 1, within seconds.

Then a second VM with myfs on a fresh virtiofsd: once it runs (its vCPU thread up, so connected to
virtiofsd), the lab kills that virtiofsd while the guest boots: pyvmm stops the VM with one line naming that
`--fs` device and exit status 1, within seconds. (Killed under the guest's reads, as qemu-storage-daemon is,
it would cost a second guest boot, ~50 s here; the hang-up watch is the same code for both.)

Then a third VM, `--memory shared=on` and `--api-socket` with no disk, gets one through `pyvmm-remote
add-disk` while it runs: pyvmm's spawner starts a qemu-storage-daemon for it and its socket joins the
hang-up watch while the watch runs (docs/hotplug.md). The lab kills that daemon: pyvmm stops the VM with one
line naming the disk and its daemon, exit status 1.
"""

from __future__ import annotations

import re

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

NOTE = "written-by-the-guest-over-vhost-user"
FS_NOTE = "written-by-the-guest-over-virtio-fs"
NOTE_SECTOR = 256 * 2048 + 8  # in the zeros after the pattern
WAIT_DEV = "i=0; while [ ! -b /dev/$d ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done"
BLK = (
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
)
FS = (
    "mkdir -p /mnt; mount -t virtiofs myfs /mnt && echo MOUNTED; "
    "echo FS-SHA=$(sha256sum /mnt/blob | cut -d' ' -f1); "
    f"echo {FS_NOTE} > /mnt/from-guest && sync && echo FS-WRITE-DONE; "
    "mkdir -p /other; mount -t virtiofs other /other && echo OTHER=$(cat /other/note); "
    # the device resets: both unmounted, their driver unbound (reset) and bound again (a new setup)
    "umount /mnt /other; f=/sys/bus/virtio/drivers/virtiofs; "
    "for v in $f/virtio*; do v=$(basename $v); echo $v > $f/unbind; echo $v > $f/bind; done; "
    "mount -t virtiofs myfs /mnt && echo REMOUNTED; "
    "echo FS-SHA2=$(sha256sum /mnt/blob | cut -d' ' -f1); echo FS-DONE; "
)
GUEST = (
    BLK + FS
    # reads go on, uncached, until the VM stops under them
    + "while :; do dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$((RANDOM % 60000)) 2>/dev/null; "
    "echo 1 > /proc/sys/vm/drop_caches; sleep 0.2; done"
)
# the second VM's guest: myfs only, read (uncached: cache=none) until the VM stops, if it gets that far
FS_GUEST = (
    "mkdir -p /mnt; mount -t virtiofs myfs /mnt && echo MOUNTED-AGAIN; "
    "while :; do cat /mnt/blob > /dev/null; echo READING; sleep 0.2; done"
)

SCRIPT = lab_script(
    r"""
PYVMM="pyvmm --kernel $PYVMM_GUEST_KERNEL --initramfs $PYVMM_GUEST_INITRAMFS --cpus boot=1 --serial tty
  --console off --memory size=512M,shared=on"
IMG=$TMPDIR/vu.img; COPY=$TMPDIR/inproc.img; SOCK=$TMPDIR/vu.sock
VFSD=/usr/lib/qemu/virtiofsd; SHARE=$TMPDIR/share; FSSOCK=$TMPDIR/fs.sock; OTHER=$TMPDIR/other
wait_log() {  # wait_log FILE PATTERN SECONDS
  i=0; while ! grep -q "$2" "$1" && [ $i -lt $(($3 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
}
# stopped PID KILLED: wait up to 60 s for pyvmm PID to end after a backend was killed at KILLED; its status
stopped() {
  i=0; while kill -0 $1 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 $1 2>/dev/null; then echo pyvmm=hung; kill -KILL $1; else echo pyvmm=ended; fi
  wait $1; echo "rc=$?"
  echo "stop-seconds=$(echo "$(date +%s.%N) $2" | awk '{printf "%.1f", $1 - $2}')"
}

sec daemon
QSD=$(command -v qemu-storage-daemon) && echo "qsd=$QSD" || echo qsd=missing
[ -x $VFSD ] && echo vfsd=ok || echo vfsd=missing

sec no-backend
$PYVMM --disk vhost_user=on,socket=$TMPDIR/nobody.sock --cmdline console=ttyS0 </dev/null \
  > $TMPDIR/none.out 2> $TMPDIR/none.err
echo "rc=$?"; sed 's/^/err: /' $TMPDIR/none.err

sec boot
yes pyvmm-vhost-user-blk-pattern-01 | head -c 268435456 > $IMG
head -c 1048576 /dev/zero >> $IMG
cp $IMG $COPY
echo "want-sha=$(sha256sum $IMG | cut -d' ' -f1)"
mkdir -p $SHARE; head -c 1048576 /dev/urandom > $SHARE/blob
echo "want-fs-sha=$(sha256sum $SHARE/blob | cut -d' ' -f1)"
mkdir -p $OTHER; echo the-other-share > $OTHER/note
$QSD --blockdev driver=file,node-name=f,filename=$IMG \
  --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$SOCK,writable=on \
  > $TMPDIR/qsd.log 2>&1 &
qsd=$!
$VFSD --socket-path=$FSSOCK -o source=$SHARE -o cache=none > $TMPDIR/vfsd.log 2>&1 &
$VFSD --socket-path=$TMPDIR/other.sock -o source=$OTHER -o cache=none > $TMPDIR/other.log 2>&1 &
i=0; while { [ ! -S $SOCK ] || [ ! -S $FSSOCK ] || [ ! -S $TMPDIR/other.sock ]; } && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i + 1)); done
PYVMM_STORAGE_DAEMON=off $PYVMM --disk vhost_user=on,socket=$SOCK --disk path=$COPY \
  --fs tag=myfs,socket=$FSSOCK tag=other,socket=$TMPDIR/other.sock \
  --cmdline "console=ttyS0 quiet pyvmm.cmd=\"$(cat $TMPDIR/guest_cmd)\"" </dev/null \
  > $TMPDIR/guest.out 2> $TMPDIR/guest.err &
pv=$!
wait_log $TMPDIR/guest.out '^FS-DONE' 900
grep -e '^VU-DD: ' -e '^INPROC-DD: ' -e '^REPROBED' -e '^GUEST-SHA=' -e '^WRITE-DONE' -e '^MOUNTED' \
  -e '^FS-SHA' -e '^FS-WRITE-DONE' -e '^OTHER=' -e '^REMOUNTED' -e '^FS-DONE' $TMPDIR/guest.out
echo "image-note=$(dd if=$IMG bs=512 skip=@SECTOR@ count=1 2>/dev/null | tr -d '\000')"
echo "lab-sees=$(cat $SHARE/from-guest 2>/dev/null)"
sleep 1  # the guest's reads go on
kill -KILL $qsd; killed=$(date +%s.%N)
stopped $pv $killed
sed 's/^/err: /' $TMPDIR/guest.err
grep -e PYVMM-GUEST-EXIT $TMPDIR/guest.out

sec fs-killed
# QEMU's virtiofsd serves one connection: a fresh one on the same directory for the second VM
$VFSD --socket-path=$TMPDIR/fs2.sock -o source=$SHARE -o cache=none > $TMPDIR/vfsd2.log 2>&1 &
vfsd=$!
i=0; while [ ! -S $TMPDIR/fs2.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
$PYVMM --fs tag=myfs,socket=$TMPDIR/fs2.sock \
  --cmdline "console=ttyS0 quiet pyvmm.cmd=\"$(cat $TMPDIR/fs_guest_cmd)\"" </dev/null \
  > $TMPDIR/fs.out 2> $TMPDIR/fs.err &
pv=$!
# the VM runs once its vCPU thread does: built, so connected to virtiofsd and watching it (vhost/hangup.py)
vcpu() { grep -qx vcpu0 /proc/$1/task/*/comm 2>/dev/null; }
i=0; while ! vcpu $pv && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
vcpu $pv && echo vm=running || echo vm=not-running
sleep 1
kill -KILL $vfsd; killed=$(date +%s.%N)
stopped $pv $killed
sed 's/^/err: /' $TMPDIR/fs.err
grep -e PYVMM-GUEST-EXIT $TMPDIR/fs.out

sec hotplug-killed
head -c 1048576 /dev/zero > $TMPDIR/hp.img
$PYVMM --api-socket path=$TMPDIR/api.sock --cmdline "console=ttyS0 quiet pyvmm.cmd=\"sleep 600\"" \
  </dev/null > $TMPDIR/hp.out 2> $TMPDIR/hp.err &
pv=$!
i=0; while ! vcpu $pv && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
vcpu $pv && echo vm=running || echo vm=not-running
pyvmm-remote --api-socket $TMPDIR/api.sock add-disk path=$TMPDIR/hp.img,id=hp; echo "add-rc=$?"
qsd=$(pgrep -x qemu-storage-da); echo "daemons=$(echo $qsd | wc -w)"
sleep 1
kill -KILL $qsd; killed=$(date +%s.%N)
stopped $pv $killed
sed 's/^/err: /' $TMPDIR/hp.err
# under --seccomp true (the default): the kernel's records of a call a filter refused (none expected)
echo "seccomp-records=$(dmesg | grep -c 'type=1326')"
sec diagnostics
sed 's/^/vfsd: /' $TMPDIR/vfsd.log | tail -10
grep -v -e '^FS-SHA' -e '^GUEST-SHA' $TMPDIR/guest.out | tail -20 | sed 's/^/guest: /'
tail -10 $TMPDIR/fs.out | sed 's/^/guest2: /'; sed 's/^/vfsd2: /' $TMPDIR/vfsd2.log | tail -5
sec end
""".replace("@SECTOR@", str(NOTE_SECTOR)),
)


def _value(text: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}=(\S*)", text, re.MULTILINE)
    assert match, f"{key} missing:\n{text}"
    return match.group(1)


def _marker(text: str, name: str) -> bool:
    return re.search(rf"^{name}", text, re.MULTILINE) is not None


def _errors(text: str) -> list[str]:
    return [line[len("err: "):] for line in text.splitlines() if line.startswith("err: ")]


def _stopped_with_one_line(section: str, line: str) -> None:
    """A backend killed under a running VM (`section` of the script): pyvmm ended by itself within 15 s,
    exit status 1, its only stderr line matching the pattern `line`, the guest not the one that ended it."""
    assert "pyvmm=ended" in section and "rc=1" in section, section
    assert float(_value(section, "stop-seconds")) < 15, section
    errors = _errors(section)
    assert len(errors) == 1 and re.fullmatch(line, errors[0]), section
    assert "PYVMM-GUEST-EXIT" not in section, section  # stopped by pyvmm, not ended by the guest


def test_vhost_user_blk_and_fs_read_write_and_killed_backends(lab) -> None:
    script = (f"cat > $TMPDIR/guest_cmd <<'EOF'\n{GUEST}\nEOF\n"
              f"cat > $TMPDIR/fs_guest_cmd <<'EOF'\n{FS_GUEST}\nEOF\n" + SCRIPT)
    proc = lab(script, devices="none", memory=3072, timeout=1500, stall=900)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout
    print("\n".join(line for line in out["boot"].splitlines() if "DD: " in line))  # seconds, MB/s

    daemon = out["daemon"]  # the lab sees the host's /usr
    assert _value(daemon, "qsd") != "missing" and _value(daemon, "vfsd") == "ok", daemon

    none = out["no-backend"]  # nobody serves the socket: one line naming the disk and the socket, exit 1
    assert "rc=1" in none, none
    sock = re.search(r"socket=(\S+nobody\.sock)", none)
    assert sock, none
    (line,) = _errors(none)
    assert line.startswith(f"pyvmm: --disk socket={sock.group(1)}: cannot connect to {sock.group(1)}"), line

    boot = out["boot"]
    for name in ("VU-DD", "INPROC-DD"):  # 256 MiB read by each, the MB/s printed (not asserted)
        assert re.search(rf"^{name}: [0-9.]+ [0-9.]+$", boot, re.MULTILINE), boot
    assert _marker(boot, "REPROBED"), boot  # unbound, reset, bound again
    assert _value(boot, "GUEST-SHA") == _value(boot, "want-sha"), boot  # every byte read right, after it
    assert _marker(boot, "WRITE-DONE"), boot
    assert _value(boot, "image-note") == NOTE, boot  # the guest's write reached the image

    # virtio-fs: mounted, every byte read right, the guest's file in the lab's directory, the second --fs
    # beside the first, both reset and set up again, read right once more
    assert _marker(boot, "MOUNTED"), proc.stdout
    assert _value(boot, "FS-SHA") == _value(boot, "want-fs-sha"), boot
    assert _marker(boot, "FS-WRITE-DONE"), boot
    assert _value(boot, "lab-sees") == FS_NOTE, boot
    assert _value(boot, "OTHER") == "the-other-share", boot
    assert _marker(boot, "REMOUNTED"), proc.stdout
    assert _value(boot, "FS-SHA2") == _value(boot, "want-fs-sha"), boot

    # the daemon killed under a running guest: the VM stops, one line naming the disk, exit status 1
    _stopped_with_one_line(boot, r"pyvmm: --disk socket=\S+vu\.sock: the vhost-user backend closed the "
                                 r"connection; the VM stops")

    # virtiofsd killed under a running VM (its guest booting): the same, one line naming that --fs
    fs = out["fs-killed"]
    assert _value(fs, "vm") == "running", fs
    _stopped_with_one_line(fs, r"pyvmm: --fs tag=myfs,socket=\S+fs2\.sock: the vhost-user backend closed the "
                               r"connection; the VM stops")

    # a disk hot-plugged into the running VM (RAM shared): served by a daemon the spawner started, watched
    # from its plug on; that daemon killed: the same stop, one line naming the disk and the daemon
    hp = out["hotplug-killed"]
    assert _value(hp, "vm") == "running" and _value(hp, "add-rc") == "0", hp
    assert _value(hp, "daemons") == "1", hp
    _stopped_with_one_line(hp, r"pyvmm: --disk path=\S+hp\.img: the qemu-storage-daemon serving it "
                               r"\(pid \d+\) exited: .*; the VM stops")
    assert _value(hp, "seccomp-records") == "0", hp
