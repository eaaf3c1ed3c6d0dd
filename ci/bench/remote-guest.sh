#!/bin/bash
# A remote base against `curl`, inside a guest with ublk_drv, in one boot,
# against moto_server (S3) on 127.0.0.1: a ${MB} MiB object; per round,
# interleaved: curl downloading it whole (SigV4), a cold sequential read
# of a new device over it (dd bs=1M, O_DIRECT), and `cache -n` of a new
# device. Then random 4 KiB cold reads at QD1 (fio clat median and p99)
# beside the server's own GET latency for 4 KiB and for one unit (curl
# with a Range, one request at a time). Prints "bench-json: {...}" lines.
source "$(dirname "$0")/../../tests/e2e/lib.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-3}
MB=${MB:-64}
B=/tmp/ublk-cow-remote-bench
mkdir -p $B; mountpoint -q $B || mount -t tmpfs -o size=1500M tmpfs $B
export TMPDIR=$B WORK=$B
source "$(dirname "$0")/../../tests/e2e/remote-servers.sh"
moto_up 18091 bench $B/env
source $B/env
head -c "${MB}M" /dev/urandom > $B/obj.img
python3 "$RDIR/s3put.py" bench obj.img $B/obj.img
URL=http://127.0.0.1:$MOTO_PORT/bench/obj.img
SIGV4=(--aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY"
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")
say "bench: a $MB MiB object in moto_server; $ROUNDS rounds"

now() { date +%s.%N; }
record() { # system workload round seconds [extra json]
    echo "bench-json: {\"system\": \"$1\", \"workload\": \"$2\", \"round\": $3, \"iops\": 0, \"mib_s\": $(python3 -c "print($MB / $4)")${5:-}}"
}
for round in $(seq 1 "$ROUNDS"); do
    t0=$(now)
    curl -sf "${SIGV4[@]}" -o /dev/null "$URL"
    record curl whole-object "$round" "$(python3 -c "print($(now) - $t0)")"

    dev=$("$UC" add --base s3://bench/obj.img)
    t0=$(now)
    dd if="$dev" of=/dev/null bs=1M iflag=direct status=none
    record ublk-cow cold-seqread-1m "$round" "$(python3 -c "print($(now) - $t0)")"
    say "  round $round: $(stat_of "$(dev_id "$dev")" remote_gets) GETs, most in flight $(stat_of "$(dev_id "$dev")" remote_gets_in_flight_max)"
    "$UC" del -n "$(dev_id "$dev")"

    dev=$("$UC" add --base s3://bench/obj.img)
    t0=$(now)
    "$UC" cache -n "$(dev_id "$dev")" >/dev/null 2>&1
    record ublk-cow cache "$round" "$(python3 -c "print($(now) - $t0)")"
    "$UC" del -n "$(dev_id "$dev")"
done

# Random 4 KiB cold reads at QD1: each one fetches its unit.
dev=$("$UC" add --base s3://bench/obj.img)
fio --name=rr --filename="$dev" --direct=1 --ioengine=psync --rw=randread --bs=4k \
    --runtime=20 --time_based --randrepeat=0 --norandommap --output-format=json > $B/rr.json
python3 - $B/rr.json <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["read"]["clat_ns"]["percentile"]
print("bench-json: " + json.dumps({"system": "ublk-cow", "workload": "cold-randread-4k-qd1",
      "round": 1, "iops": 0, "mib_s": 0, "p50_ms": j["50.000000"] / 1e6, "p99_ms": j["99.000000"] / 1e6}))
PY
"$UC" del -n "$(dev_id "$dev")"
for size in 4096 1048576; do
    : > $B/lat
    for i in $(seq 1 30); do
        off=$(( (RANDOM % (MB - 1)) << 20 ))
        curl -sf "${SIGV4[@]}" -r "$off-$((off + size - 1))" -o /dev/null -w '%{time_total}\n' "$URL" >> $B/lat
    done
    python3 - $B/lat "$size" <<'PY'
import json, statistics, sys
v = sorted(float(x) * 1000 for x in open(sys.argv[1]))
print("bench-json: " + json.dumps({"system": "curl", "workload": f"get-{sys.argv[2]}", "round": 1,
      "iops": 0, "mib_s": 0, "p50_ms": statistics.median(v), "p99_ms": v[int(len(v) * 0.99) - 1]}))
PY
done
