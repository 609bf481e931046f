"""`--disk`: the guest boots from its disk image over virtio-blk (issue 6 acceptance).

Inside the lab, $PYVMM_GUEST_DISK is a copy-on-write copy of the guest image (MBR, ext4 root on partition
1 at 1 MiB), so a test may change it freely.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

PART_OFFSET = 1 << 20

PYVMM = (
    'pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" '
    "--cpus boot=2 --memory size=512M --serial tty --console off"
)


def _line(out: str, text: str) -> bool:
    """Whether `text` is a whole output line (the kernel also echoes the command line, markers and all)."""
    return re.search(rf"^{re.escape(text)}\s*$", out, re.M) is not None


def _run(disk_opts: str, cmdline: str, extra: str = "") -> str:
    """Shell that runs pyvmm with `--disk disk_opts` and prints its status as PYVMM-STATUS=n."""
    return (
        f"{PYVMM} --disk {disk_opts} {extra} --cmdline '{cmdline}' < /dev/null; "
        'echo "PYVMM-STATUS=$?"'
    )


def test_boot_from_disk_and_guest_writes_reach_the_image(lab) -> None:
    guest = (
        "grep -e vda1 /proc/mounts; cat /sys/block/vda/ro; "
        "echo written-by-the-pyvmm-guest > /guest-note; sync; cat /guest-note"
    )
    script = (
        'sha_before=$(sha256sum "$PYVMM_GUEST_DISK" | cut -d" " -f1); '
        + _run('path="$PYVMM_GUEST_DISK"', f'console=ttyS0 root=/dev/vda1 rw pyvmm.cmd="{guest}"')
        + '; debugfs -R "cat /guest-note" "$PYVMM_GUEST_DISK?offset='
        + str(PART_OFFSET)
        + '" 2>/dev/null | sed "s/^/IMAGE: /"; '
        'sha_after=$(sha256sum "$PYVMM_GUEST_DISK" | cut -d" " -f1); '
        '[ "$sha_before" != "$sha_after" ] && echo IMAGE-CHANGED'
    )
    # the qemu-storage-daemon pyvmm started is gone with pyvmm, and its private directory too (the lab shows
    # the outside /tmp: only this run's directories count)
    script = "ls -d /tmp/pyvmm-disk-* > /tmp/dirs-before 2>/dev/null; " + script.replace(
        f"{PYVMM} --disk", f"{PYVMM} -v --disk", 1) + (
        '; echo "DAEMONS-LEFT=$(pgrep -c -x qemu-storage-da)"; '
        "ls -d /tmp/pyvmm-disk-* 2>/dev/null | grep -vxF -f /tmp/dirs-before | sed s/^/LEFT:/"
    )
    proc = lab(script, devices="none")
    out = proc.stdout
    assert "PYVMM-STATUS=0" in out, out
    assert "PYVMM-GUEST-EXIT=0" in out, out
    # the default --disk is served by a qemu-storage-daemon pyvmm supervises (docs/virtio-blk.md)
    assert re.search(r"^pyvmm: INFO: --disk path=\S+: served by a qemu-storage-daemon pyvmm started, over "
                     r"vhost-user \(1 queue\(s\) of 128, io_uring, an iothread (not )?polling.*, through the "
                     r"page cache; pyvmm sees no request\)$", out, re.M), out
    assert _line(out, "DAEMONS-LEFT=0") and "LEFT:" not in out, out
    assert re.search(r"^/dev/vda1 / ext4 rw", out, re.M), out  # root is the disk's first partition
    assert "IMAGE: written-by-the-pyvmm-guest" in out, out  # found in the image by debugfs afterwards
    assert _line(out, "IMAGE-CHANGED"), out


def test_readonly_disk_guest_write_fails_and_image_unchanged(lab) -> None:
    guest = (
        "cat /sys/block/vda/ro; grep -e vda1 /proc/mounts; "
        "echo x > /guest-note && echo FILE-WRITE-OK; "
        "dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null && echo RAW-WRITE-OK; "
        "dd if=/dev/vda of=/dev/null bs=4096 count=16 2>/dev/null && echo RAW-READ-OK"
    )
    script = (
        'sha_before=$(sha256sum "$PYVMM_GUEST_DISK" | cut -d" " -f1); '
        + _run('path="$PYVMM_GUEST_DISK",readonly=on', f'console=ttyS0 root=/dev/vda1 pyvmm.cmd="{guest}"')
        + '; sha_after=$(sha256sum "$PYVMM_GUEST_DISK" | cut -d" " -f1); '
        'echo "SHA-BEFORE=$sha_before"; echo "SHA-AFTER=$sha_after"'
    )
    proc = lab(script, devices="none")
    out = proc.stdout
    assert "PYVMM-STATUS=0" in out, out
    assert re.search(r"^1\s*$", out, re.M), out  # /sys/block/vda/ro
    assert not _line(out, "FILE-WRITE-OK") and not _line(out, "RAW-WRITE-OK"), out
    assert _line(out, "RAW-READ-OK"), out
    before = re.search(r"SHA-BEFORE=(\w+)", out).group(1)
    after = re.search(r"SHA-AFTER=(\w+)", out).group(1)
    assert before == after


def test_image_errors_before_boot(lab) -> None:
    """Missing image, a directory, and an image another pyvmm is writing: one line each, exit 2. Then the
    qemu-storage-daemon serving that other pyvmm's disk is killed: it stops in one line naming the disk and
    the daemon, exit 1 (docs/virtio-blk.md#a-dead-backend)."""
    hold = _run('path="$PYVMM_GUEST_DISK"', 'console=ttyS0 root=/dev/vda1 pyvmm.cmd="sleep 600"')
    script = (
        f"({hold}) > /tmp/first.log 2>&1 & "
        "i=0; while ! grep -q pyvmm-guest /tmp/first.log && [ $i -lt 600 ]; do sleep 0.5; i=$((i+1)); done; "
        f"pv() {{ {PYVMM} \"$@\"; }}; "
        'd="$PYVMM_GUEST_DISK"; '
        'for opts in path=/nonexistent.img path=/tmp "path=$d" "path=$d,readonly=on"; do '
        "  pv --disk \"$opts\" --cmdline console=ttyS0 > /tmp/out.log 2>&1 < /dev/null; "
        '  echo "CASE $opts STATUS=$? LINES=$(wc -l < /tmp/out.log)"; sed "s/^/ERR: /" /tmp/out.log; '
        "done; "
        'pkill -KILL -x qemu-storage-da && echo DAEMON-KILLED; wait; sed "s/^/FIRST: /" /tmp/first.log'
    )
    proc = lab(script, devices="none")
    out = proc.stdout
    cases = re.findall(r"^CASE (\S+) STATUS=(\d+) LINES=(\d+)", out, re.M)
    assert len(cases) == 4, out
    for _opts, status, lines in cases:
        assert status == "2" and lines == "1", out
    assert re.search(r"no such file|does not exist", out) and "directory" in out, out
    assert out.count("in use by another VM") == 2, out
    assert _line(out, "DAEMON-KILLED"), out
    assert re.search(r"^FIRST: pyvmm: --disk path=\S+: the qemu-storage-daemon serving it \(pid \d+\) "
                     r"exited: .*; the VM stops$", out, re.M), out
    assert _line(out, "FIRST: PYVMM-STATUS=1"), out


def test_several_disks_and_scratch_io(lab) -> None:
    """Boot disk plus a scratch disk with serial=, discard and a write/read-back with checksums."""
    guest = (
        "cat /sys/block/vdb/serial; echo; cat /sys/block/vdb/size; "
        "dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null; "
        "dd if=/tmp/pat of=/dev/vdb bs=1M oflag=direct 2>/dev/null; "
        "dd if=/dev/vdb of=/tmp/back bs=1M count=8 iflag=direct 2>/dev/null; "
        "cmp /tmp/pat /tmp/back && echo SCRATCH-ROUNDTRIP-OK; "
        "sha256sum /tmp/pat | sed s/^/GUEST-SHA=/"
    )
    script = (
        "truncate -s 64M /tmp/scratch.img; "
        + _run('path="$PYVMM_GUEST_DISK"', f'console=ttyS0 root=/dev/vda1 pyvmm.cmd="{guest}"',
               extra="--disk path=/tmp/scratch.img,serial=scratch-0001,num_queues=2,queue_size=256")
        + "; head -c 8388608 /tmp/scratch.img | sha256sum | sed s/^/HOST-SHA=/"
    )
    proc = lab(script, devices="none")
    out = proc.stdout
    assert "PYVMM-STATUS=0" in out, out
    assert _line(out, "scratch-0001"), out
    assert re.search(r"^131072\s*$", out, re.M), out  # 64 MiB in sectors
    assert _line(out, "SCRATCH-ROUNDTRIP-OK"), out
    guest_sha = re.search(r"^GUEST-SHA=(\w+)", out, re.M).group(1)
    host_sha = re.search(r"HOST-SHA=(\w+)", out).group(1)
    assert guest_sha == host_sha, out
