#!/bin/bash
# The slow base read by fio itself, as the daemon reads it and as loop
# does: sequential 1 MiB reads at QD8 (io_uring) of `make bench-slow`'s
# base (dm-linear over null_blk, SLOW_MS ms per I/O, 1 by default) with
# O_DIRECT (system base-direct), through the page cache with
# POSIX_FADV_RANDOM as the daemon opens the base (base-buffered-random),
# and through the page cache with the kernel's readahead
# (base-buffered). The caches are dropped before each run.
#   BENCH_SCRIPT=ci/bench/base-path-guest.sh bash ci/bench/run.sh
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-4}
SLOW_MS=${SLOW_MS:-1}
B=/tmp/ublk-cow-base-path; tmpfs_at $B 1200M
BASE_FILE=$B/base.img
head -c 512M /dev/urandom > "$BASE_FILE"
slow_setup
OUT=$B/out; mkdir -p $OUT; : > $OUT/runs.jsonl
for round in $(seq 1 "$ROUNDS"); do
    for sys in base-direct base-buffered-random base-buffered; do
        case $sys in
            base-direct) how=(--direct=1) ;;
            base-buffered-random) how=(--direct=0 --fadvise_hint=random) ;;
            base-buffered) how=(--direct=0 --fadvise_hint=0) ;;
        esac
        echo 3 > /proc/sys/vm/drop_caches
        fio --name=p --filename="$BASE" --rw=read --bs=1m --iodepth=8 --ioengine=io_uring \
            --time_based --runtime="$RUNTIME" --output-format=json "${how[@]}" > $OUT/fio.json
        fio_record $OUT/fio.json "$sys" seqread-1m-slow-base-itself "$round" $OUT/runs.jsonl
    done
done
slow_teardown
python3 "$ROOT/ci/bench/summarize.py" $OUT/runs.jsonl
