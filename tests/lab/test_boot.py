"""pyvmm boots Linux (issue: KVM core, direct kernel boot, serial console, ACPI and the PCI root)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.lab

GUEST_CMD = (
    "nproc; grep MemTotal /proc/meminfo; ls /sys/bus/pci/devices; dmesg | grep -i -e ACPI: -e MCFG -e PCI"
)


def _boot_script(cpus: int, memory: str, guest_cmd: str = GUEST_CMD, extra: str = "") -> str:
    return (
        f'start=$(date +%s.%N); pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" '
        f"--cpus boot={cpus} --memory size={memory} --serial tty --console off {extra} "
        f"--cmdline 'console=ttyS0 pyvmm.cmd=\"{guest_cmd}\"'; status=$?; "
        'echo "PYVMM-STATUS=$status"; exit $status'
    )


def _check_boot(out: str, cpus: int, mem_kib: int) -> None:
    assert "PYVMM-GUEST-EXIT=0" in out, out
    assert "PYVMM-STATUS=0" in out, out
    lines = [line.strip() for line in out.splitlines()]
    assert str(cpus) in lines, out  # nproc
    memtotal = int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))
    assert abs(memtotal - mem_kib) / mem_kib < 0.15, memtotal
    assert "0000:00:00.0" in out  # the host bridge
    assert re.search(r"ACPI: MCFG 0x00000000000A\w+", out), out  # the table, found where we put it
    mmconfig = r"PCI: MMCONFIG for domain 0000 \[bus 00-00\] at \[mem 0xe8000000-0xe80fffff\]"
    assert re.search(mmconfig, out), out
    assert re.search(r"ACPI: PCI Root Bridge \[PC00\] \(domain 0000 \[bus 00\]\)", out), out
    bad = [line for line in lines if re.search(r"ACPI (Error|BIOS Error|Exception)|MCFG.*(not|error)", line)]
    assert not bad, bad


@pytest.mark.parametrize(("cpus", "memory", "mem_kib"), [(2, "512M", 512 * 1024), (4, "512M", 512 * 1024)])
def test_boot_to_userspace(lab, cpus: int, memory: str, mem_kib: int) -> None:
    proc = lab(_boot_script(cpus, memory), devices="none")
    assert proc.returncode == 0, proc.stdout
    _check_boot(proc.stdout, cpus, mem_kib)


def test_boot_with_ram_above_4g(lab) -> None:
    proc = lab(_boot_script(2, "4G"), devices="none", memory=3072)
    assert proc.returncode == 0, proc.stdout
    _check_boot(proc.stdout, 2, 4 * 1024 * 1024)
