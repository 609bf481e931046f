"""The REST API on --api-socket (issue 18, part 1): Kata Containers' start and stop replayed against pyvmm
in one lab boot and one guest boot, the API's error cases and pyvmm-remote (tests/lab/helpers/kata_api.py)."""

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
    assert "bad_json=400 unknown=404 boot_before_create=500" in steps["errors"], steps
    assert "status=500" in steps["unbound-device"] and "vfio-pci" in steps["unbound-device"], steps
    assert "state=Running" in steps["kata-start"] and "vcpu0" in steps["kata-start"], steps
    assert "ticks_while_paused=0" in steps["pause-resume"], steps
    stop = dict(item.split("=") for item in steps["kata-stop"].split())
    assert float(stop["exited"]) < KATA_EXIT_SECONDS, steps["kata-stop"]
    assert stop["rc"] == "0"


# Hot-plug through the API, as Kata drives it (vm.add-device / vm.remove-device), with pyvmm-remote's
# ch-remote syntax: the SD reader (alone behind a root port: resettable) plugged into a guest booted with no
# --device, hashed by the guest, ejected, given back to the lab's sdhci-pci; a display offered without the
# audio function of its IOMMU group is refused with a 4xx and the VM goes on.
HOTPLUG_GUEST = (
    "modprobe sdhci-pci; modprobe mmc_block; echo HP-REA''DY; "
    "i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-SHA $(sha256sum /dev/mmcblk0 | cut -d' ' -f1); echo HP-REMO''VE; "
    "i=0; while [ -b /dev/mmcblk0 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; echo GUEST-GO''NE; "
    "sleep 600"  # until vmm.shutdown
)

HOTPLUG = lab_script(
    r"""
release_fbcon
waitfor() {
  i=0; while ! grep -q "$1" $TMPDIR/guest.log 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.2; i=$((i+1)); done
}
R="pyvmm-remote --api-socket $TMPDIR/api.sock"
sec before; echo "$(drv $SD) $(drv $DISP)"
sec run
pyvmm --kernel $PYVMM_GUEST_KERNEL --initramfs $PYVMM_GUEST_INITRAMFS --cpus boot=1 --memory size=256M \
  --console off --serial file=$TMPDIR/guest.log --api-socket path=$TMPDIR/api.sock \
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
for t in /proc/$pid/task/*; do  # the filters of every thread (docs/seccomp.md): name, mode, how many
  echo "thread $(cat $t/comm) $(grep -e '^Seccomp:' -e '^Seccomp_filters:' $t/status | cut -f2 | tr '\n' ' ')"
done
cat > $TMPDIR/tree.py <<'EOF'
import json, sys
tree = json.load(sys.stdin)["device_tree"]  # vm.info's: id=bdf of every PCI device
print(" ".join(f"{name}={node['pci_bdf']}" for name, node in sorted(tree.items())))
EOF
tree() { $R info | python3 $TMPDIR/tree.py; }
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
$R shutdown-vmm; echo "shutdown-rc=$?"
wait $pid; echo "vmm-rc=$?"
echo "seccomp-records: $(dmesg | grep 'type=1326' \
  | sed -n 's/.* comm="\([^"]*\)".* syscall=\([0-9]*\) .*/\1:\2/p' | sort | uniq -c | tr -s ' \n' ' ')"
grep -e Traceback -e 'pyvmm: ' $TMPDIR/vmm.log
sec host
echo "card=$(sha_of /dev/mmcblk0)"; echo "want=$PYVMM_LAB_SD_SHA256"; ls /run/pyvmm
sec end
""",
    SD="0000:01:00.0",
    DISP="0000:00:04.0",
    GUEST="'" + HOTPLUG_GUEST.replace("'", "'\\''") + "'",
)


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
    assert "remove-rc=0" in run and "GUEST-GONE" in run and "host-after: sdhci-pci" in run, run
    assert "shutdown-rc=0" in run and "vmm-rc=0" in run and "Traceback" not in run, run
    # --seccomp true (the default): a filter on every thread, the server's and the vCPU's own on top of the
    # API_VMM one, and no call the kernel had to refuse or log
    # (a virtio worker carries the name of the vCPU thread that started it, with one filter more)
    threads = re.findall(r"^thread (\S+) (\d+) (\d+) $", run, re.MULTILINE)
    assert ("http-server", "2", "2") in threads and ("vcpu0", "2", "2") in threads, run
    assert threads and all(mode == "2" for _name, mode, _count in threads), run
    assert re.search(r"^seccomp-records: $", run, re.MULTILINE), run
    assert f"card={want.group(1)}" in out["host"] and "host-journal.json" not in out["host"], out["host"]
