"""`make demo`: boot the lab and show what a passthrough host looks like from the inside."""

from __future__ import annotations

import sys

from pyvmm.lab.runner import Lab, LabError, LabOptions

DEMO_SCRIPT = r"""
echo "== The lab: $(uname -r), $(nproc) CPU, IOMMU: $(ls /sys/class/iommu 2>/dev/null | tr '\n' ' ')"
echo
echo "== PCI devices and the drivers the host bound them to (lspci -nnk)"
lspci -nnk | grep -v -e Subsystem -e 'Kernel modules'
echo
echo "== IOMMU groups (a group is the smallest unit a guest can be given)"
for g in $(ls /sys/kernel/iommu_groups | sort -n); do
  printf 'group %-3s' "$g"
  for d in /sys/kernel/iommu_groups/$g/devices/*; do
    drv=$(basename "$(readlink $d/driver)" 2>/dev/null || echo none)
    printf ' %s[%s]' "$(basename $d)" "$drv"
  done
  echo
done
echo
echo "== VFIO and KVM"
ls -l /dev/vfio /dev/kvm | sed 's/^/  /'
echo
echo "The display and its HDMI audio function share one group: both must go to the same guest."
"""


def main() -> int:
    try:
        return Lab().run(["sh", "-c", DEMO_SCRIPT], LabOptions())
    except LabError as exc:
        print(f"pyvmm-lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
