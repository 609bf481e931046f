#!/bin/sh
# Init of the lab host (busybox, in the lab initramfs). Mounts the outside filesystem read-only over 9p,
# gives it a writable overlay, loads the host's modules as a real host would, then runs the command.
PATH=/bin:/sbin; export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
param() { sed -n "s/.*\(^\| \)$1=\([^ ]*\).*/\2/p" /proc/cmdline; }
fail() { echo "PYVMM-LAB-FAIL: $*"; poweroff -f; sleep 10; }
for m in $(cat /etc/lab-modules); do insmod "/modules/$m" || fail "insmod $m"; done

mkdir -p /lower /upper /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower || fail "mount 9p"
# A tmpfs upper layer makes the outside tree writable inside the lab without touching the outside.
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/upper /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/upper,workdir=/upper/work,xino=off overlay /host \
  || fail "mount overlay"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount --rbind /dev /host/dev
mkdir -p /dev/shm /dev/pts; mount -t tmpfs tmpfs /host/dev/shm; mount -t devpts devpts /host/dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mount -t tmpfs -o mode=0755 tmpfs /host/run
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null

run=$(param pyvmm_lab.run)
kroot=$(param pyvmm_lab.kernel_root)
release=$(uname -r)
# The lab kernel's module tree, where modprobe looks for it.
mkdir -p "/host/lib/modules/$release"
mount --bind "/host$kroot/lib/modules/$release" "/host/lib/modules/$release" || fail "bind modules"
# The pulse (pyvmm/lab/pulse.py): answer every byte the supervisor sends on ttyS1. Each byte is an
# interrupt, which wakes a lab CPU whose timer interrupt got lost in the emulation; the answers show that
# the lab still runs its processes. With several CPUs the port's interrupt moves on to the next CPU after
# each byte, so that every CPU is woken in turn.
ncpu=$(grep -c ^processor /proc/cpuinfo)
(
  stty raw -echo 2>/dev/null
  i=0
  while read -r _; do
    echo PULSE
    if [ "$ncpu" -gt 1 ]; then echo $((i % ncpu)) 2>/dev/null > /proc/irq/3/smp_affinity_list; fi
    i=$((i + 1))
  done
) <>/dev/ttyS1 >&0 2>/dev/null &
echo $! > /host/run/pyvmm-lab-pulse.pid
chroot /host /bin/sh "$run/setup.sh" || fail "host setup"
# khugepaged, collapsing the VMMs' guest RAM into huge pages while the guests run, has held a lab CPU for
# minutes (soft lockups during `make bench`). Guest RAM still gets huge pages at fault time (it is madvised).
echo 3600000 > /sys/kernel/mm/transparent_hugepage/khugepaged/scan_sleep_millisecs 2>/dev/null
echo PYVMM-LAB-READY
if [ "$(param pyvmm_lab.interactive)" = 1 ]; then
  chroot /host /usr/bin/setsid -c /bin/sh -c ". $run/env.sh; cd \"\$PYVMM_LAB_CWD\"; exec /bin/bash -i" \
    </dev/ttyS0 >/dev/ttyS0 2>&1
  status=$?
else
  chroot /host /bin/sh "$run/run.sh" </dev/null
  status=$?
fi
sync
echo "PYVMM-LAB-EXIT=$status"
poweroff -f
sleep 10
