"""An ELF vmlinux boots through the PVH entry, and the bzImage of the same kernel still boots (one lab)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

GUEST_CMD = "nproc; grep MemTotal /proc/meminfo; cat /proc/cmdline; dmesg | grep -e ACPI: -e BIOS-e820"


# What loading costs pyvmm itself in the lab (reading the file into guest RAM, the boot structures).
LOAD_TIMING = """python3 -c '
import os, time
from pyvmm import layout
from pyvmm.boot import load_kernel
from pyvmm.memory import GuestMemory
for var in ("PYVMM_GUEST_VMLINUX", "PYVMM_GUEST_KERNEL"):
    memory = GuestMemory.for_size(512 << 20)
    start = time.monotonic()
    load_kernel(memory, os.environ[var], "console=ttyS0", os.environ["PYVMM_GUEST_INITRAMFS"],
                layout.e820_entries(512 << 20), 0xA0000)
    print(f"PYVMM-LOAD-SECONDS {var}={time.monotonic() - start:.3f}")
'; """


def _boot(kernel_var: str, label: str) -> str:
    return (
        f'echo "=== {label} ==="; start=$(date +%s.%N); '
        f'pyvmm --kernel "${kernel_var}" --initramfs "$PYVMM_GUEST_INITRAMFS" '
        "--cpus boot=2 --memory size=512M "
        f"--serial tty --console off --cmdline 'console=ttyS0 pyvmm.cmd=\"{GUEST_CMD}\"'; status=$?; "
        'end=$(date +%s.%N); echo "PYVMM-STATUS=$status"; '
        "awk -v s=$start -v e=$end 'BEGIN { printf \"PYVMM-BOOT-SECONDS=%.2f\\n\", e - s }'; "
    )


def _check(out: str) -> float:
    assert "PYVMM-GUEST-EXIT=0" in out, out
    assert "PYVMM-STATUS=0" in out, out
    lines = [line.strip() for line in out.splitlines()]
    assert "2" in lines, out  # nproc
    memtotal = int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))
    assert abs(memtotal - 512 * 1024) / (512 * 1024) < 0.15, memtotal
    # The RSDP where pyvmm put it (the start info's rsdp_paddr, or the zero page's), then the tables.
    assert re.search(r"ACPI: RSDP 0x00000000000A0000", out), out
    assert re.search(r"ACPI: MCFG 0x00000000000A\w+", out), out
    bad = [line for line in lines if re.search(r"ACPI (Error|BIOS Error|Exception)", line)]
    assert not bad, bad
    return float(re.search(r"PYVMM-BOOT-SECONDS=([\d.]+)", out).group(1))


def test_pvh_vmlinux_and_bzimage_boot(lab) -> None:
    script = LOAD_TIMING + _boot("PYVMM_GUEST_VMLINUX", "PVH") + _boot("PYVMM_GUEST_KERNEL", "BZIMAGE")
    script += "true"
    proc = lab(script, devices="none")
    assert proc.returncode == 0, proc.stdout
    pvh, bzimage = proc.stdout.split("=== BZIMAGE ===")
    assert "=== PVH ===" in pvh, proc.stdout
    # The E820 map the kernel prints came from the start info's memory map.
    assert re.search(r"BIOS-e820: \[mem 0x0000000000100000-0x000000001fffffff\] usable", pvh), pvh
    pvh_s, bz_s = _check(pvh), _check(bzimage)
    print(f"boot time (VMM start to exit): PVH vmlinux {pvh_s:.2f} s, bzImage {bz_s:.2f} s")
    print("\n".join(re.findall(r"PYVMM-LOAD-SECONDS \S+", proc.stdout)))
