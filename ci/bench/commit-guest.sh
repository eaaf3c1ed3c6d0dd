#!/bin/bash
# `commit` against `cp --sparse=always`, inside a guest with ublk_drv, in one
# boot: an overlay over a 512 MiB base holds 128 MiB of random 4 KiB writes
# (made once, through a device, kept in a directory of its own so that
# commit does not find it stacked on the base); each round commits a fresh copy of it into
# a fresh copy of the base, and copies a file of the same 128 MiB with
# `cp --sparse=always`, on the same tmpfs, interleaved. Prints one
# "bench-json: {...}" line per run (MiB/s of the data merged or copied).
source "$(dirname "$0")/../../tests/e2e/lib.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-3}
B=/tmp/ublk-cow-commit-bench
tmpfs_at $B 2600M
export TMPDIR=$B
head -c 512M /dev/urandom > $B/base.img
mkdir -p $B/keep; rm -f $B/keep/made.cow
dev=$("$UC" add --base $B/base.img --overlay $B/keep/made.cow)
fio --name=fill --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite \
    --bs=4k --iodepth=32 --io_size=128M >/dev/null
"$UC" del -n "$(dev_id "$dev")"
MIB=$(( $("$UC" info --json $B/keep/made.cow | python3 -c 'import json,sys; print(json.load(sys.stdin)["blocks_written"])') * 4096 >> 20 ))
say "bench: commit of an overlay holding $MIB MiB against cp --sparse=always of $MIB MiB"
head -c "${MIB}M" /dev/urandom > $B/data.img
now() { date +%s.%N; }
record() { # system round start end
    python3 -c "import json,sys; print(json.dumps({'system': sys.argv[1], 'workload': 'commit-${MIB}m', 'round': int(sys.argv[2]), 'iops': 0, 'mib_s': $MIB / (float(sys.argv[4]) - float(sys.argv[3]))}))" "$@"
}
for round in $(seq 1 "$ROUNDS"); do
    # The overlay records base.img (path and identity, mtime included): it
    # is committed into base.img itself, which is put back after, mtime
    # and all (cp -p), for the next round.
    cp -p $B/base.img $B/base.keep
    cp --sparse=always $B/keep/made.cow $B/c.cow
    sync
    t0=$(now); "$UC" commit $B/c.cow >/dev/null; sync; t1=$(now)
    echo "bench-json: $(record commit "$round" "$t0" "$t1")"
    mv $B/base.keep $B/base.img; rm -f $B/c.cow
    t0=$(now); cp --sparse=always $B/data.img $B/data.copy; sync; t1=$(now)
    echo "bench-json: $(record cp-sparse "$round" "$t0" "$t1")"
    rm -f $B/data.copy
done
