#!/bin/bash
# Cache benchmarks inside a guest with ublk_drv, in one boot:
# 1. readahead over a slow base (dm-delay, 1 ms per I/O, over a loop device):
#    sequential 4K O_DIRECT reads at QD1 on ublk-cow with --readahead auto
#    and off, and on the kernel loop driver (buffered) over the same base;
#    interleaved rounds, medians.
# 2. `cache --cow-on-cache` of a whole device against `cp` of the base file
#    to the same file system.
# Prints "bench-json: {...}" lines and a summary.
source "$(dirname "$0")/../../tests/e2e/lib.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
B=/tmp/ublk-cow-cache-bench
mkdir -p $B; mountpoint -q $B || mount -t tmpfs -o size=1800M tmpfs $B
export TMPDIR=$B
OUT=$B/out; mkdir -p $OUT; : > $OUT/runs.jsonl

head -c 256M /dev/urandom > $B/base.img
if [ -z "${COPY_ONLY:-}" ]; then
LO=$(losetup -f --show $B/base.img)
SZ=$(blockdev --getsz "$LO")
dmsetup create ucslow --table "0 $SZ delay $LO 0 1"
SLOW=/dev/mapper/ucslow

record() { # system workload round fio.json
    python3 - "$4" "$1" "$2" "$3" >> $OUT/runs.jsonl <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
print(json.dumps({"system": sys.argv[2], "workload": sys.argv[3], "round": int(sys.argv[4]),
                  "iops": j["read"]["iops"], "mib_s": j["read"]["bw_bytes"] / 2**20}))
PY
    echo "bench-json: $(tail -n1 $OUT/runs.jsonl)"
}

for round in $(seq 1 "$ROUNDS"); do
    for sys in loop ublk-cow-ra-auto ublk-cow-ra-off; do
        echo 3 > /proc/sys/vm/drop_caches
        case $sys in
            loop) dev=$(losetup -f --show "$SLOW") ;;
            ublk-cow-ra-auto) dev=$("$UC" add --base "$SLOW" --readahead auto) ;;
            ublk-cow-ra-off) dev=$("$UC" add --base "$SLOW" --readahead off) ;;
        esac
        fio --name=seq4k --filename="$dev" --direct=1 --ioengine=psync --rw=read --bs=4k \
            --iodepth=1 --time_based --runtime="$RUNTIME" --output-format=json > $OUT/fio.json
        case $sys in loop) losetup -d "$dev" ;; *) "$UC" del -n "$(dev_id "$dev")" ;; esac
        record "$sys" seqread-4k-qd1-slow-base "$round" $OUT/fio.json
    done
done
dmsetup remove ucslow; losetup -d "$LO"
fi

# Whole-device copy-on-cache against cp, same file system (tmpfs), same base;
# which of the two goes first alternates between rounds. Set COPY_ONLY=1 to
# skip the readahead part.
time_cp() {
    local t0 t1
    t0=$(date +%s.%N); cp $B/base.img $B/copy.img; t1=$(date +%s.%N)
    rm -f $B/copy.img
    echo "$t0 $t1"
}
time_cache() {
    local dev t0 t1
    dev=$("$UC" add --base $B/base.img --overlay $B/cow.overlay)
    echo 3 > /proc/sys/vm/drop_caches
    t0=$(date +%s.%N); "$UC" cache -n "$(dev_id "$dev")" --cow-on-cache >/dev/null; t1=$(date +%s.%N)
    "$UC" del -n "$(dev_id "$dev")"; rm -f $B/cow.overlay
    echo "$t0 $t1"
}
for round in $(seq 1 "$ROUNDS"); do
    echo 3 > /proc/sys/vm/drop_caches
    if [ $((round % 2)) = 1 ]; then
        c=$(time_cp); k=$(time_cache)
    else
        k=$(time_cache); c=$(time_cp)
    fi
    python3 - $c $k "$round" >> $OUT/runs.jsonl <<'PY'
import json, sys
t0, t1, t2, t3 = map(float, sys.argv[1:5])
mib = 256
for sysname, secs in (("cp", t1 - t0), ("ublk-cow-cache-cow", t3 - t2)):
    print(json.dumps({"system": sysname, "workload": "copy-256m", "round": int(sys.argv[5]),
                      "iops": 0, "mib_s": mib / secs}))
PY
    tail -n2 $OUT/runs.jsonl | sed 's/^/bench-json: /'
done
python3 "$ROOT/ci/bench/summarize.py" $OUT/runs.jsonl
