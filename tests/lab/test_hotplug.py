"""ACPI PCI hot-plug of a passed-through function (issue 18): a guest booted with no --device gets the lab's
SD reader (behind its own root port, so it can be reset) twice in a row, through `VirtualMachine.hotplug`
called from another thread of the process that runs the VM, as the REST API will call it.

Each round: add (managed=on: pyvmm binds the reader's group itself) → the GED interrupt → the guest's acpiphp
scans the slot and sdhci-pci binds → the guest hashes the card (it must match the lab's) → remove → the
guest ejects the slot (B0EJ) → pyvmm releases the function and gives it back to the lab host's sdhci-pci.
After the VM, the host reads the card again."""

from __future__ import annotations

import re

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

ROUNDS = 2

# The guest's side (pyvmm.cmd: no double quotes). Its markers are split by '' so that the command line the
# kernel may echo does not contain them.
GUEST = (
    "blk() { ls /dev/mmcblk[0-9] 2>/dev/null; }; "
    "modprobe sdhci-pci; modprobe mmc_block; echo GUEST-SLOTS $(ls /sys/bus/pci/slots | wc -l); r=1; "
    f"while [ $r -le {ROUNDS} ]; do echo HP-REA''DY $r; "
    "i=0; while [ $(blk | wc -l) = 0 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-SD $r $(sha256sum $(blk) | cut -d' ' -f1); "
    "echo GUEST-DRV $r $(ls /sys/bus/pci/drivers/sdhci-pci | grep :); "
    "echo HP-REMO''VE $r; "
    "i=0; while [ $(blk | wc -l) != 0 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-GONE $r $(ls /sys/bus/pci/drivers/sdhci-pci | grep -c :); r=$((r+1)); done; "
    "dmesg | grep -i -e acpiphp -e ' 0000:00:0' | tail -n 15 | sed 's/^/GUEST-DMESG /'"
)

# The VMM's side: pyvmm's own builder and VM objects, in one process, as `pyvmm` runs them.
DRIVER = r"""
import logging, os, sys, threading, time
from pyvmm.builder import build_vm
from pyvmm.config import parse_device, parse_vm_config
from pyvmm.machine import ExitKind

logging.basicConfig(level=logging.INFO, format="pyvmm: %(levelname)s: %(message)s", stream=sys.stderr)
log_path, sd, rounds, guest = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
config = parse_vm_config([
    "--kernel", os.environ["PYVMM_GUEST_KERNEL"], "--initramfs", os.environ["PYVMM_GUEST_INITRAMFS"],
    "--cpus", "boot=1", "--memory", "size=256M", "--console", "off", "--serial", f"file={log_path}",
    "--cmdline", f'console=ttyS0 quiet panic=-1 pyvmm.cmd="{guest}"'])
vm = build_vm(config)
removed = threading.Event()
vm.hotplug.on_removed = lambda ident, address: removed.set()

def console_has(marker, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as f:
            if marker in f.read():
                return True
        time.sleep(0.2)
    return False

def host_driver():
    link = f"/sys/bus/pci/devices/{sd}/driver"
    return os.path.basename(os.readlink(link)) if os.path.exists(link) else "none"

def drive():
    try:
        for r in range(1, rounds + 1):
            if not console_has(f"HP-READY {r}", 900 if r == 1 else 300):
                raise RuntimeError(f"round {r}: the guest never got ready")
            start = time.monotonic()
            address = vm.hotplug.add_vfio_device(parse_device(f"path=/sys/bus/pci/devices/{sd}/,managed=on"))
            added = time.monotonic() - start
            ident = next(i for i, a in vm.hotplug.devices().items() if a == address)
            print(f"ADDED {r} {ident} {address} host={host_driver()} call={added:.2f}s", flush=True)
            if not console_has(f"GUEST-SD {r}", 180):
                raise RuntimeError(f"round {r}: the guest never saw the card")
            print(f"ADD-TO-CARD {r} {time.monotonic() - start:.1f}s", flush=True)
            if not console_has(f"HP-REMOVE {r}"):
                raise RuntimeError(f"round {r}: the guest never asked for the removal")
            removed.clear()
            start = time.monotonic()
            vm.hotplug.remove_device(ident)
            if not removed.wait(180):
                raise RuntimeError(f"round {r}: the guest never ejected {ident}")
            print(f"EJECTED {r} {ident} {time.monotonic() - start:.1f}s left={sorted(vm.hotplug.devices())}",
                  flush=True)
            deadline = time.monotonic() + 60
            while host_driver() != "sdhci-pci" and time.monotonic() < deadline:
                time.sleep(0.1)
            print(f"HOST-BACK {r} {host_driver()} {time.monotonic() - start:.1f}s", flush=True)
    except Exception as exc:
        print(f"DRIVER-ERROR {type(exc).__name__}: {exc}", flush=True)
        vm.request_stop(ExitKind.ERROR, str(exc))

threading.Thread(target=drive, name="api", daemon=True).start()
try:
    result = vm.run()
finally:
    vm.close()
print(f"VM-EXIT {result.kind.value} {result.detail}", flush=True)
"""

SCRIPT = lab_script(
    r"""
cat > $TMPDIR/hotplug.py <<'EOF'
@DRIVER@
EOF
sec before; echo "$(drv $SD)"
sec run
timeout -k 10 1300 python3 $TMPDIR/hotplug.py $TMPDIR/guest.log $SD @ROUNDS@ "$GUEST" > $TMPDIR/vmm.log 2>&1
echo "rc=$?"
grep -e '^[A-Z-]* [0-9] ' -e '^DRIVER-ERROR' -e '^VM-EXIT' -e Traceback -e WARNING -e ERROR $TMPDIR/vmm.log
grep -e '^GUEST-' -e '^PYVMM-GUEST-EXIT' -e 'Traceback' $TMPDIR/guest.log
sec vmmlog  # for a failure's diagnosis
tail -n 60 $TMPDIR/vmm.log; tail -n 30 $TMPDIR/guest.log
sec host
echo "after: $(drv $SD)"; ls /run/pyvmm
echo "read=$(sha_of /dev/mmcblk0)"
echo "want=$PYVMM_LAB_SD_SHA256"
sec end
""".replace("@DRIVER@", DRIVER.strip()).replace("@ROUNDS@", str(ROUNDS)),
    SD="0000:01:00.0",
    GUEST="'" + GUEST.replace("'", "'\\''") + "'",
)


def test_sd_reader_hot_plugged_and_ejected_twice(lab) -> None:
    proc = lab(SCRIPT, devices="sd-port", timeout=1500)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout
    assert out["before"].strip() == "sdhci-pci", out["before"]
    run = out["run"]
    print("\n".join(line for line in run.splitlines()
                    if re.match(r"(ADDED|ADD-TO-CARD|EJECTED|HOST-BACK|GUEST-SLOTS) ", line)))
    assert "rc=0" in run and "VM-EXIT poweroff" in run, run
    assert "DRIVER-ERROR" not in run and "Traceback" not in run, run
    want = re.search(r"^want=(\w+)", out["host"], re.MULTILINE).group(1)
    slots = re.search(r"^GUEST-SLOTS (\d+)", run, re.MULTILINE)
    assert slots and int(slots.group(1)) >= 31, run  # acpiphp registered the ejectable slots
    for r in range(1, ROUNDS + 1):
        # Kata's form of the address: segment 0, bus 0, function 0
        added = re.search(rf"^ADDED {r} (\S+) (0000:00:[0-9a-f]{{2}}\.0) host=vfio-pci", run, re.MULTILINE)
        assert added, run
        assert re.search(rf"^GUEST-SD {r} {want}$", run, re.MULTILINE), run
        assert re.search(rf"^GUEST-DRV {r} {added.group(2)}$", run, re.MULTILINE), run
        assert re.search(rf"^EJECTED {r} {added.group(1)} \S+ left=\[\]$", run, re.MULTILINE), run
        assert re.search(rf"^GUEST-GONE {r} 0$", run, re.MULTILINE), run
        assert re.search(rf"^HOST-BACK {r} sdhci-pci ", run, re.MULTILINE), run
    host = out["host"]
    assert "after: sdhci-pci" in host and "host-journal.json" not in host, host
    assert re.search(rf"^read={want}$", host, re.MULTILINE), host
