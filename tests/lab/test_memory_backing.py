"""`--memory` backings in the lab (issue 16), in one lab boot: a 1 GiB guest on 2 MiB hugetlb pages with
the SD reader passed through (the lab's HugePages_Free drops by 512 while it runs, the guest reads the card
right, the pages come back at exit); a pool too small is one `pyvmm:` line and exit 2; `shared=on` RAM is
a memfd, `prefault=on` RAM is all resident as soon as the guest kernel starts, `mergeable=on` RAM is marked
for KSM (each of the last two boots is the other's control)."""

from __future__ import annotations

import re

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

GUEST = (
    "modprobe mmc_block; i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-SD=$(sha256sum /dev/mmcblk0); sleep 5"  # the host reads its huge page count meanwhile
)

SCRIPT = lab_script(
    r"""
PYVMM="pyvmm --kernel $PYVMM_GUEST_KERNEL --initramfs $PYVMM_GUEST_INITRAMFS --cpus boot=1 --serial tty
  --console off"
free_huge() { awk '/^HugePages_Free:/ {print $2}' /proc/meminfo; }
wait_log() {  # wait_log FILE PATTERN: up to 120 s
  i=0; while ! grep -q "$2" "$1" && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
}
ram_maps() {  # ram_maps PID: every mapping of 128 MiB or more, one line each
  awk 'function out() { if (size >= 131072) print "MAP name=" name, "size=" size, "rss=" rss, "kps=" kps,
                          "flags=" flags }
       /^[0-9a-f]+-[0-9a-f]+ / { out(); name = ($6 == "" ? "anon" : $6); size = rss = kps = 0; flags = ""
                                 next }
       /^Size:/ { size = $2 } /^Rss:/ { rss = $2 } /^KernelPageSize:/ { kps = $2 }
       /^VmFlags:/ { for (i = 2; i <= NF; i++) flags = flags $i "," }
       END { out() }' /proc/$1/smaps
}
boot_and_look() {  # boot_and_look MEMORY: start a guest, look at pyvmm's RAM once the kernel runs, stop it
  $PYVMM --memory "$1" --cmdline 'console=ttyS0' > $TMPDIR/look.log 2>&1 &
  pid=$!
  wait_log $TMPDIR/look.log 'Linux version'
  ram_maps $pid
  kill -TERM $pid; wait $pid; echo "rc=$?"
  grep -o -e 'pyvmm: .*' -e Traceback $TMPDIR/look.log
}

sec small-pool
echo 64 > /proc/sys/vm/nr_hugepages; echo "total=$(cat /proc/sys/vm/nr_hugepages)"
$PYVMM --memory size=1G,hugepages=on,hugepage_size=2M --cmdline 'console=ttyS0' > $TMPDIR/small.log 2>&1
echo "rc=$?"; sed 's/^/out: /' $TMPDIR/small.log

sec hugepages
echo 600 > /proc/sys/vm/nr_hugepages; echo "total=$(cat /proc/sys/vm/nr_hugepages)"
echo "before=$(free_huge)"
$PYVMM --memory size=1G,hugepages=on,hugepage_size=2M \
  --device path=/sys/bus/pci/devices/$SD/,managed=on,x_allow_no_reset=on \
  --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd="@GUEST@"' > $TMPDIR/huge.log 2>&1 &
pid=$!
wait_log $TMPDIR/huge.log '^GUEST-SD='
echo "while=$(free_huge)"
ram_maps $pid
wait $pid; echo "rc=$?"
grep -e ^GUEST -e PYVMM-GUEST-EXIT -e 'pyvmm: ' -e Traceback $TMPDIR/huge.log
echo "after=$(free_huge)"
echo "want-sd=$PYVMM_LAB_SD_SHA256"
echo 0 > /proc/sys/vm/nr_hugepages

sec shared-prefault
boot_and_look size=512M,shared=on,prefault=on
sec mergeable
boot_and_look size=512M,mergeable=on
sec end
""".replace("@GUEST@", GUEST),
    SD="0000:00:03.0",
)


def _maps(text: str) -> list[dict[str, str]]:
    return [dict(item.split("=", 1) for item in line.split()[1:]) for line in text.splitlines()
            if line.startswith("MAP ")]


def _value(text: str, key: str) -> str:
    match = re.search(rf"^{key}=(\S*)", text, re.MULTILINE)
    assert match, text
    return match.group(1)


def test_hugepages_shared_prefault_mergeable(lab) -> None:
    # 1 GiB of huge pages for the guest and the lab's own needs besides: more than the default 2 GiB lab
    proc = lab(SCRIPT, devices="sd", memory=3072, timeout=600)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout

    small = out["small-pool"]  # one line, exit 2, what to write where
    assert _value(small, "total") == "64", small
    assert "rc=2" in small, small
    lines = [line for line in small.splitlines() if line.startswith("out: ")]
    assert len(lines) == 1, small
    assert re.fullmatch(
        r"out: pyvmm: --memory size=1024M: hugepages=on needs 512 huge pages of 2 MiB but 64 are free; "
        r"reserve them with: echo 512 > /proc/sys/vm/nr_hugepages",
        lines[0],
    ), small

    huge = out["hugepages"]
    before, during, after = (int(_value(huge, key)) for key in ("before", "while", "after"))
    assert before == 600 and before - during == 512 and after == before, huge  # VFIO pinned all of it
    ram = [m for m in _maps(huge) if m["name"].startswith("/memfd:pyvmm-ram")]
    assert len(ram) == 1 and ram[0]["size"] == str(1 << 20) and ram[0]["kps"] == "2048", huge
    assert "ht" in ram[0]["flags"].split(","), huge  # a hugetlb mapping
    assert "rc=0" in huge and "PYVMM-GUEST-EXIT=0" in huge and "Traceback" not in huge, huge
    assert _value(huge, "GUEST-SD") == _value(huge, "want-sd") != "", huge

    shared = out["shared-prefault"]
    (ram,) = _maps(shared)
    assert ram["name"].startswith("/memfd:pyvmm-ram") and ram["size"] == str(512 << 10), shared
    assert "sh" in ram["flags"].split(",") and "mg" not in ram["flags"].split(","), shared
    assert int(ram["rss"]) >= 512 << 10, shared  # every page resident while the kernel has just started
    assert "rc=0" in shared and "Traceback" not in shared, shared

    mergeable = out["mergeable"]
    (ram,) = _maps(mergeable)
    assert ram["name"] == "anon" and "mg" in ram["flags"].split(","), mergeable
    # no prefault: only what the boot touched so far (about 100 MiB: the kernel, the initramfs)
    assert int(ram["rss"]) < 256 << 10, mergeable
    assert "rc=0" in mergeable and "Traceback" not in mergeable, mergeable
