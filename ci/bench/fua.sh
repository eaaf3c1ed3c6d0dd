# Random 4 KiB first writes with FUA at QD1 (issue 24), and the steps of
# one such write, traced: sourced by sync-trace-guest.sh and
# fua-steps-guest.sh.
T=/sys/kernel/tracing
mountpoint -q $T || mount -t tracefs nodev $T

fua() { # DEV OFFSET RUNTIME [FIO OPTION...]: fio's output on stdout
    fio --name=fua --filename="$1" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
        --iodepth=1 --sync=1 --size=64M --offset="$2" --time_based --runtime="$3" "${@:4}"
}

# fua_steps SYSTEM DEV: the median time from each step of a FUA write on
# DEV to the next (ci/bench/fua-steps.py), from a 50 ms trace of a FUA
# writer (at 128M, 3 s): io_uring's submissions and completions, ext4's
# syncs, jbd2's commits and the scheduler's wakeups.
fua_steps() {
    local e
    echo 0 > $T/tracing_on; echo > $T/trace; echo 20000 > $T/buffer_size_kb
    for e in ext4/ext4_sync_file_enter ext4/ext4_sync_file_exit jbd2/jbd2_start_commit \
        jbd2/jbd2_end_commit io_uring sched/sched_wakeup; do
        echo 1 > "$T/events/$e/enable"
    done
    fua "$2" 128M 3 > /dev/null &
    sleep 1.5; echo 1 > $T/tracing_on; sleep 0.05; echo 0 > $T/tracing_on
    wait
    echo 0 > $T/events/enable; echo 1 > $T/tracing_on
    sed "s/^/fua-trace $1: /" $T/trace > /tmp/fua-trace.txt
    python3 "$(dirname "${BASH_SOURCE[0]}")/fua-steps.py" /tmp/fua-trace.txt
}
