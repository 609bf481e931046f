#!/bin/sh
# Guest side of the network rows: eth0 gets ADDRESS (CIDR), the lab's side of the tap is pinged once (each
# side then knows the other's MAC before anything is timed), and bench-net serves the lab's measurements
# (saying `BENCH net READY` once it listens) until the lab says it is done. Arguments: ADDRESS LAB_ADDRESS PORT TIMEOUT_SECONDS.
addr=$1 lab=$2 port=$3 timeout=$4
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up && ip addr add "$addr" dev eth0 || exit 1
ping -c 1 -W 10 "$lab" > /dev/null || { echo "BENCH net ERROR no answer from $lab"; exit 1; }
exec bench-net serve "$port" "$timeout"
