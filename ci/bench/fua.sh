# Random 4 KiB first writes with FUA at QD1 (issue 24), and an ftrace
# window of them: sourced by sync-trace-guest.sh and fua-steps-guest.sh.
T=/sys/kernel/tracing
mountpoint -q $T || mount -t tracefs nodev $T

fua() { # DEV OFFSET RUNTIME [FIO OPTION...]: fio's output on stdout
    fio --name=fua --filename="$1" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
        --iodepth=1 --sync=1 --size=64M --offset="$2" --time_based --runtime="$3" "${@:4}"
}

# trace_fua DEV WINDOW EVENT...: the EVENTs (as named under $T/events)
# during WINDOW seconds of a FUA writer on DEV (at 128M, 3 s), left in
# $T/trace.
trace_fua() {
    local dev=$1 window=$2 e
    shift 2
    echo 0 > $T/tracing_on; echo > $T/trace; echo 20000 > $T/buffer_size_kb
    for e in "$@"; do echo 1 > "$T/events/$e/enable"; done
    fua "$dev" 128M 3 > /dev/null &
    sleep 1.5; echo 1 > $T/tracing_on; sleep "$window"; echo 0 > $T/tracing_on
    wait
    echo 0 > $T/events/enable; echo 1 > $T/tracing_on
}
