"""ACPI PCI hot-plug of passed-through functions (issue 18), in one guest booted with no --device, through
`VirtualMachine.hotplug` called from another thread of the process that runs the VM, as the REST API's main
thread calls it; with the seccomp filters of `pyvmm --api-socket` on (--seccomp true: the API_VMM filter on
every thread before the VM is built, the vCPU's own on top; docs/seccomp.md).

First a display whose IOMMU group also holds an audio function is offered alone (managed=on): refused, the
group goes back to its host drivers, the guest goes on. Then three rounds: the SD reader (behind its own root
port, so it can be reset; INTx, a trapped BAR) twice, then the NVMe drive (MSI-X, BAR areas mapped into the
guest). Each round: add (managed=on: pyvmm binds the group itself) → the GED interrupt → the guest's acpiphp
scans the slot and the driver binds → the guest hashes the disk (it must match the lab's image) → remove →
the guest ejects the slot (B0EJ) → pyvmm releases the function and gives it back to the lab host's driver.
After the VM, the host reads the card and the drive again."""

from __future__ import annotations

import re

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

SD, DISP, AUD, NVME = "0000:01:00.0", "0000:00:04.0", "0000:00:04.1", "0000:00:05.0"
ROUNDS = [(SD, "sdhci-pci"), (SD, "sdhci-pci"), (NVME, "nvme")]

# The guest's side (pyvmm.cmd: no double quotes). Its markers are split by '' so that the command line the
# kernel may echo does not contain them.
GUEST = (
    "blk() { ls /dev/mmcblk[0-9] /dev/nvme[0-9]n1 2>/dev/null; }; "
    "drv() { ls /sys/bus/pci/drivers/sdhci-pci /sys/bus/pci/drivers/nvme | grep ^0000:; }; "
    "modprobe sdhci-pci; modprobe mmc_block; modprobe nvme; "
    "echo GUEST-SLOTS $(ls /sys/bus/pci/slots | wc -l); r=1; "
    f"while [ $r -le {len(ROUNDS)} ]; do echo HP-REA''DY $r; "
    "i=0; while [ $(blk | wc -l) = 0 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-SHA $r $(sha256sum $(blk) | cut -d' ' -f1); echo GUEST-DRV $r $(drv); "
    "echo HP-REMO''VE $r; "
    "i=0; while [ $(blk | wc -l) != 0 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST-GONE $r $(drv | wc -l); r=$((r+1)); done; "
    "dmesg | grep -i -e acpiphp -e ' 0000:00:0' | tail -n 15 | sed 's/^/GUEST-DMESG /'"
)

# The VMM's side: pyvmm's own builder and VM objects, in one process, as `pyvmm` runs them.
DRIVER = r"""
import logging, os, sys, threading, time
from pyvmm import seccomp
from pyvmm.builder import build_vm
from pyvmm.config import parse_device, parse_vm_config
from pyvmm.errors import PyvmmError
from pyvmm.machine import ExitKind
from pyvmm.sandbox import SeccompMode, ThreadKind
from pyvmm.threadname import set_thread_comm

logging.basicConfig(level=logging.INFO, format="pyvmm: %(levelname)s: %(message)s", stream=sys.stderr)
log_path, guest, partial = sys.argv[1], sys.argv[2], sys.argv[3]
rounds = [arg.split("=") for arg in sys.argv[4:]]  # function=host driver
config = parse_vm_config([
    "--kernel", os.environ["PYVMM_GUEST_KERNEL"], "--initramfs", os.environ["PYVMM_GUEST_INITRAMFS"],
    "--cpus", "boot=1", "--memory", "size=256M", "--console", "off", "--serial", f"file={log_path}",
    "--cmdline", f'console=ttyS0 quiet panic=-1 pyvmm.cmd="{guest}"'])
seccomp.install(SeccompMode.TRUE, ThreadKind.API_VMM)  # as `pyvmm --api-socket` before its first call
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

def host_driver(function):
    link = f"/sys/bus/pci/devices/{function}/driver"
    return os.path.basename(os.readlink(link)) if os.path.exists(link) else "none"

def managed(function):
    return parse_device(f"path=/sys/bus/pci/devices/{function}/,managed=on")

def drive():
    set_thread_comm("api")
    try:
        if not console_has("HP-READY 1", 900):
            raise RuntimeError("the guest never got ready")
        try:
            vm.hotplug.add_vfio_device(managed(partial))
            print("PARTIAL-ADDED", flush=True)
        except PyvmmError as exc:
            print(f"REFUSED {type(exc).__name__} {int(exc.exit_status)} {exc}", flush=True)
        print(f"PARTIAL-AFTER {sorted(vm.hotplug.devices())}", flush=True)
        for r, (function, driver) in enumerate(rounds, 1):
            if not console_has(f"HP-READY {r}"):
                raise RuntimeError(f"round {r}: the guest never got ready")
            start = time.monotonic()
            address = vm.hotplug.add_vfio_device(managed(function))
            added = time.monotonic() - start
            ident = next(i for i, a in vm.hotplug.devices().items() if a == address)
            print(f"ADDED {r} {ident} {address} host={host_driver(function)} call={added:.2f}s", flush=True)
            for task in sorted(os.listdir("/proc/self/task")):  # every thread's filters: mode, how many
                with open(f"/proc/self/task/{task}/status") as st:
                    status = dict(line.split(":", 1) for line in st.read().splitlines() if ":" in line)
                print(f"THREAD {r} {status['Name'].strip()} {status['Seccomp'].strip()} "
                      f"{status['Seccomp_filters'].strip()}", flush=True)
            if not console_has(f"GUEST-SHA {r}", 180):
                raise RuntimeError(f"round {r}: the guest never saw the disk")
            print(f"ADD-TO-DISK {r} {time.monotonic() - start:.1f}s", flush=True)
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
            while host_driver(function) != driver and time.monotonic() < deadline:
                time.sleep(0.1)
            print(f"HOST-BACK {r} {host_driver(function)} {time.monotonic() - start:.1f}s", flush=True)
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
release_fbcon
echo PYVMM_LAB_SD_SHA256=$PYVMM_LAB_SD_SHA256; echo PYVMM_LAB_NVME_SHA256=$PYVMM_LAB_NVME_SHA256
sec before; echo "$(drv $SD) $(drv $DISP) $(drv $AUD) $(drv $NVME)"
sec run
timeout -k 10 1300 python3 $TMPDIR/hotplug.py $TMPDIR/guest.log "$GUEST" $DISP @ROUNDS@ > $TMPDIR/vmm.log 2>&1
echo "rc=$?"
echo "seccomp-records: $(dmesg | grep 'type=1326' \
  | sed -n 's/.* comm="\([^"]*\)".* syscall=\([0-9]*\) .*/\1:\2/p' | sort | uniq -c | tr -s ' \n' ' ')"
grep -e '^[A-Z-]* [0-9] ' -e '^[A-Z]*-AFTER ' -e '^REFUSED ' -e '^PARTIAL' -e '^DRIVER-ERROR' -e '^VM-EXIT' \
  -e Traceback -e WARNING -e ERROR $TMPDIR/vmm.log
grep -e '^GUEST-' -e '^PYVMM-GUEST-EXIT' -e 'Traceback' $TMPDIR/guest.log
sec vmmlog  # for a failure's diagnosis
tail -n 60 $TMPDIR/vmm.log; tail -n 30 $TMPDIR/guest.log
sec host
echo "after: $(drv $SD) $(drv $DISP) $(drv $AUD) $(drv $NVME)"; ls /run/pyvmm
echo "card=$(sha_of /dev/mmcblk0)"
echo "nvme=$(sha_of /dev/nvme0n1)"
sec end
""".replace("@DRIVER@", DRIVER.strip()).replace("@ROUNDS@", " ".join(f"{f}={d}" for f, d in ROUNDS)),
    SD=SD, DISP=DISP, AUD=AUD, NVME=NVME,
    GUEST="'" + GUEST.replace("'", "'\\''") + "'",
)


def test_hot_plug_and_eject_the_sd_reader_twice_and_the_nvme_drive(lab) -> None:
    proc = lab(SCRIPT, devices="sd-port,gpu-audio,nvme", timeout=1500)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout
    before = out["before"].split()
    assert before[0] == "sdhci-pci" and before[3] == "nvme", out["before"]
    run = out["run"]
    print("\n".join(line for line in run.splitlines()
                    if re.match(r"(ADDED|ADD-TO-DISK|EJECTED|HOST-BACK|GUEST-SLOTS|REFUSED) ", line)))
    assert "rc=0" in run and "VM-EXIT poweroff" in run, run
    assert "DRIVER-ERROR" not in run and "Traceback" not in run, run
    # --seccomp true as `pyvmm --api-socket` runs it: a filter on every thread (the vCPU's own on top), and
    # no call its filters refused: the hot-plugs, the ejects on the vCPU thread, the give-backs all passed
    threads = re.findall(r"^THREAD 1 (\S+) (\d+) (\d+)$", run, re.MULTILINE)
    assert threads and all(mode == "2" for _name, mode, _count in threads), run
    assert ("vcpu0", "2", "2") in threads and ("api", "2", "1") in threads, run
    assert re.search(r"^seccomp-records: $", run, re.MULTILINE), run
    want = {SD: re.search(r"^PYVMM_LAB_SD_SHA256=(\w+)", proc.stdout, re.MULTILINE),
            NVME: re.search(r"^PYVMM_LAB_NVME_SHA256=(\w+)", proc.stdout, re.MULTILINE)}
    assert all(want.values()), proc.stdout
    sha = {function: match.group(1) for function, match in want.items() if match}
    slots = re.search(r"^GUEST-SLOTS (\d+)", run, re.MULTILINE)
    assert slots and int(slots.group(1)) >= 31, run  # acpiphp registered the ejectable slots

    # A function of a group not given whole: refused as at boot (exit status 2: usage), nothing plugged,
    # the group given back to its drivers, the guest goes on.
    assert re.search(rf"^REFUSED VfioConfigError 2 IOMMU group \d+ also holds {AUD}", run, re.MULTILINE), run
    assert "PARTIAL-ADDED" not in run and "PARTIAL-AFTER []" in run, run

    for r, (function, driver) in enumerate(ROUNDS, 1):
        # Kata's form of the address: segment 0, bus 0, function 0
        added = re.search(rf"^ADDED {r} (\S+) (0000:00:[0-9a-f]{{2}}\.0) host=vfio-pci", run, re.MULTILINE)
        assert added, run
        assert re.search(rf"^GUEST-SHA {r} {sha[function]}$", run, re.MULTILINE), run
        assert re.search(rf"^GUEST-DRV {r} {added.group(2)}$", run, re.MULTILINE), run
        assert re.search(rf"^EJECTED {r} {added.group(1)} \S+ left=\[\]$", run, re.MULTILINE), run
        assert re.search(rf"^GUEST-GONE {r} 0$", run, re.MULTILINE), run
        assert re.search(rf"^HOST-BACK {r} {driver} ", run, re.MULTILINE), run
    host = out["host"]
    assert f"after: {' '.join(before)}" in host and "host-journal.json" not in host, (before, host)
    assert f"card={sha[SD]}" in host and f"nvme={sha[NVME]}" in host, host
