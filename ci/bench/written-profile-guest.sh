#!/bin/bash
# A probe: where the CPUs' time goes while ublk-cow serves sequential reads
# of a written disk (the bench's seqread-SIZE-written, prepared the same
# way), by `perf record -a -g` over the timed part: the top symbols of
# every task, then of the daemon's threads alone. perf's own cost slows the
# profiled run (fio prints its rate before and during). Needs perf on the
# host (ci/bench/setup.sh installs it).
#   [VM_KERNEL=newest] [UBLK_COW_BIN=...] PROFILE_BS=64k bash ci/in-ublk-env.sh \
#       ci/bench/written-profile-guest.sh [ublk-cow add options...]
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh
source ci/bench/systems.sh
set -e
need_ublk
BS=${PROFILE_BS:-64k}
bench_base
dev=$("$UC" add --base "$BASE" "$@")
prepare "$dev" "seqread-$BS-written"
run() {
    fio --name=r --filename="$dev" --direct=1 --ioengine=io_uring --rw=read --bs="$BS" \
        --iodepth=8 --size=64M --time_based --runtime="$1" --output-format=terse |
        awk -F';' '{print "fio: " $7 " KiB/s, " $8 " IOPS"}'
}
run 3
run 8 &
sleep 2
perf record -a -g -o /tmp/perf.data -- sleep 4 2>/dev/null
wait
echo "=== every task, by symbol (self)"
perf report -i /tmp/perf.data --no-children --sort comm,sym --stdio 2>/dev/null |
    grep -v "^#" | grep "%" | head -40
echo "=== the daemon's threads, by symbol (self)"
# The daemon's threads carry its binary's name, as the kernel keeps it.
comm=$(basename "$UC" | cut -c1-15)
perf report -i /tmp/perf.data --no-children --comms "$comm" --sort sym --stdio 2>/dev/null |
    grep -v "^#" | grep "%" | head -30
echo "=== by task"
perf report -i /tmp/perf.data --no-children --sort comm --stdio -g none 2>/dev/null |
    grep -v "^#" | grep "%" | head -12
"$UC" del -n "$(dev_id "$dev")"
