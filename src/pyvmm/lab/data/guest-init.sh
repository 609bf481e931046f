#!/bin/sh
# Init of pyvmm's test guests (busybox), used both in the guest initramfs and on the guest disk.
# root=DEV on the command line: mount it and switch to it (initramfs only); else pyvmm.shell=TTY (e.g. hvc0)
# runs an interactive shell on /dev/TTY; else pyvmm.cmd="..." runs that command, prints
# PYVMM-GUEST-EXIT=<status> and powers off; else a shell on the console.
PATH=/bin:/sbin:/usr/bin:/usr/sbin; export PATH
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp 2>/dev/null
echo "pyvmm-guest: init"
# Drivers by modalias, as udev's coldplug would load them, until no new device shows up (an SD host
# finds its card, which wants mmc_block).
coldplug() {
  find /sys/devices -name uevent -type f 2>/dev/null | xargs sed -n 's/^MODALIAS=//p' | sort -u > /tmp/.ma
  cmp -s /tmp/.ma /tmp/.ma.old && return 1
  mv /tmp/.ma /tmp/.ma.old
  xargs modprobe -q -a < /tmp/.ma.old 2>/dev/null
  return 0
}
settle() {
  n=0
  while coldplug && [ $n -lt 5 ]; do sleep 0.2; n=$((n + 1)); done
}
settle
# SD hosts find their card asynchronously, some time after their driver binds: like udev settle, wait
# (up to 3 s) for each host's card, then load what the cards need (mmc_block).
if ls /sys/class/mmc_host/* >/dev/null 2>&1; then
  i=0
  while [ $i -lt 30 ] && ! ls /sys/bus/mmc/devices/* >/dev/null 2>&1; do sleep 0.1; i=$((i + 1)); done
  settle
fi
cmdline=$(cat /proc/cmdline)
param() { echo "$cmdline" | sed -n "s/.*\(^\| \)$1=\([^ ]*\).*/\2/p"; }
root=$(param root)
if [ -f /pyvmm-initramfs ] && [ -n "$root" ]; then
  modprobe -q virtio_blk; modprobe -q ext4
  mode=ro
  case " $cmdline " in *" rw "*) mode=rw;; esac
  i=0
  while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  mkdir -p /newroot
  if mount -o "$mode" "$root" /newroot; then
    mount --move /dev /newroot/dev
    umount /proc /sys /tmp
    exec switch_root /newroot /sbin/init
  fi
  echo "pyvmm-guest: cannot mount root=$root"
fi
shell=$(param pyvmm.shell)
if [ -n "$shell" ]; then
  # the tty's driver may be a module that coldplug has just loaded: give its device node a moment
  i=0
  while [ ! -c "/dev/$shell" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  echo "pyvmm-guest: shell on $shell"
  exec setsid sh -c "exec sh -i </dev/$shell >/dev/$shell 2>&1"
fi
cmd=$(echo "$cmdline" | sed -n 's/.*pyvmm\.cmd="\([^"]*\)".*/\1/p')
if [ -n "$cmd" ]; then
  sh -c "$cmd"
  status=$?
  sync
  echo "PYVMM-GUEST-EXIT=$status"
  poweroff -f
  sleep 5
fi
exec setsid cttyhack sh
