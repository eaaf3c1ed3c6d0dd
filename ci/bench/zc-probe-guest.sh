#!/bin/bash
# A probe: how many io_uring requests a 4 KiB O_DIRECT READ of a cached
# base costs ublk-cow, and how many go to an io-wq worker, zero copy against
# copy mode; the base a loop device over a file in the guest's tmpfs.
# VM_KERNEL=newest bash ci/in-ublk-env.sh ci/bench/zc-probe-guest.sh
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh
set -e
need_ublk
head -c 256M /dev/urandom > /tmp/zcb.img
LO=$(losetup -f --show /tmp/zcb.img)
T=/sys/kernel/tracing
mountpoint -q $T || mount -t tracefs nodev $T
for mode in auto off; do
    dev=$("$UC" add --base "$LO" --zero-copy $mode --readahead off)
    echo "=== zero-copy $mode: $dev"
    exec 9<"$LO"; cat "$LO" > /dev/null
    fio --name=r --filename="$dev" --direct=1 --ioengine=psync --rw=read --bs=4k \
        --size=200M --time_based --runtime=3 --output-format=terse | cut -d';' -f7,8
    echo 0 > $T/tracing_on; echo > $T/trace; echo 20000 > $T/buffer_size_kb
    echo 1 > $T/events/io_uring/enable
    fio --name=r --filename="$dev" --direct=1 --ioengine=psync --rw=read --bs=4k \
        --size=200M --time_based --runtime=3 --output-format=terse > /tmp/fio.out &
    sleep 1; echo 1 > $T/tracing_on; sleep 0.5; echo 0 > $T/tracing_on
    wait
    echo 0 > $T/events/enable
    echo "io_uring events in 0.5 s, by name:"
    grep -o "io_uring_[a-z_]*:" $T/trace | sort | uniq -c
    echo "by task (the daemon's threads and workers):"
    awk '{print $1}' $T/trace | sed 's/-[0-9]*$//' | sort | uniq -c | sort -rn | head -8
    grep "io_uring_queue_async_work" $T/trace | head -3
    grep "io_uring_submit_req" $T/trace | awk '{for(i=1;i<=NF;i++) if($i ~ /^opcode/) print $i, $(i+1)}' | sort | uniq -c | head
    "$UC" del -n "$(dev_id "$dev")"; exec 9<&-
done
losetup -d "$LO"
