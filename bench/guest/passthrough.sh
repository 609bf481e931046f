#!/bin/sh
# Guest side of the passthrough run: NVMe I/O on the guest's nvme driver, then trapped accesses to the
# same function after unbinding that driver. Arguments: SPAN IO_SECONDS TRAP_SECONDS.
span=$1 secs=$2 trap=$3
i=0
while [ ! -b /dev/nvme0n1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
# The buffer in a huge page: each 1 MiB read one segment, whatever the guest's allocator did at this boot.
BENCH_IO_BUFFER=huge bench-io nvme-seq /dev/nvme0n1 read 1M 1 "$span" 0 "$secs" || exit 1
bench-io nvme-rand1 /dev/nvme0n1 randread 4K 1 "$span" 0 "$secs" || exit 1
bench-io nvme-rand32 /dev/nvme0n1 randread 4K 32 "$span" 0 "$secs" || exit 1
bdf=$(basename "$(readlink -f /sys/block/nvme0n1/device/device)")
echo "$bdf" > /sys/bus/pci/drivers/nvme/unbind || exit 1
bench-trap "$bdf" "$trap"
