#!/bin/bash
# The steps of one FUA write at QD1, traced (issue 24): for each system
# (default ublk-cow rublk-sparse), a fresh ext4 on a RAM disk (brd) under
# its file, 4 s of random 4 KiB first writes with FUA (fio --sync=1,
# untimed IOPS printed), then a trace of a second run: io_uring's
# submissions and completions, ext4's syncs, jbd2's commits and the
# scheduler's wakeups. ci/bench/fua-steps.py takes this script's output
# and prints, per system, the median time of each step of a write.
#   bash ci/in-ublk-env.sh ci/bench/fua-steps-guest.sh > fua.log
#   python3 ci/bench/fua-steps.py fua.log
#   env: SYSTEMS (ublk-cow rublk-sparse; any of ci/bench/systems.sh)
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
need_ublk
bench_base
T=/sys/kernel/tracing
mountpoint -q $T || mount -t tracefs nodev $T
fua() { # DEV OFFSET RUNTIME
    fio --name=fua --filename="$1" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
        --iodepth=1 --sync=1 --size=64M --offset="$2" --time_based --runtime="$3" "${@:4}"
}
for sys in ${SYSTEMS:-ublk-cow rublk-sparse}; do
    overlay_fs ext4 ""
    dev=$(sys_up "$sys")
    echo "fua-steps: $sys: $(fua "$dev" 0 4 --output-format=terse | cut -d';' -f49) IOPS untraced"
    echo 0 > $T/tracing_on; echo > $T/trace; echo 20000 > $T/buffer_size_kb
    for e in ext4/ext4_sync_file_enter ext4/ext4_sync_file_exit jbd2/jbd2_start_commit \
        jbd2/jbd2_end_commit io_uring sched/sched_wakeup; do
        echo 1 > $T/events/$e/enable
    done
    fua "$dev" 128M 3 > /dev/null &
    sleep 1.5; echo 1 > $T/tracing_on; sleep 0.03; echo 0 > $T/tracing_on
    wait
    echo 0 > $T/events/enable; echo 1 > $T/tracing_on
    sed "s/^/fua-trace $sys: /" $T/trace
    sys_down "$sys" "$dev"
done
overlay_fs tmpfs
