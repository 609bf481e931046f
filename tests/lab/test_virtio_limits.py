"""Issue 19: a guest drives virtio-blk's queue by hand with requests that cost 40x (or 60x) its RAM.

Linux's virtio_blk splits what it sends to fit the advertised limits, so the hostile requests cannot come
through it: the guest reads the limits its driver sees (/sys/block/vda/queue), runs a normal workload
through the driver, then unbinds the driver and plays the driver itself with busybox `devmem` on the
device's BAR and on RAM it reserved (`memmap=16M$0x6000000`): a descriptor table, rings and indirect
tables the lab wrote into the disk image (the guest copies them into that RAM with `dd` to /dev/mem).
Each request is published and kicked on its own and its status byte and used length are printed:

- a DISCARD naming the same 256 MiB of guest RAM in 126 descriptors (31.5 GiB if pyvmm gathered it:
  before issue 19 pyvmm copied the payload before looking at its size), and the review's WRITE_ZEROES
  over one megabyte 40 times: IOERR;
- over seg_max (127 data segments in 128 descriptors, reading and writing) and over size_max (one 2 MiB
  segment): IOERR;
- at the limits: 126 x 4 KiB reads and writes over one page, 126 x 1 MiB reads over one megabyte
  (126 MiB, read in place), a one-segment discard: OK.

Then the driver is bound again (a device reset) and the workload runs once more. The lab reads pyvmm's
VmHWM when the guest starts the hostile part and when it has finished: it must not grow by more than
HWM_GROWTH_BOUND, and stays under HWM_BOUND in all (the guest has 512 MiB).

These are the limits of pyvmm's in-process worker, so the disk is served by it (PYVMM_STORAGE_DAEMON=off);
a default --disk's requests go to a qemu-storage-daemon and never reach pyvmm.
"""

from __future__ import annotations

import re
import shlex

import pytest

pytestmark = pytest.mark.lab

MiB = 1 << 20
HWM_GROWTH_BOUND = 64 * MiB  # what the hostile part may add to pyvmm's peak RSS (it was 31.5 GiB)
HWM_BOUND = 1024 * MiB  # 512 MiB of guest RAM plus pyvmm itself

# Expected (status, used length) per request, by the name the guest prints.
EXPECTED = {
    "discard-126x256MiB": (1, 1),
    "write-zeroes-40x1MiB": (1, 1),
    "read-127-segments": (1, 1),
    "write-127-segments": (1, 1),
    "read-2MiB-segment": (1, 1),
    "read-126x4KiB-one-page": (0, 126 * 4096 + 1),
    "write-126x4KiB-one-page": (0, 1),
    "read-126x1MiB-one-megabyte": (0, 126 * MiB + 1),
    "discard-one-segment": (0, 1),
}

# Writes /tmp/hostile.img: the guest's script at 0 (padded with newlines), the memory image of the
# reserved RAM (rings, tables, headers) at 1 MiB, 128 MiB in all.
MAKE_IMAGE = r"""
import struct
R = 0x6000000  # the guest's reserved RAM (memmap=16M$0x6000000): its rings and tables
DESC, AVAIL, USED, HDRS, STAT, TABLES = 0x0, 0x1000, 0x2000, 0x3000, 0x3800, 0x4000
SHARED_HDR, SHARED_STATUS, SEG = 0x10000, 0x12000, 0x14000  # header+data, data+status, a discard segment
PAGE = R + 0x100000  # the page (or megabyte) every data descriptor names
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
IN, OUT, DISCARD, WRITE_ZEROES = 0, 1, 11, 13
blob = bytearray(0x20000)
reqs = []

def request(name, req_type, sector, data, header_shared=False, status_shared=False):
    k = len(reqs)
    hdr = R + (SHARED_HDR if header_shared else HDRS + 16 * k)
    struct.pack_into("<IIQ", blob, hdr - R, req_type, 0, sector)
    if header_shared:
        table = [(hdr, 16 + 4096, 0)] + data
    else:
        table = [(hdr, 16, 0)] + data
    if status_shared:
        table.append((R + SHARED_STATUS, 4097, F_WRITE))
        status = SHARED_STATUS + 4096
    else:
        status = STAT + k
        table.append((R + status, 1, F_WRITE))
    blob[status] = 0xFF
    t = TABLES + 0x1000 * k
    assert 16 * len(table) <= 0x1000 and len(table) <= 128, name
    for i, (addr, length, flags) in enumerate(table):
        more = F_NEXT if i < len(table) - 1 else 0
        struct.pack_into("<QIHH", blob, t + 16 * i, addr, length, flags | more, i + 1)
    struct.pack_into("<QIHH", blob, DESC + 16 * k, R + t, 16 * len(table), F_INDIRECT, 0)
    struct.pack_into("<H", blob, AVAIL + 4 + 2 * k, k)
    reqs.append((k, name, status))

request("discard-126x256MiB", DISCARD, 0, [(PAGE, 256 << 20, 0)] * 126)
request("write-zeroes-40x1MiB", WRITE_ZEROES, 0, [(PAGE, 1 << 20, 0)] * 40)
request("read-127-segments", IN, 0, [(PAGE, 4096, F_WRITE)] * 126, status_shared=True)
request("write-127-segments", OUT, 65536, [(PAGE, 4096, 0)] * 126, header_shared=True)
request("read-2MiB-segment", IN, 0, [(PAGE, 2 << 20, F_WRITE)])
request("read-126x4KiB-one-page", IN, 0, [(PAGE, 4096, F_WRITE)] * 126)
request("write-126x4KiB-one-page", OUT, 65536, [(PAGE, 4096, 0)] * 126)
request("read-126x1MiB-one-megabyte", IN, 0, [(PAGE, 1 << 20, F_WRITE)] * 126)
struct.pack_into("<QII", blob, SEG, 98304, 8, 0)
request("discard-one-segment", DISCARD, 0, [(R + SEG, 16, 0)])

calls = "\n".join(f"req {k} {name} {status:#x}" for k, name, status in reqs)
script = GUEST.replace("@REQUESTS@", calls).encode()
assert len(script) < 0x10000
with open("/tmp/hostile.img", "wb") as f:
    f.truncate(128 << 20)
    f.write(script + b"\n" * (0x10000 - len(script)))
    f.seek(1 << 20)
    f.write(blob)
"""

GUEST = r"""
q=/sys/block/vda/queue
echo GUEST-LIMITS max_segments=$(cat $q/max_segments) max_segment_size=$(cat $q/max_segment_size) \
  max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb) discard_max_bytes=$(cat $q/discard_max_bytes) \
  max_discard_segments=$(cat $q/max_discard_segments)
workload() {
  dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
  dd if=/tmp/pat of=/dev/vda bs=1M seek=64 oflag=direct conv=fsync 2>/dev/null
  dd if=/dev/vda of=/tmp/back bs=1M skip=64 count=4 iflag=direct 2>/dev/null
  cmp /tmp/pat /tmp/back && echo GUEST-ROUNDTRIP-OK-$1
  blkdiscard -o $((80 << 20)) -l $((16 << 20)) /dev/vda && echo GUEST-DISCARD-OK-$1
}
workload 1
dd if=/dev/vda of=/tmp/blob bs=64k skip=16 count=2 2>/dev/null
P=$(readlink -f /sys/block/vda/device/..); BDF=${P##*/}
echo $BDF > /sys/bus/pci/drivers/virtio-pci/unbind
printf '\006' | dd of=$P/config bs=1 seek=4 conv=notrunc 2>/dev/null
B=$(( $(head -1 $P/resource | cut -d' ' -f1) ))
R=$((0x6000000))
dd if=/tmp/blob of=/dev/mem bs=64k seek=$((R / 65536)) conv=notrunc 2>/dev/null || echo GUEST-DEVMEM-FAILED
w() { devmem $((B + $1)) $2 $3; }
m() { devmem $((R + $1)) $2 $3; }
echo GUEST-RAW cfg_size_max=$(( $(w 0x2008 32) )) cfg_seg_max=$(( $(w 0x200c 32) )) \
  cfg_max_discard_seg=$(( $(w 0x2028 32) )) table0=$(m 0x0 32)
w 0x14 8 0; w 0x14 8 1; w 0x14 8 3
w 0x08 32 0; w 0x0c 32 $(( (1 << 1) | (1 << 2) | (1 << 13) | (1 << 14) | (1 << 28) ))
w 0x08 32 1; w 0x0c 32 1
w 0x14 8 11
echo GUEST-FEATURES-STATUS=$(w 0x14 8)
w 0x16 16 0; w 0x18 16 128
w 0x20 32 $R; w 0x24 32 0; w 0x28 32 $((R + 0x1000)); w 0x2c 32 0; w 0x30 32 $((R + 0x2000)); w 0x34 32 0
w 0x1c 16 1; w 0x14 8 15
echo GUEST-DRIVER-STATUS=$(w 0x14 8)
req() {
  m 0x1002 16 $(($1 + 1)); w 0x3000 16 0
  i=0; while [ $(( $(m 0x2002 16) )) -le $1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
  echo "REQ $2 STATUS=$(( $(m $3 8) )) USED=$(( $(m $((0x2008 + 8 * $1)) 32) ))"
}
echo HOSTILE-START; sleep 5
@REQUESTS@
echo HOSTILE-DONE; sleep 5
w 0x14 8 0
echo $BDF > /sys/bus/pci/drivers/virtio-pci/bind
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
workload 2
"""

LAB = r"""
python3 - <<'EOF'
GUEST = open("/tmp/guest.sh").read()
@MAKE_IMAGE@
EOF
PYVMM_STORAGE_DAEMON=off pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" \
  --cpus boot=1 --memory size=512M \
  --serial tty --console off --disk path=/tmp/hostile.img --cmdline @CMDLINE@ \
  > /tmp/guest.log 2>&1 < /dev/null &
PID=$!
wait_for() {
  i=0
  while ! grep -q "^$1" /tmp/guest.log && kill -0 $PID 2>/dev/null && [ $i -lt 2400 ]; do
    sleep 0.25; i=$((i + 1))
  done
}
hwm() { sed -n 's/^VmHWM:[^0-9]*\([0-9]*\) kB/\1/p' /proc/$PID/status; }
wait_for HOSTILE-START; echo "HWM-BEFORE-KIB=$(hwm)"
wait_for HOSTILE-DONE; sleep 1; echo "HWM-AFTER-KIB=$(hwm)"
wait $PID; echo "PYVMM-STATUS=$?"
grep -e GUEST -e REQ -e HOSTILE -e virtio-blk -e Traceback -e Error /tmp/guest.log
echo "WARNINGS=$(grep -c virtio-blk: /tmp/guest.log)"
"""


def test_hostile_virtqueue_requests_are_refused_and_cost_nothing(lab) -> None:
    cmdline = ("console=ttyS0 panic=-1 iomem=relaxed memmap=16M$0x6000000 "
               'pyvmm.cmd="dd if=/dev/vda of=/tmp/s bs=64k count=1 2>/dev/null; sh /tmp/s"')
    script = (
        f"cat > /tmp/guest.sh <<'GUEST_EOF'\n{GUEST}\nGUEST_EOF\n"
        + LAB.replace("@MAKE_IMAGE@", MAKE_IMAGE).replace("@CMDLINE@", shlex.quote(cmdline))
    )
    proc = lab(script, devices="none", timeout=900)
    out = proc.stdout
    print("\n".join(line for line in out.splitlines()
                    if re.match(r"(GUEST|REQ|HWM|PYVMM-|WARN|HOSTILE)", line)))
    assert "PYVMM-STATUS=0" in out and "PYVMM-GUEST-EXIT=0" in out, out
    assert "Traceback" not in out and "GUEST-DEVMEM-FAILED" not in out, out
    # The limits Linux's driver took from the config space, and a normal workload through it.
    assert re.search(r"^GUEST-LIMITS max_segments=126 max_segment_size=1048576 .*max_discard_segments=1",
                     out, re.M), out
    assert "GUEST-RAW cfg_size_max=1048576 cfg_seg_max=126 cfg_max_discard_seg=1" in out, out
    for n in (1, 2):  # before the attack, and after it with the driver bound again (a reset)
        assert f"GUEST-ROUNDTRIP-OK-{n}" in out and f"GUEST-DISCARD-OK-{n}" in out, out
    assert re.search(r"^GUEST-DRIVER-STATUS=0x0*F$", out, re.M | re.I), out
    # Every hand-made request answered as the limits say, the device serving on after the refusals.
    got = {m.group(1): (int(m.group(2)), int(m.group(3)))
           for m in re.finditer(r"^REQ (\S+) STATUS=(\d+) USED=(\d+)", out, re.M)}
    assert got == EXPECTED, out
    # pyvmm's peak RSS did not grow with what the requests named, and its warnings were rate-limited.
    before = int(re.search(r"^HWM-BEFORE-KIB=(\d+)", out, re.M).group(1)) * 1024
    after = int(re.search(r"^HWM-AFTER-KIB=(\d+)", out, re.M).group(1)) * 1024
    assert after - before < HWM_GROWTH_BOUND and after < HWM_BOUND, (before, after)
    assert int(re.search(r"^WARNINGS=(\d+)", out, re.M).group(1)) <= 12, out
