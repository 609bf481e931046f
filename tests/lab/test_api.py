"""The REST API on --api-socket (issue 18): Kata Containers' start and stop replayed against pyvmm in one
lab boot and one guest boot, with its NIC (vm.add-net with a tap fd) and one hot-plugged by pyvmm-remote,
the API's error cases and pyvmm-remote (tests/lab/helpers/kata_api.py)."""

from __future__ import annotations

import re

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

# Kata SIGKILLs the VMM 3 s after vmm.shutdown; the lab is an emulated (TCG) machine running a nested
# guest, so the bound holds there with room to spare only if pyvmm's teardown is quick.
KATA_EXIT_SECONDS = 3.0

# The kernel's seccomp audit records (type 1326: a call a filter refused, or logged under --seccomp log),
# counted by system call number, after `command`; the command's exit status is kept.
SECCOMP_RECORDS = """{command}; rc=$?
echo "seccomp-records: $(dmesg | grep 'type=1326' \\
  | sed -n 's/.* comm="\\([^"]*\\)".* syscall=\\([0-9]*\\) .*/\\1:\\2/p' | sort | uniq -c | tr -s ' \\n' ' ')"
exit $rc"""


def test_kata_start_stop_errors_and_remote(lab) -> None:
    command = SECCOMP_RECORDS.format(command='python3 tests/lab/helpers/kata_api.py "$TMPDIR"')
    proc = lab(command, devices="sd", timeout=600)
    out = proc.stdout
    assert proc.returncode == 0 and "KATA-API-DONE" in out, out
    # every pyvmm here ran with --seccomp true (the default): no call refused (nor logged) by its filters
    assert re.search(r"^seccomp-records: $", out, re.MULTILINE), out
    assert "Traceback" not in out, out
    steps = {m.group(1): m.group(2) for m in re.finditer(r"^STEP (\S+) ?(.*)$", out, re.MULTILINE)}
    print("\n".join(f"{name}: {facts}" for name, facts in steps.items()))
    assert "bad_json=400 unknown=404 boot_before_create=500" in steps["errors"], steps
    assert "status=500" in steps["unbound-device"] and "vfio-pci" in steps["unbound-device"], steps
    assert "state=Running" in steps["kata-start"] and "vcpu0" in steps["kata-start"], steps
    # issue 18 part 2: Kata's add-net before boot (a pipe, a wrong count and one file twice refused first),
    # a NIC hot-plugged by pyvmm-remote, both pinged through and removed, pyvmm's tap files and vhost-nets
    # counted
    assert "refused=400,400,400 added=204" in steps["kata-add-net"], steps
    # the hot-plugged NIC's id continues the VM's one counter: _net0, then _fs1 and _vsock2, as CH counts
    assert '"bdf": "0000:00:' in steps["nics"] and '"id": "_net3"' in steps["nics"], steps
    assert "ticks_while_paused=0" in steps["pause-resume"], steps
    # issue 20: a disk hot-plugged into the VM (RAM shared for virtio-fs) is served by a qemu-storage-daemon,
    # read by the guest, ejected: its daemon stops and the VM goes on (then plugged again for the boots)
    assert steps["hotplug-daemon"].startswith(
        "daemons_added=1 read=kdisk-by-a-daemon daemons_removed=0 state=Running"), steps
    # three boots of the VM (start, vm.reboot, vm.shutdown + vm.boot), the guest waited for at the first and
    # the last, which saw the disk hot-plugged before vm.reboot
    # and after vm.reboot, vm.shutdown and vm.boot: one qemu-storage-daemon for kdisk, none, one again
    assert steps["reboot"] == "boots=3 guest_ups=2 disks_at_boot=1 daemons=1,0,1", steps
    stop = dict(item.split("=") for item in steps["kata-stop"].split())
    assert float(stop["exited"]) < KATA_EXIT_SECONDS, steps["kata-stop"]
    assert stop["rc"] == "0"
    # Kata's virtio-fs (vm.create's fs, memory.shared): each of the three VMs had its own virtiofsd, which
    # ended with it; the two guests waited for mounted it and read the lab's file
    note = "shared-by-the-lab-through-virtiofsd"
    assert steps["kata-fs"] == f"reads={note},{note} served=0,0,0", steps


# Hot-plug through the API, as Kata drives it (vm.add-device / vm.remove-device), with pyvmm-remote's
# ch-remote syntax: the SD reader (alone behind a root port: resettable) plugged into a guest booted with no
# --device, hashed by the guest, ejected, given back to the lab's sdhci-pci; a display offered without the
# audio function of its IOMMU group is refused with a 4xx and the VM goes on.
# Then in the same guest (issue 18, the rest): a virtio-blk disk through vm.add-disk (hashed and written by
# the guest, its counters read before and after), removed (the guest ejects it: the event on
# --event-monitor, the image closed, its worker thread gone), and the ACPI power button: the guest's own
# button driver (button.ko and evdev.ko, appended to the initramfs) reports KEY_POWER on its input device.
HOTPLUG_GUEST = (
    "modprobe sdhci-pci; modprobe mmc_block; echo HP-REA''DY; "
    "i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-SHA $(sha256sum /dev/mmcblk0 | cut -d' ' -f1); echo HP-REMO''VE; "
    "i=0; while [ -b /dev/mmcblk0 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; echo GUEST-GO''NE; "
    "modprobe virtio_blk; echo DISK-REA''DY; "
    "i=0; while [ ! -b /dev/vda ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo DISK-SHA $(sha256sum /dev/vda | cut -d' ' -f1); "
    "echo pyvmm-hotplugged | dd of=/dev/vda conv=fsync 2>/dev/null; sync; echo DISK-WRO''TE; "
    "insmod /pyvmm-extra/button.ko; insmod /pyvmm-extra/evdev.ko; "
    "for e in /sys/class/input/event*; do grep -q 'Power Button' $e/device/name && ev=${e##*/}; done; "
    "dd if=/dev/input/$ev of=/tmp/ev bs=24 count=1 2>/dev/null & "
    "sleep 0.5; echo PB-REA''DY $ev; "
    "i=0; while [ ! -s /tmp/ev ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo PB-EVENT $(od -An -tx1 -j16 -N8 /tmp/ev); "
    # the button is also the host's go for a second read of the whole disk (from the disk, not the cache)
    "echo 3 > /proc/sys/vm/drop_caches; echo DISK-SHA2 $(sha256sum /dev/vda | cut -d' ' -f1); "
    "i=0; while [ -b /dev/vda ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; echo DISK-GO''NE; "
    "sleep 600"  # until vmm.shutdown
)

HOTPLUG = lab_script(
    r"""
release_fbcon
waitfor() {
  i=0; while ! grep -q "$1" $TMPDIR/guest.log 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.2; i=$((i+1)); done
}
R="pyvmm-remote --api-socket $TMPDIR/api.sock"
sum() { python3 tests/lab/helpers/api_summary.py "$@"; }
sec before; echo "$(drv $SD) $(drv $DISP)"
sec run
python3 tests/lab/helpers/guest_extra_initramfs.py $TMPDIR/initrd || echo no-initrd
pyvmm --kernel $PYVMM_GUEST_KERNEL --initramfs $TMPDIR/initrd --cpus boot=1 --memory size=256M \
  --console off --serial file=$TMPDIR/guest.log --api-socket path=$TMPDIR/api.sock \
  --event-monitor path=$TMPDIR/events.json \
  --cmdline "console=ttyS0 quiet panic=-1 pyvmm.cmd=\"$GUEST\"" > $TMPDIR/vmm.log 2>&1 &
pid=$!
waitfor HP-READY
$R add-device path=/sys/bus/pci/devices/$DISP/,managed=on,x_allow_no_reset=on; echo "partial-rc=$?"
$R ping > /dev/null; echo "ping-rc=$?"
i=0; while [ "$(drv $DISP)" != bochs-drm ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
echo "disp-after: $(drv $DISP)"
$R add-device path=/sys/bus/pci/devices/$SD/,managed=on > $TMPDIR/added.json; echo "add-rc=$?"
cat $TMPDIR/added.json; echo
echo "host-during: $(drv $SD)"
tree() {  # vm.info: device_tree | config
  $R info > $TMPDIR/info.json; echo "$(sum tree < $TMPDIR/info.json) | $(sum config < $TMPDIR/info.json)"
}
threads() {  # the filters of every thread (docs/seccomp.md): name, mode, how many
  for t in /proc/$pid/task/*; do
    echo "thread $(cat $t/comm) $(grep -e '^Seccomp:' -e '^Seccomp_filters:' $t/status | cut -f2 \
      | tr '\n' ' ')"
  done
}
threads
echo "tree-plugged: $(tree)"
waitfor GUEST-SHA
grep ^GUEST-SHA $TMPDIR/guest.log
waitfor HP-REMOVE
id=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' $TMPDIR/added.json)
$R remove-device "$id"; echo "remove-rc=$?"
waitfor GUEST-GONE
grep ^GUEST-GONE $TMPDIR/guest.log
i=0; while [ "$(drv $SD)" != sdhci-pci ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
echo "host-after: $(drv $SD)"
echo "tree-ejected: $(tree)"
sec disk
dd if=/dev/urandom of=$TMPDIR/hp.img bs=1M count=4 2>/dev/null; echo "disk-want=$(sha256sum < $TMPDIR/hp.img)"
waitfor DISK-READY
$R add-disk path=$TMPDIR/hp.img,id=hpdisk; echo "disk-add-rc=$?"
echo "tree-disk: $(tree)"
waitfor DISK-WROTE
grep ^DISK-SHA $TMPDIR/guest.log
threads
echo "counters-used: $($R counters | sum counters)"
echo "disk-head=$(head -c 16 $TMPDIR/hp.img)"
sec button
waitfor PB-READY
echo "counters-idle: $($R counters | sum counters)"
$R power-button; echo "button-rc=$?"
waitfor PB-EVENT
grep -e ^PB-READY -e ^PB-EVENT $TMPDIR/guest.log
waitfor DISK-SHA2
grep ^DISK-SHA2 $TMPDIR/guest.log
echo "disk-now=$(sha256sum < $TMPDIR/hp.img)"
echo "counters-reread: $($R counters | sum counters)"
sec remove
workers() { cat /proc/$pid/task/*/comm | grep -c virtio-blk-hpd; }
echo "open-before=$(ls -l /proc/$pid/fd | grep -c hp.img) workers-before=$(workers)"
$R remove-device hpdisk; echo "disk-remove-rc=$?"
waitfor DISK-GONE
i=0; while ! grep -q '"id": "hpdisk"' $TMPDIR/events.json && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
echo "open-after=$(ls -l /proc/$pid/fd | grep -c hp.img) workers-after=$(workers)"
echo "counters-removed: $($R counters)"
echo "tree-disk-ejected: $(tree)"
sec stop
$R shutdown-vmm; echo "shutdown-rc=$?"
wait $pid; echo "vmm-rc=$?"
echo "seccomp-records: $(dmesg | grep 'type=1326' \
  | sed -n 's/.* comm="\([^"]*\)".* syscall=\([0-9]*\) .*/\1:\2/p' | sort | uniq -c | tr -s ' \n' ' ')"
grep -e Traceback -e 'pyvmm: ' $TMPDIR/vmm.log
echo "events: $(sum events < $TMPDIR/events.json)"
sec host
echo "card=$(sha_of /dev/mmcblk0)"; echo "want=$PYVMM_LAB_SD_SHA256"; ls /run/pyvmm
sec end
""",
    SD="0000:01:00.0",
    DISP="0000:00:04.0",
    GUEST="'" + HOTPLUG_GUEST.replace("'", "'\\''") + "'",
)


def _values(section: str, name: str) -> dict[str, int]:
    """`name: key=value ...` of a section, as ints."""
    line = re.search(rf"^{name}: (.*)$", section, re.MULTILINE)
    assert line, section
    return {key: int(value) for key, value in (item.split("=") for item in line.group(1).split())}


def test_hot_plug_through_the_api_with_pyvmm_remote(lab) -> None:
    proc = lab(HOTPLUG, devices="sd-port,gpu-audio", timeout=900)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout
    assert out["before"].split() == ["sdhci-pci", "bochs-drm"], out["before"]
    run = out["run"]
    # the display alone: its group also holds the audio function; refused (pyvmm-remote: exit 1, the 400 on
    # stderr), given back, and the VMM answers on
    assert "partial-rc=1" in run and "400" in run and "also holds" in run, run
    assert "ping-rc=0" in run and "disp-after: bochs-drm" in run, run
    added = re.search(r'^\{"id": ?"([^"]+)", ?"bdf": ?"(0000:00:[0-9a-f]{2}\.0)"\}$', run, re.MULTILINE)
    assert "add-rc=0" in run and added and "host-during: vfio-pci" in run, run
    want = re.search(r"^want=(\w{64})$", out["host"], re.MULTILINE)
    assert want and f"GUEST-SHA {want.group(1)}" in run, (run, out["host"])
    plugged = re.search(r"^tree-plugged: (.*)$", run, re.MULTILINE)
    ejected = re.search(r"^tree-ejected: (.*)$", run, re.MULTILINE)
    assert plugged and f"{added.group(1)}={added.group(2)}" in plugged.group(1).split(), run
    assert ejected and "__rng=" in ejected.group(1) and added.group(1) not in ejected.group(1), run
    # vm.info's config follows the VM, as CH's does (what vm.reboot boots again): the hot-plugged function
    # in it with its id while plugged, gone once ejected
    assert f"| disks= devices={added.group(1)}" in plugged.group(1), run
    assert "| disks= devices=" in ejected.group(1) and added.group(1) not in ejected.group(1), run
    assert "remove-rc=0" in run and "GUEST-GONE" in run and "host-after: sdhci-pci" in run, run
    # --seccomp true (the default): a filter on every thread, the server's and the vCPU's own on top of the
    # API_VMM one (docs/seccomp.md#threads-and-their-lists)
    threads = re.findall(r"^thread (\S+) (\d+) (\d+) $", run, re.MULTILINE)
    assert ("http-server", "2", "2") in threads and ("vcpu0", "2", "2") in threads, run
    assert threads and all(mode == "2" for _name, mode, _count in threads), run
    # a virtio worker is started by the vCPU thread the guest's DRIVER_OK write runs on: it inherits that
    # thread's two filters and adds its own
    assert all(count == "3" for name, _mode, count in threads if name.startswith("virtio-")), run
    assert f"card={want.group(1)}" in out["host"] and "host-journal.json" not in out["host"], out["host"]
    # vm.add-disk: the guest reads the image the host wrote and writes to it; one id space (hpdisk given)
    disk = out["disk"]
    assert "disk-add-rc=0" in disk and re.search(r'^\{"id": ?"hpdisk", ?"bdf": ?"0000:00:[0-9a-f]{2}\.0"\}$',
                                                   disk, re.MULTILINE), disk
    disk_want = re.search(r"^disk-want=(\w{64})", disk, re.MULTILINE)
    assert disk_want and f"DISK-SHA {disk_want.group(1)}" in disk, disk
    assert "disk-head=pyvmm-hotplugged" in disk, disk
    assert re.search(r"^tree-disk: .*hpdisk=0000:00:.* \| disks=hpdisk devices=$", disk, re.MULTILINE), disk
    # its worker (named after the disk's id, 15 bytes) under the API_VMM, vCPU and virtio-worker filters
    assert re.search(r"^thread virtio-blk-hpdi 2 3 $", disk, re.MULTILINE), disk
    # vm.counters: the guest's reads (the whole 4 MiB image at least) and its write, counted
    used = _values(disk, "counters-used")
    assert used["hpdisk.read_bytes"] >= 4 << 20 and used["hpdisk.read_ops"] > 0, disk
    assert used["hpdisk.write_bytes"] >= 512 and used["hpdisk.write_ops"] >= 1, disk
    # vm.power-button: the guest's ACPI button driver reports KEY_POWER (EV_KEY 1, code 116, pressed); the
    # guest waited for it to read the disk again: the counters grow by the whole disk
    button = out["button"]
    assert "button-rc=0" in button and re.search(r"^PB-READY event\d+$", button, re.MULTILINE), button
    assert "PB-EVENT 01 00 74 00 01 00 00 00" in button, button
    now = re.search(r"^disk-now=(\w{64})", button, re.MULTILINE)  # the image with the guest's write
    assert now and now.group(1) != disk_want.group(1) and f"DISK-SHA2 {now.group(1)}" in button, button
    idle, reread = _values(button, "counters-idle"), _values(button, "counters-reread")
    assert reread["hpdisk.read_bytes"] >= idle["hpdisk.read_bytes"] + (4 << 20), button
    assert reread["hpdisk.read_ops"] > idle["hpdisk.read_ops"], button
    # vm.remove-device: the guest ejects it; the image file is closed and the worker thread gone
    remove = out["remove"]
    assert "disk-remove-rc=0" in remove, remove
    assert "open-before=1 workers-before=1" in remove and "open-after=0 workers-after=0" in remove, remove
    assert "counters-removed: {}" in remove, remove
    ejected = re.search(r"^tree-disk-ejected: (.*)$", remove, re.MULTILINE)
    assert ejected and "hpdisk" not in ejected.group(1) and "__rng=" in ejected.group(1), remove
    assert ejected.group(1).endswith("| disks= devices="), remove
    stop = out["stop"]
    assert "shutdown-rc=0" in stop and "vmm-rc=0" in stop and "Traceback" not in stop, stop
    # no call the kernel had to refuse or log, on any thread, all along (the eject of both devices included)
    assert re.search(r"^seccomp-records: $", stop, re.MULTILINE), stop
    # --event-monitor: the whole life, both removals (the SD reader's id was generated: _vfio0)
    events = re.search(r"^events: (.*)$", stop, re.MULTILINE)
    assert events and events.group(1).split() == [
        "vmm/starting", "vm/booting", "vm/booted", f"vm/device-removed:{added.group(1)}",
        "vm/device-removed:hpdisk", "vm/shutdown", "vm/deleted", "vmm/shutdown"], stop
