#!/bin/bash
# The pause of `snapshot -n`, inside a guest with ublk_drv, in one boot:
# a device over a 256 MiB base in tmpfs serves fio (randrw 4 KiB, QD16,
# ${RUNTIME}s); in each round, interleaved: with no snapshot, with one
# `snapshot -n` every 2 s, and with the same number of other commands
# (`ublk-cow info` of the overlay and `stats`: a process of ours starting,
# no snapshot), fio's worst completion latency (clat max, what a writer
# sees stall) and its IOPS; and each pause that `snapshot -n` printed,
# with its parts, and how long the command took. Prints "bench-json:
# {...}" lines.
source "$(dirname "$0")/../../tests/e2e/lib.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-20}
B=/tmp/ublk-cow-snapshot-bench
tmpfs_at $B 2G
head -c 256M /dev/urandom > $B/base.img
say "bench: snapshot -n under fio randrw 4k QD16, $ROUNDS rounds of ${RUNTIME}s"

# run ROUND MODE: one fio run on a fresh device; MODE 1: a snapshot -n
# every 2 s, 2: other commands as often, 0: nothing.
run() {
    local round=$1 snap=$2 dev id n=0 fio_pid
    rm -f $B/l*.cow
    dev=$("$UC" add --base $B/base.img --overlay $B/l0.cow)
    id=$(dev_id "$dev")
    fio --name=load --filename="$dev" --direct=1 --ioengine=io_uring --rw=randrw \
        --bs=4k --iodepth=16 --time_based --runtime="$RUNTIME" --size=256M \
        --output-format=json --output=$B/fio.json >/dev/null 2>&1 &
    fio_pid=$!
    sleep 2
    while kill -0 "$fio_pid" 2>/dev/null; do
        if [ "$snap" = 2 ] && [ $((n * 2 + 4)) -lt "$RUNTIME" ]; then
            "$UC" info $B/l0.cow >/dev/null; "$UC" stats -n "$id" >/dev/null
            n=$((n + 1))
        elif [ "$snap" = 1 ] && [ $((n * 2 + 4)) -lt "$RUNTIME" ]; then
            local line t0 t1
            t0=$(date +%s.%N)
            line=$("$UC" snapshot -n "$id" --overlay $B/l$((n + 1)).cow 2>&1 >/dev/null)
            t1=$(date +%s.%N)
            n=$((n + 1))
            python3 - "$round" "$line" "$t0" "$t1" <<'PY'
import json, re, sys
round_, line = int(sys.argv[1]), sys.argv[2]
command_ms = (float(sys.argv[4]) - float(sys.argv[3])) * 1000
m = re.search(r"paused for ([\d.]+) ms \(requests in flight done in ([\d.]+) ms, "
              r"overlay frozen in ([\d.]+) ms, new overlay serving in ([\d.]+) ms", line)
if not m:
    sys.exit(f"snapshot -n printed: {line}")
total, drained, frozen, opened = map(float, m.groups())
print("bench-json: " + json.dumps({"system": "ublk-cow", "workload": "snapshot-pause",
      "round": round_, "pause_ms": total, "drained_ms": drained, "frozen_ms": frozen,
      "opened_ms": opened, "command_ms": command_ms}))
PY
        fi
        sleep 2
    done
    wait "$fio_pid"
    python3 - "$round" "$snap" "$n" $B/fio.json <<'PY'
import json, sys
round_, mode, n, path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
j = json.load(open(path))["jobs"][0]
iops = j["read"]["iops"] + j["write"]["iops"]
worst = max(j["read"]["clat_ns"]["max"], j["write"]["clat_ns"]["max"]) / 1e6
print("bench-json: " + json.dumps({"system": "ublk-cow",
      "workload": {"0": "fio-alone", "1": "fio-with-snapshots", "2": "fio-with-commands"}[mode],
      "round": round_,
      "snapshots": n, "iops": iops, "clat_max_ms": worst}))
PY
    "$UC" del -n "$id"
}

for round in $(seq 1 "$ROUNDS"); do
    run "$round" 0
    run "$round" 1
    run "$round" 2
done
say "bench: done"
