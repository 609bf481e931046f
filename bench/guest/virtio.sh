#!/bin/sh
# Guest side of the virtio-blk run: sequential read and write, random reads, then an idle stretch during
# which the harness measures the VMM's CPU time. Arguments: SPAN IO_SECONDS IDLE_SECONDS.
span=$1 secs=$2 idle=$3
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
# Sequential: each 1 MiB request as one segment (a huge page), then as 256 separate 4 KiB pages.
BENCH_IO_BUFFER=huge bench-io blk-read /dev/vda read 1M 1 "$span" 0 "$secs" || exit 1
BENCH_IO_BUFFER=huge bench-io blk-write /dev/vda write 1M 1 "$span" 0 "$secs" || exit 1
BENCH_IO_BUFFER=pages bench-io blk-read-pages /dev/vda read 1M 1 "$span" 0 "$secs" || exit 1
BENCH_IO_BUFFER=pages bench-io blk-write-pages /dev/vda write 1M 1 "$span" 0 "$secs" || exit 1
bench-io blk-rand1 /dev/vda randread 4K 1 "$span" 0 "$secs" || exit 1
bench-io blk-rand32 /dev/vda randread 4K 32 "$span" 0 "$secs" || exit 1
echo "BENCH idle START"
sleep "$idle"
echo "BENCH idle END"
