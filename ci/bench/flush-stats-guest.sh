#!/bin/bash
# The counters of ublk-cow after the flush mix (fio --fsync=1 at QD32 for
# 5 s, as `randwrite-4k-fsync` in guest.sh) with the overlay on a fresh
# ext4, then xfs, on brd: how many FLUSHes reached the daemon, how many
# shared another's flush, how many syncs ran on the queue's thread.
#   bash ci/in-ublk-env.sh ci/bench/flush-stats-guest.sh
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
need_ublk
bench_base
for fs in ext4 xfs; do
    overlay_fs "$fs"
    dev=$(sys_up ublk-cow)
    fio --name=flush-mix --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite \
        --bs=4k --iodepth=32 --fsync=1 --size=64M --time_based --runtime=5 --ramp_time=1 \
        --output-format=json > /tmp/flush-mix.json
    python3 -c "import json; j = json.load(open('/tmp/flush-mix.json'))['jobs'][0]; \
print('$fs: fio wrote', round(j['write']['iops']), 'IOPS,', j['sync']['total_ios'], 'syncs')"
    "$UC" stats -n "${dev#/dev/ublkb}" --json | tr ',' '\n' \
        | grep -E '"(write_ops|flushes|flushes_shared|flushes_map_only|syncs_on_thread)"'
    sys_down ublk-cow "$dev"
done
overlay_fs tmpfs
