#!/bin/bash
# What a first write costs the guest's kernel alone, beside the devices'
# first writes (`make bench-alloc`), in one boot, in interleaved rounds:
#   pwrite-4k-qd1: fio's 4 KiB random writes by pwrite from one thread
#     (psync) over 64 MiB of a tmpfs file: `tmpfs-hole` into a fresh sparse
#     file, so that every write allocates a page, as a first write to a
#     sparse overlay does; `tmpfs-page` into the same file written once
#     already, so that every page exists, as in loop's copy of the base;
#   randwrite-4k-first: as in ci/bench/guest.sh, on kernel loop, ublk-cow
#     and ublk-cow --preallocate.
# The difference between the two pwrite rows is what allocating a page
# costs one thread; IOPS at QD1 are the inverse of the time per write.
# Prints "bench-json: {...}" lines (ci/bench/run.sh makes the table).
#   env: ROUNDS (3)
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-3}
bench_base

run() { # SYSTEM WORKLOAD ROUND FIO-ARGS...
    local sys=$1 wl=$2 round=$3; shift 3
    fio --name="$wl" --rw=randwrite --bs=4k --size=64M --output-format=json "$@" > $B/fio.json
    python3 - $B/fio.json "$sys" "$wl" "$round" <<'PY'
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
print("bench-json: " + json.dumps({"system": sys.argv[2], "workload": sys.argv[3],
      "round": int(sys.argv[4]), "iops": w["iops"], "mib_s": w["bw_bytes"] / 2**20,
      "us_per_write": 1e6 / w["iops"]}))
PY
}

for round in $(seq 1 "$ROUNDS"); do
    rm -f $B/file; truncate -s 64M $B/file
    run tmpfs-hole pwrite-4k-qd1 "$round" --filename=$B/file --ioengine=psync
    run tmpfs-page pwrite-4k-qd1 "$round" --filename=$B/file --ioengine=psync
    rm -f $B/file
    for sys in loop ublk-cow ublk-cow-prealloc; do
        dev=$(sys_up "$sys")
        run "$sys" randwrite-4k-first "$round" --filename="$dev" --direct=1 \
            --ioengine=io_uring --iodepth=32
        sys_down "$sys" "$dev"
    done
done
