#!/bin/sh
# Runs inside the lab's root (the outside tree): bring the host up as a passthrough host boots.
printf '1 4 1 7\n' > /proc/sys/kernel/printk  # only errors reach the console; dmesg has the rest
# /tmp shows the outside /tmp like every other path (read-only underneath, writable overlay on top), so a
# checkout cloned under /tmp works in the lab. The lab initramfs's init mounts an empty tmpfs there; take it
# away again (done here, not in that init, so that lab images built before still get it right).
if [ "$(awk '$2 == "/tmp" {print $3}' /proc/self/mounts | tail -n 1)" = tmpfs ]; then umount /tmp || exit 1; fi
# What a VFIO host has loaded: the IOMMU type1 backend, vfio-pci and KVM (AMD: ccp provides sev symbols).
modprobe -a vfio_iommu_type1 vfio-pci ccp kvm_amd || exit 1
# One idle KVM VM for the lab's whole life, so that VMMs starting and stopping never rewrite kernel code
# (see pyvmm/lab/anchor.py: that patching has livelocked the emulated lab). env.sh puts pyvmm's Python on
# PATH. It starts now and is waited for below: its Python start-up overlaps the drivers' probes.
(. "$(dirname "$0")/env.sh"; exec python3 -m pyvmm.lab.anchor /run/pyvmm-kvm-anchor) </dev/null >/dev/null 2>&1 &
# Drivers for every device present, by modalias, as udev's coldplug would load them; repeated because
# drivers create new devices (an SD host finds its card, which wants mmc_block).
coldplug() {
  find /sys/devices/pci0000:00 -name uevent -type f 2>/dev/null | xargs -r sed -n 's/^MODALIAS=//p' \
    | sort -u > /run/pyvmm-lab-modaliases.new
  if cmp -s /run/pyvmm-lab-modaliases.new /run/pyvmm-lab-modaliases; then return 1; fi
  mv /run/pyvmm-lab-modaliases.new /run/pyvmm-lab-modaliases
  xargs -r modprobe -q -b -a < /run/pyvmm-lab-modaliases 2>/dev/null
  return 0
}
n=0
while coldplug && [ $n -lt 6 ]; do sleep 0.3; n=$((n + 1)); done
i=0
while [ ! -s /run/pyvmm-kvm-anchor ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
[ -s /run/pyvmm-kvm-anchor ] || echo "pyvmm-lab: no KVM anchor VM (VMM starts may stall the lab)" >&2
# Wait until every device that has a driver available is bound (probes run asynchronously).
i=0
while [ $i -lt 50 ]; do
  pending=0
  for d in /sys/bus/pci/devices/*; do
    [ -e "$d/driver" ] && continue
    case "$(cat "$d/class")" in 0x0300*|0x0380*|0x0b40*|0x00ff*|0x060100*|0x060000*|0x0c0500*) continue;; esac
    pending=1
  done
  [ $pending = 0 ] && break
  sleep 0.1; i=$((i + 1))
done
exit 0
