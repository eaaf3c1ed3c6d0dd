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
source "$(dirname "$0")/fua.sh"
bench_base
for sys in ${SYSTEMS:-ublk-cow rublk-sparse}; do
    overlay_fs ext4 ""
    dev=$(sys_up "$sys")
    echo "fua-steps: $sys: $(fua "$dev" 0 4 --output-format=terse | cut -d';' -f49) IOPS untraced"
    trace_fua "$dev" 0.03 ext4/ext4_sync_file_enter ext4/ext4_sync_file_exit \
        jbd2/jbd2_start_commit jbd2/jbd2_end_commit io_uring sched/sched_wakeup
    sed "s/^/fua-trace $sys: /" $T/trace
    sys_down "$sys" "$dev"
done
overlay_fs tmpfs
