"""The lab itself (issue: Foundation and the lab), checked against its real kernel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pyvmm.lab.assets import load_manifest
from pyvmm.lab.paths import AssetPaths

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]

INVENTORY = r"""
set -u
for g in /sys/kernel/iommu_groups/*; do echo "GROUP $(basename $g): $(ls $g/devices | tr '\n' ' ')"; done
for d in /sys/bus/pci/devices/*; do
  drv=$(basename "$(readlink $d/driver)" 2>/dev/null || true)
  echo "DEV $(basename $d) $(cat $d/vendor):$(cat $d/device) ${drv:--}"
done
test -c /dev/vfio/vfio && echo VFIO-CONTAINER-OK
test -c /dev/kvm && echo KVM-OK
echo "SD-SHA $(sha256sum /dev/mmcblk0 | cut -d' ' -f1) $PYVMM_LAB_SD_SHA256"
echo "NVME-SHA $(sha256sum /dev/nvme0n1 | cut -d' ' -f1) $PYVMM_LAB_NVME_SHA256"
"""


def _parse_inventory(out: str) -> tuple[dict[str, set[str]], dict[str, tuple[str, str]]]:
    groups: dict[str, set[str]] = {}
    devices: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        if line.startswith("GROUP "):
            name, members = line[6:].split(":", 1)
            groups[name] = set(members.split())
        elif line.startswith("DEV "):
            bdf, ids, driver = line[4:].split()
            devices[bdf] = (ids, driver)
    return groups, devices


def test_default_lab_is_a_passthrough_host(lab) -> None:
    proc = lab(INVENTORY)
    out = proc.stdout
    assert proc.returncode == 0, out
    groups, devices = _parse_inventory(out)
    by_ids = {ids: bdf for bdf, (ids, _) in devices.items()}
    display, audio = by_ids["0x1234:0x1111"], by_ids["0x8086:0x293e"]
    shared = [members for members in groups.values() if display in members]
    assert shared == [{display, audio}], groups  # the pair, and nothing else, in one group
    assert devices[by_ids["0x1b36:0x0007"]][1] == "sdhci-pci"
    assert devices[by_ids["0x1b36:0x0010"]][1] == "nvme"
    assert devices[by_ids["0x8086:0x10d3"]][1] == "e1000e"
    assert devices[by_ids["0x1af4:0x1009"]][1] == "virtio-pci"  # the lab's own root filesystem
    assert "VFIO-CONTAINER-OK" in out and "KVM-OK" in out
    for tag in ("SD-SHA", "NVME-SHA"):
        line = next(x for x in out.splitlines() if x.startswith(tag))
        seen, expected = line.split()[1:]
        assert seen == expected, line  # the native driver reads the card and the drive
    # No default VGA or NIC from QEMU: every device is the lab's, the 9p root or the q35 chipset.
    assert all(bdf.startswith("0000:00:") for bdf in devices)
    chipset = {bdf for bdf in devices if bdf.endswith(("00:00.0", "00:1f.0", "00:1f.2", "00:1f.3"))}
    assert len(devices) - len(chipset) == 1 + 6  # 9p + sd, display, audio, nvme, nic, edu


def test_nested_kvm_runs_real_mode_code(lab) -> None:
    proc = lab([sys.executable, "-m", "pyvmm.kvm.selftest"], devices="none")
    assert proc.returncode == 0, proc.stdout


def test_exit_status_is_the_commands(lab) -> None:
    assert lab("false", devices="none").returncode == 1
    assert lab("exit 7", devices="none").returncode == 7


@pytest.mark.filterwarnings("ignore:the command ran again in a new lab")  # the restart is the point
def test_a_stalled_lab_is_replaced_and_a_stalled_command_gets_the_labs_backtraces(lab) -> None:
    """The pulse (pyvmm/lab/pulse.py) and --stall-timeout. In the first lab the command stops the process
    that answers the pulse, as a stalled emulated host would: after --pulse-timeout the lab shows its
    backtraces and the command runs again in a new lab (PYVMM_LAB_ATTEMPT=2). There the pulse's bytes
    interrupt the lab every second; then the command goes silent and --stall-timeout ends the lab, after its
    kernel printed its CPUs' backtraces and every task's stack (magic SysRq over the serial line)."""
    script = (
        'echo "ATTEMPT $PYVMM_LAB_ATTEMPT"; '
        'if [ "$PYVMM_LAB_ATTEMPT" = 1 ]; then kill -STOP "$(cat /run/pyvmm-lab-pulse.pid)"; fi; '
        "irqs() { grep ttyS1 /proc/interrupts | awk '{print $2}'; }; "
        'a=$(irqs); sleep 4; echo "PULSE-IRQS $a $(irqs)"; '
        "echo started; sleep 600; echo never"
    )
    proc = lab(script, devices="none", stall=20, pulse=10)
    first, out = proc.before_restart, proc.stdout
    assert "ATTEMPT 1" in first and "ATTEMPT 1" not in out, first
    assert "the lab stalled: it answered no pulse for 10 s" in first, first
    assert "NMI backtrace for cpu 0" in first, first
    assert "running the command again in a new lab (attempt 2)" in first, first
    assert proc.returncode == 124, out
    assert "ATTEMPT 2" in out and "started" in out and "never" not in out, out
    irqs = re.search(r"^PULSE-IRQS (\d+) (\d+)$", out, re.M)
    assert irqs, out
    before, after = int(irqs[1]), int(irqs[2])
    assert after - before >= 3, out  # a byte a second, each an interrupt (and the answer's own)
    assert "printed nothing for 20 s" in out and "no pulse" not in out
    assert "NMI backtrace for cpu 0" in out and "sysrq: Show State" in out and "task:sleep" in out, out
    assert "CPU#0" in out and "RIP=" in out  # and, from QEMU's monitor, where each lab CPU is


@pytest.mark.filterwarnings("ignore:the command ran again in a new lab")  # the restart is the point
def test_a_lab_that_ends_early_says_why(lab) -> None:
    """A lab that stops before its command finishes says whether the emulated host was reset or powered
    itself off (QMP's SHUTDOWN reason): under -no-reboot both end QEMU with status 0. A reset lab runs the
    command again in a new lab (once, by default), as a stalled one does; one that powered off does not."""
    proc = lab("echo started; echo b > /proc/sysrq-trigger; sleep 120", devices="none")
    assert proc.returncode == 125, proc.stdout
    first = proc.before_restart  # the first lab's output (conftest.py: what came before the restart)
    for out in (first, proc.stdout):
        assert "started" in out, (first, proc.stdout)
        assert "the lab stopped before the command finished" in out, (first, proc.stdout)
        assert "the lab was reset" in out, (first, proc.stdout)
    proc = lab("echo o > /proc/sysrq-trigger; sleep 120", devices="none")
    assert proc.returncode == 125, proc.stdout
    assert "the lab powered itself off" in proc.stdout, proc.stdout
    assert proc.before_restart == "", proc.stdout


def test_repeated_devices(lab) -> None:
    script = (
        "for d in /sys/bus/pci/devices/*; do "
        '[ "$(cat $d/device)" = 0x1111 ] && echo "VGA $(head -1 $d/resource)"; done; true'
    )
    proc = lab(script, devices="vga16,vga16")
    assert proc.returncode == 0, proc.stdout
    bars = [line.split()[1:3] for line in proc.stdout.splitlines() if line.startswith("VGA ")]
    assert len(bars) == 2, proc.stdout
    for start, end in bars:
        assert int(end, 16) - int(start, 16) + 1 == 16 << 20


def test_each_run_starts_from_fresh_images(lab) -> None:
    """Writes to the lab's drives and the guest disk inside one run never leak into the next."""
    dirty = (
        "echo scribble | dd of=/dev/nvme0n1 conv=notrunc status=none && sync && "
        'echo scribble | dd of="$PYVMM_GUEST_DISK" conv=notrunc status=none && '
        'sha256sum /dev/nvme0n1 "$PYVMM_GUEST_DISK"'
    )
    manifest = load_manifest()
    first = lab(dirty, devices="nvme")
    assert first.returncode == 0, first.stdout
    assert manifest.nvme_sha256 not in first.stdout  # the scribble really changed both
    assert manifest.guest_disk_sha256 not in first.stdout
    second = lab('sha256sum /dev/nvme0n1 "$PYVMM_GUEST_DISK"', devices="nvme")
    assert second.returncode == 0, second.stdout
    assert manifest.nvme_sha256 in second.stdout and manifest.guest_disk_sha256 in second.stdout


GUEST_BOOTS = r"""
set -u
run() { timeout 300 qemu-system-x86_64 -enable-kvm -M q35 -cpu host -m 512 -nodefaults -nographic \
  -no-reboot -serial stdio -kernel "$PYVMM_GUEST_KERNEL" "$@" 2>&1 | tr -d '\r'; }
echo "== initramfs"
run -initrd "$PYVMM_GUEST_INITRAMFS" \
  -append 'console=ttyS0 panic=-1 pyvmm.cmd="echo GUEST-SAYS-$((6*7)); grep -c ^processor /proc/cpuinfo"'
echo "== disk"
run -initrd "$PYVMM_GUEST_INITRAMFS" -drive file="$PYVMM_GUEST_DISK",if=virtio,format=raw \
  -append 'console=ttyS0 panic=-1 root=/dev/vda1 rw pyvmm.cmd="cat /etc/hostname; grep -c vda1 /proc/mounts"'
"""


def test_guest_assets_boot_under_qemu_in_the_lab(lab) -> None:
    proc = lab(GUEST_BOOTS, devices="none")
    out = proc.stdout
    assert proc.returncode == 0, out
    initramfs_part, disk_part = out.split("== disk")
    assert "GUEST-SAYS-42" in initramfs_part and "PYVMM-GUEST-EXIT=0" in initramfs_part, out
    assert "pyvmm-guest" in disk_part and "PYVMM-GUEST-EXIT=0" in disk_part, out
    assert "\n1\n" in disk_part  # the root filesystem really is /dev/vda1


def test_second_build_downloads_nothing() -> None:
    paths = AssetPaths()
    before = {p.name: p.stat().st_mtime_ns for p in paths.assets.iterdir()}
    debs_before = sorted(p.name for p in paths.debs.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm.lab", "build"], capture_output=True, text=True, env=os.environ
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "downloading" not in proc.stdout and "building" not in proc.stdout, proc.stdout
    after = {p.name: p.stat().st_mtime_ns for p in paths.assets.iterdir()}
    changed = {k for k in before if before[k] != after.get(k) and k != "manifest.json"}
    assert not changed
    assert sorted(p.name for p in paths.debs.iterdir()) == debs_before
    assert json.loads(paths.manifest.read_text())["kernel_release"]


KVM_PATCHING = r"""
set -u
T=/sys/kernel/tracing
[ -e $T/kprobe_events ] || mount -t tracefs nodev $T
# Every jump-label site the kernel rewrites goes through this function: count its calls.
echo 'p:pyvmm_patch arch_jump_label_transform_queue' >> $T/kprobe_events
echo 1 > $T/events/kprobes/pyvmm_patch/enable
hits() { awk '$1 == "pyvmm_patch" {print $2}' $T/kprobe_profile; }
# A VM as a VMM makes one (irqchip, a vCPU), then gone; the wait covers KVM's deferred (1 s) key updates.
vm() {
  python3 -c 'import fcntl, os; k = os.open("/dev/kvm", os.O_RDWR); v = fcntl.ioctl(k, 0xAE01, 0)
fcntl.ioctl(v, 0xAE60, 0); fcntl.ioctl(v, 0xAE41, 0)'
  sleep 2.5
}
anchor=$(cat /run/pyvmm-kvm-anchor)
echo "ANCHOR-VMS $(ls -l /proc/$anchor/fd | grep -c 'kvm-vm')"
a=$(hits); vm; vm; echo "WITH-ANCHOR $(( $(hits) - a ))"
kill $anchor; sleep 2.5
a=$(hits); vm; echo "WITHOUT-ANCHOR $(( $(hits) - a ))"
"""


def test_vmm_starts_in_the_lab_rewrite_no_kernel_code(lab) -> None:
    """The lab holds one idle KVM VM, so a VM created and destroyed flips no static key: that code
    patching (the scheduler's preempt-notifier hook among it) has livelocked the emulated lab."""
    proc = lab(KVM_PATCHING)
    out = proc.stdout
    assert proc.returncode == 0, out
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ", 1)[0] in (
        "ANCHOR-VMS", "WITH-ANCHOR", "WITHOUT-ANCHOR"))
    assert lines.get("ANCHOR-VMS") == "1", out
    assert lines.get("WITH-ANCHOR") == "0", out
    assert int(lines.get("WITHOUT-ANCHOR", "0")) > 0, out  # the probe sees patching when there is some


def _checkout_under_tmp(root: Path) -> Path:
    """A clone of this checkout with a minimal venv of its own (what `pip install -e` amounts to: a .pth
    naming the clone's src, and a `pyvmm` script on the venv's python), all under `root`."""
    clone = root / "pyvmm-clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "pyvmm-clone.pth").write_text(f"{clone / 'src'}\n")
    script = venv / "bin" / "pyvmm"
    script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom pyvmm.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return clone


def test_the_lab_shows_the_outside_tmp(lab) -> None:
    """A file and a checkout (with its venv) under the outside /tmp are there inside the lab; /tmp stays
    writable there, and writes in the lab never reach the outside /tmp."""
    root = Path(tempfile.mkdtemp(prefix="pyvmm-lab-tmp-", dir="/tmp"))
    try:
        (root / "outside.txt").write_text("made-outside\n")
        clone = _checkout_under_tmp(root)
        script = (
            f"cat {root}/outside.txt; "
            f"cd {clone} && ./.venv/bin/pyvmm --help | head -1; "
            "./.venv/bin/python -c 'import pyvmm; print(\"IMPORTED\", pyvmm.__file__)'; "
            f'echo inside > "$TMPDIR/pyvmm-lab-written" && echo > {root}/from-lab && echo TMP-WRITABLE'
        )
        proc = lab(script, devices="none")
        out = proc.stdout
        assert proc.returncode == 0, out
        assert "made-outside" in out, out
        assert "usage: pyvmm" in out, out
        assert f"IMPORTED {clone}/src/pyvmm/__init__.py" in out, out
        assert "TMP-WRITABLE" in out, out
        assert not (root / "from-lab").exists()  # the overlay's writes stay in the lab
    finally:
        shutil.rmtree(root, ignore_errors=True)
