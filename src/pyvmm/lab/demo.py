"""`make demo`: the classic passthrough walkthrough, run in one lab.

List the host's devices, bind the SD card reader to vfio-pci, boot a guest with `--device path=...` whose
own sdhci-pci driver finds the reader and reads the card (its SHA-256 compared with the lab's), then give the
reader back to the host's sdhci-pci. Exits 0 when every step did what it should."""

from __future__ import annotations

import sys

from pyvmm.lab.runner import Lab, LabError, LabOptions

# No quotes of either kind: it travels inside pyvmm.cmd="..." inside a single-quoted --cmdline.
GUEST_CMD = (
    "modprobe mmc_block; i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo GUEST: the kernel log: sdhci-pci finds the reader, mmc0 finds the card; "
    "dmesg | grep -e sdhci -e mmc | grep -v line: | while read l; do echo GUEST: $l; done; "
    "echo GUEST: PCI functions and their drivers, from /sys/bus/pci/devices; "
    "for d in /sys/bus/pci/devices/*; do l=$(readlink $d/driver) || l=none; "
    "echo GUEST: ${d##*/} $(cat $d/vendor):$(cat $d/device) ${l##*/}; done; "
    "echo GUEST: sha256sum /dev/mmcblk0; echo GUEST-SHA256 $(sha256sum /dev/mmcblk0)"
)

DEMO_SCRIPT = r"""
step() { echo; echo "== $*"; }
run() { echo "\$ $*"; "$@"; }
drv() { l=$(readlink "/sys/bus/pci/devices/$1/driver") && basename "$l" || echo none; }
fail() { echo "DEMO FAILED: $*"; exit 1; }
READER=$(for d in /sys/bus/pci/devices/*; do [ "$(drv ${d##*/})" = sdhci-pci ] && echo ${d##*/}; done |
  head -1)
[ -n "$READER" ] || fail "no SD card reader on sdhci-pci in this lab"

step "1. The host's PCI devices, their drivers, IOMMU groups and whether each can be passed through"
run pyvmm-host list

step "2. Take the card reader $READER from the host's sdhci-pci and give it to vfio-pci (journalled)"
run pyvmm-host bind $READER || fail "pyvmm-host bind"
echo "   $READER is now on $(drv $READER); its IOMMU group is /dev/vfio/$(basename $(readlink \
  /sys/bus/pci/devices/$READER/iommu_group))"

step "3. Boot a guest with the reader: the guest's own sdhci-pci drives it through VFIO"
echo "   The reader has no reset (no FLR, no PM reset, on a root bus): pyvmm refuses it unless told, per"
echo "   device, that passing it as the host left it is fine: x_allow_no_reset=on (see SECURITY.md)."
echo "\$ pyvmm --kernel \$PYVMM_GUEST_KERNEL --initramfs \$PYVMM_GUEST_INITRAMFS --cpus boot=2 \\"
echo "    --memory size=512M --serial tty --console off \\"
echo "    --device path=/sys/bus/pci/devices/$READER/,x_allow_no_reset=on \\"
echo "    --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd=\"...\"'"
pyvmm --kernel "$PYVMM_GUEST_KERNEL" --initramfs "$PYVMM_GUEST_INITRAMFS" --cpus boot=2 --memory size=512M \
  --serial tty --console off --device path=/sys/bus/pci/devices/$READER/,x_allow_no_reset=on \
  --cmdline 'console=ttyS0 quiet panic=-1 pyvmm.cmd="@GUEST_CMD@"' > $TMPDIR/guest.log 2>&1
status=$?
grep -e '^GUEST:' -e 'pyvmm: ' $TMPDIR/guest.log | sed 's/^GUEST:/   [guest]/'
got=$(sed -n 's/^GUEST-SHA256 \([0-9a-f]*\).*/\1/p' $TMPDIR/guest.log)
echo "   [guest] $got  /dev/mmcblk0"
echo "   the lab's card:  $PYVMM_LAB_SD_SHA256"
echo "   pyvmm exited with status $status"
[ "$status" = 0 ] || fail "pyvmm exited with $status"
[ "$got" = "$PYVMM_LAB_SD_SHA256" ] || fail "the guest read something else than the card"
echo "   => the guest read the card exactly"

step "4. Give the reader back to the host"
run pyvmm-host unbind $READER || fail "pyvmm-host unbind"
i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "   $READER is on $(drv $READER) again; the host reads the card:"
echo "   $(sha256sum /dev/mmcblk0)"
[ "$(drv $READER)" = sdhci-pci ] || fail "the reader did not go back to sdhci-pci"

step "The same in one step: --device path=/sys/bus/pci/devices/$READER/,managed=on,x_allow_no_reset=on"
echo "binds the reader's group before the guest starts and gives it back when pyvmm exits (poweroff, panic,"
echo "error, Ctrl-C, SIGTERM)."
""".replace("@GUEST_CMD@", GUEST_CMD)


def main() -> int:
    try:
        return Lab().run(["sh", "-c", DEMO_SCRIPT], LabOptions())
    except LabError as exc:
        print(f"pyvmm-lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
