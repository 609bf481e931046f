"""`--fs tag=,socket=` served by virtiofsd (QEMU 7.2's, /usr/lib/qemu/virtiofsd), one lab boot.

virtiofsd shares a lab directory holding a 1 MiB file of random bytes; a guest with `--memory
size=512M,shared=on --fs tag=myfs,socket=...` mounts `-t virtiofs myfs /mnt`, hashes the file (SHA-256
against the lab's) and writes a file the lab then finds in the directory with the guest's content. A second
`--fs` (tag other, its own virtiofsd and directory) is mounted beside it and read. The guest unmounts both,
unbinds and binds their driver again (device resets: the rings come back from virtiofsd, then a new setup),
mounts myfs and hashes once more. Then the lab kills myfs's virtiofsd while the guest goes on reading: pyvmm
stops the VM with one line naming that `--fs` device and exit status 1, within seconds.
"""

from __future__ import annotations

import re

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

NOTE = "written-by-the-guest-over-virtio-fs"
GUEST = (
    "mkdir -p /mnt; mount -t virtiofs myfs /mnt && echo MOUNTED; "
    "echo GUEST-SHA=$(sha256sum /mnt/blob | cut -d' ' -f1); "
    f"echo {NOTE} > /mnt/from-guest && sync && echo WRITE-DONE; "
    "mkdir -p /other; mount -t virtiofs other /other && echo OTHER=$(cat /other/note); "
    # the device resets: both unmounted, their driver unbound (reset) and bound again (a new setup)
    "umount /mnt /other; d=/sys/bus/virtio/drivers/virtiofs; "
    "for v in $d/virtio*; do v=$(basename $v); echo $v > $d/unbind; echo $v > $d/bind; done; "
    "mount -t virtiofs myfs /mnt && echo REMOUNTED; "
    "echo GUEST-SHA2=$(sha256sum /mnt/blob | cut -d' ' -f1); echo SECOND-DONE; "
    # reads go on, uncached (cache=none), until the VM stops under them
    "while :; do cat /mnt/blob > /dev/null; sleep 0.2; done"
)

SCRIPT = lab_script(
    r"""
VFSD=/usr/lib/qemu/virtiofsd; SHARE=$TMPDIR/share; SOCK=$TMPDIR/fs.sock; OTHER=$TMPDIR/other
wait_log() {  # wait_log FILE PATTERN SECONDS
  i=0; while ! grep -q "$2" "$1" && [ $i -lt $(($3 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
}

sec backend
[ -x $VFSD ] && echo vfsd=ok || echo vfsd=missing

sec boot
mkdir -p $SHARE; head -c 1048576 /dev/urandom > $SHARE/blob
echo "want-sha=$(sha256sum $SHARE/blob | cut -d' ' -f1)"
$VFSD --socket-path=$SOCK -o source=$SHARE -o cache=none > $TMPDIR/vfsd.log 2>&1 &
vfsd=$!
mkdir -p $OTHER; echo the-other-share > $OTHER/note
$VFSD --socket-path=$TMPDIR/other.sock -o source=$OTHER -o cache=none > $TMPDIR/other.log 2>&1 &
i=0; while [ ! -S $SOCK ] || [ ! -S $TMPDIR/other.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
start=$(date +%s.%N)
pyvmm --kernel $PYVMM_GUEST_KERNEL --initramfs $PYVMM_GUEST_INITRAMFS --cpus boot=1 --serial tty \
  --console off --memory size=512M,shared=on --fs tag=myfs,socket=$SOCK tag=other,socket=$TMPDIR/other.sock \
  --cmdline "console=ttyS0 quiet pyvmm.cmd=\"$(cat $TMPDIR/guest_cmd)\"" </dev/null \
  > $TMPDIR/guest.out 2> $TMPDIR/guest.err &
pv=$!
wait_log $TMPDIR/guest.out SECOND-DONE 600
echo "guest-seconds=$(echo "$(date +%s.%N) $start" | awk '{printf "%.1f", $1 - $2}')"
grep -e '^MOUNTED' -e '^GUEST-SHA' -e '^WRITE-DONE' -e '^OTHER=' -e '^REMOUNTED' -e '^SECOND-DONE' \
  $TMPDIR/guest.out
echo "lab-sees=$(cat $SHARE/from-guest 2>/dev/null)"
sleep 1  # the guest's reads go on
kill -KILL $vfsd; killed=$(date +%s.%N)
i=0; while kill -0 $pv 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $pv 2>/dev/null; then echo pyvmm=hung; kill -KILL $pv; else echo pyvmm=ended; fi
wait $pv; echo "rc=$?"
echo "stop-seconds=$(echo "$(date +%s.%N) $killed" | awk '{printf "%.1f", $1 - $2}')"
sed 's/^/err: /' $TMPDIR/guest.err
grep -e PYVMM-GUEST-EXIT $TMPDIR/guest.out
# under --seccomp true (the default): the kernel's records of a call a filter refused (none expected)
echo "seccomp-records=$(dmesg | grep -c 'type=1326')"
sec diagnostics
sed 's/^/vfsd: /' $TMPDIR/vfsd.log | tail -20
grep -v -e '^GUEST-SHA' $TMPDIR/guest.out | tail -30 | sed 's/^/guest: /'
sec end
""",
)


def _value(text: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}=(\S*)", text, re.MULTILINE)
    assert match, f"{key} missing:\n{text}"
    return match.group(1)


def _errors(text: str) -> list[str]:
    return [line[len("err: "):] for line in text.splitlines() if line.startswith("err: ")]


def test_virtio_fs_read_write_reset_and_a_killed_virtiofsd(lab) -> None:
    script = f"cat > $TMPDIR/guest_cmd <<'EOF'\n{GUEST}\nEOF\n" + SCRIPT
    proc = lab(script, devices="none", timeout=900, stall=600)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout
    print(out["boot"], out["diagnostics"])
    assert _value(out["backend"], "vfsd") == "ok", out["backend"]  # the lab sees the host's /usr

    boot = out["boot"]
    assert re.search(r"^MOUNTED", boot, re.MULTILINE), proc.stdout
    assert _value(boot, "GUEST-SHA") == _value(boot, "want-sha"), boot  # every byte read right
    assert re.search(r"^WRITE-DONE", boot, re.MULTILINE), boot
    assert _value(boot, "lab-sees") == NOTE, boot  # the guest's file is in the shared directory
    assert _value(boot, "OTHER") == "the-other-share", boot  # the second --fs beside the first
    assert re.search(r"^REMOUNTED", boot, re.MULTILINE), proc.stdout  # reset, set up again, mounted
    assert _value(boot, "GUEST-SHA2") == _value(boot, "want-sha"), boot

    # the first virtiofsd killed under a running guest: the VM stops, one line naming that --fs, exit status 1
    assert "pyvmm=ended" in boot and "rc=1" in boot, boot
    assert float(_value(boot, "stop-seconds")) < 15, boot
    errors = _errors(boot)
    assert len(errors) == 1, boot
    assert re.fullmatch(r"pyvmm: --fs tag=myfs,socket=\S+fs\.sock: the vhost-user backend closed the "
                        r"connection; the VM stops", errors[0]), errors
    assert "PYVMM-GUEST-EXIT" not in boot, boot  # stopped by pyvmm, not ended by the guest
    assert _value(boot, "seccomp-records") == "0", boot
