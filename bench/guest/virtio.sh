#!/bin/sh
# Guest side of the virtio-blk run: sequential read and write, random reads, then an idle stretch during
# which the harness measures the VMM's CPU time (none when IDLE_SECONDS is 0). Arguments: SPAN IO_SECONDS
# IDLE_SECONDS [DEVICE (vda)] [TAG_PREFIX (none): the tags become PREFIXblk-read etc.].
span=$1 secs=$2 idle=$3 dev=/dev/${4:-vda} p=$5
i=0
while [ ! -b "$dev" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
# Sequential: each 1 MiB request as one segment (a huge page), then as 256 separate 4 KiB pages.
BENCH_IO_BUFFER=huge bench-io "${p}blk-read" "$dev" read 1M 1 "$span" 0 "$secs" || exit 1
BENCH_IO_BUFFER=huge bench-io "${p}blk-write" "$dev" write 1M 1 "$span" 0 "$secs" || exit 1
BENCH_IO_BUFFER=pages bench-io "${p}blk-read-pages" "$dev" read 1M 1 "$span" 0 "$secs" || exit 1
BENCH_IO_BUFFER=pages bench-io "${p}blk-write-pages" "$dev" write 1M 1 "$span" 0 "$secs" || exit 1
bench-io "${p}blk-rand1" "$dev" randread 4K 1 "$span" 0 "$secs" || exit 1
bench-io "${p}blk-rand32" "$dev" randread 4K 32 "$span" 0 "$secs" || exit 1
[ "$idle" = 0 ] && exit 0
echo "BENCH idle START"
sleep "$idle"
echo "BENCH idle END"
