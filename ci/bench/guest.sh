#!/bin/bash
# Benchmark inside a guest with ublk_drv: fio (io_uring, O_DIRECT) against
# ublk-cow and its peers over the same base, in one boot, in interleaved
# rounds (A B ... A B ...), a fresh device for every first-write job.
# Prints one "bench-json: {...}" line per run (ci/bench/run.sh collects
# them on the host), then the summary table.
#   env: ROUNDS (3), SYSTEMS ("loop ublk-cow"), WORKLOADS (all), RUNTIME (10)
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
SYSTEMS=${SYSTEMS:-"loop ublk-cow"}
WORKLOADS=${WORKLOADS:-"randread-4k randwrite-4k-first seqread-1m"}
OUT=${OUT:-/tmp/ublk-cow-bench-out}
mkdir -p "$OUT"; : > "$OUT/runs.jsonl"

B=/tmp/ublk-cow-bench
mkdir -p $B; mountpoint -q $B || mount -t tmpfs -o size=2200M tmpfs $B
export TMPDIR=$B
BASE=$B/base.img
say "bench: 512 MiB base of random data in guest tmpfs"
head -c 512M /dev/urandom > "$BASE"

# fio arguments of each workload. First writes cover 128 MiB once (fio's
# random map writes each block once), so every write is a first write.
workload_args() {
    case $1 in
        randread-4k) echo "--rw=randread --bs=4k --iodepth=32 --time_based --runtime=$RUNTIME --ramp_time=2" ;;
        randwrite-4k-first) echo "--rw=randwrite --bs=4k --iodepth=32 --size=128M" ;;
        seqread-1m) echo "--rw=read --bs=1m --iodepth=8 --time_based --runtime=$RUNTIME --ramp_time=2" ;;
        *) echo "unknown workload $1" >&2; return 1 ;;
    esac
}

for wl in $WORKLOADS; do
    args=$(workload_args "$wl")
    for round in $(seq 1 "$ROUNDS"); do
        for sys in $SYSTEMS; do
            dev=$(sys_up "$sys")
            fio --name="$wl" --filename="$dev" --direct=1 --ioengine=io_uring \
                --output-format=json $args > "$OUT/fio.json"
            sys_down "$sys" "$dev"
            python3 - "$OUT/fio.json" "$sys" "$wl" "$round" >> "$OUT/runs.jsonl" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
rw = "write" if j["write"]["io_bytes"] > 0 else "read"
print(json.dumps({"system": sys.argv[2], "workload": sys.argv[3], "round": int(sys.argv[4]),
                  "iops": j[rw]["iops"], "mib_s": j[rw]["bw_bytes"] / 2**20}))
PY
            echo "bench-json: $(tail -n1 "$OUT/runs.jsonl")"
        done
    done
done
python3 "$ROOT/ci/bench/summarize.py" "$OUT/runs.jsonl" | tee "$OUT/summary.md"
