#!/bin/sh
# Run inside the lab (pyvmm-lab run -- sh bench/quick_compare.sh): boot time to the guest's first init
# line and virtio-blk throughput, pyvmm against QEMU, timed with the lab's clock as console lines arrive.
set -u
KERNEL=$PYVMM_GUEST_KERNEL INITRD=$PYVMM_GUEST_INITRAMFS
cp "$PYVMM_GUEST_DISK" "$TMPDIR/disk.raw"
stamp() { python3 -u "$(dirname "$0")/stamp.py"; }
GCMD='ls -l /dev/vda; dd if=/dev/vda of=/dev/null bs=1M count=48 iflag=direct; echo READ-DONE; dd if=/dev/zero of=/dev/vda bs=1M count=48 seek=16 oflag=direct; echo WRITE-DONE'
run_pyvmm() {
  pyvmm --kernel "$KERNEL" --initramfs "$INITRD" --disk path="$TMPDIR/disk.raw" --cpus boot=1 \
    --memory size=512M --serial tty --console off --cmdline "console=ttyS0 quiet pyvmm.cmd=\"echo START; $GCMD\""
}
run_qemu() {
  qemu-system-x86_64 -enable-kvm -M q35 -cpu host -m 512 -smp 1 -nodefaults -nographic -no-reboot \
    -serial stdio -kernel "$KERNEL" -initrd "$INITRD" \
    -drive file="$TMPDIR/disk.raw",if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0 \
    -append "console=ttyS0 quiet pyvmm.cmd=\"echo START; $GCMD\""
}
for i in 1 2; do
  for vmm in pyvmm qemu; do
    t0=$(date +%s.%N)
    run_$vmm 2>&1 | stamp > "$TMPDIR/$vmm.log"
    t1=$(date +%s.%N)
    awk -v vmm=$vmm -v t0="$t0" -v t1="$t1" '
      /pyvmm-guest: init/ && !init {init=$1}
      /START/ && !start {start=$1}
      /READ-DONE/ {rd=$1} /WRITE-DONE/ {wr=$1}
      END {printf "RESULT %s init=%.2fs read=%.1fMB/s write=%.1fMB/s total=%.2fs\n", vmm, init-t0, 48/(rd-start), 48/(wr-rd), t1-t0}' "$TMPDIR/$vmm.log"
  done
done
