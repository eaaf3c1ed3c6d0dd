#!/bin/bash
# A remote base against `curl`, inside a guest with ublk_drv, in one boot,
# against two servers on 127.0.0.1: moto_server (S3, SigV4) and
# tests/remote/range_server.py (HTTP with Range), each serving the same
# ${MB} MiB object. Per round, interleaved, for each server: curl
# downloading it whole, a cold sequential read of a new device over it
# (dd bs=1M, O_DIRECT), and `cache -n` of a new device; over HTTP also
# both with --fetch-size 4M (fewer, larger GETs). Then 4 KiB cold reads at
# QD1, one in each unit, none next to another (fio clat median and p99),
# beside the server's own GET latency for 4 KiB and for one unit (curl
# with a Range, one request at a time). And a third server: the range
# server again with each response capped at ${CAP_MIBS} MiB/s (`--rate`),
# the per-connection limit object stores have and localhost has not: there
# one stream (curl) is bounded by the cap, and GETs in flight together are
# not. Prints "bench-json: {...}" lines.
source "$(dirname "$0")/../../tests/e2e/lib.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-3}
MB=${MB:-64}
B=/tmp/ublk-cow-remote-bench
tmpfs_at $B 1500M
export TMPDIR=$B WORK=$B
source "$(dirname "$0")/../../tests/e2e/remote-servers.sh"
moto_up 18091 bench $B/env
source $B/env
mkdir -p $B/http
head -c "${MB}M" /dev/urandom > $B/http/obj.img
python3 "$RDIR/s3put.py" bench obj.img $B/http/obj.img
HTTP_PORT=18092 http_up
CAP_MIBS=${CAP_MIBS:-8}
setsid python3 "$RDIR/range_server.py" $B/http 18093 --rate "$CAP_MIBS" > $B/capped.out 2>&1 &
for _ in $(seq 1 300); do grep -q ready $B/capped.out && break; sleep 0.1; done
grep -q ready $B/capped.out || die "the capped range server did not start"
S3_URL=http://127.0.0.1:$MOTO_PORT/bench/obj.img
SIGV4=(--aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY"
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")
say "bench: a $MB MiB object in moto_server and the range server; $ROUNDS rounds"

now() { date +%s.%N; }
since() { python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$1" "$(now)"; }
record() { # system workload round seconds
    echo "bench-json: {\"system\": \"$1\", \"workload\": \"$2\", \"round\": $3, \"iops\": 0, \"mib_s\": $(python3 -c "print($MB / $4)")}"
}
# server: s3 or http; its base URL for add, and curl's arguments.
# server: s3, http, or http-4m (--fetch-size 4M); add's arguments.
base_of() {
    case $1 in
        s3) echo --base s3://bench/obj.img ;;
        http) echo --base http://127.0.0.1:18092/obj.img ;;
        http-4m) echo --base http://127.0.0.1:18092/obj.img --fetch-size 4M ;;
        capped) echo --base http://127.0.0.1:18093/obj.img ;;
    esac
}
fetch() { # server curl-args...
    local srv=$1; shift
    case $srv in
        s3) curl -sf "${SIGV4[@]}" "$@" "$S3_URL" ;;
        capped) curl -sf "$@" "http://127.0.0.1:18093/obj.img" ;;
        *) curl -sf "$@" "http://127.0.0.1:18092/obj.img" ;;
    esac
}
for round in $(seq 1 "$ROUNDS"); do
    for srv in ${SERVERS:-http http-4m s3 capped}; do
        if [ "$srv" != http-4m ]; then
            t0=$(now)
            fetch $srv -o /dev/null
            record "curl-$srv" whole-object "$round" "$(since "$t0")"
        fi

        # shellcheck disable=SC2046 # add's arguments
        dev=$("$UC" add $(base_of $srv))
        t0=$(now)
        dd if="$dev" of=/dev/null bs=1M iflag=direct status=none
        record "ublk-cow-$srv" cold-seqread-1m "$round" "$(since "$t0")"
        say "  $srv round $round: $(stat_of "$(dev_id "$dev")" remote_gets) GETs, most in flight $(stat_of "$(dev_id "$dev")" remote_gets_in_flight_max)"
        "$UC" del -n "$(dev_id "$dev")"

        # shellcheck disable=SC2046 # add's arguments
        dev=$("$UC" add $(base_of $srv))
        t0=$(now)
        "$UC" cache -n "$(dev_id "$dev")" >/dev/null 2>&1
        record "ublk-cow-$srv" cache "$round" "$(since "$t0")"
        "$UC" del -n "$(dev_id "$dev")"
    done
done

# 4 KiB cold reads at QD1, one at the start of each unit, none next to
# another (so no readahead): each one fetches its unit.
for srv in http s3; do
    # shellcheck disable=SC2046 # add's arguments
    dev=$("$UC" add $(base_of $srv))
    fio --name=rr --filename="$dev" --direct=1 --ioengine=psync --rw=read --bs=4k \
        --zonemode=strided --zonesize=4k --zonerange=1M --io_size=$((MB * 4))k \
        --output-format=json > $B/rr.json
    python3 - $B/rr.json "$srv" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["read"]["clat_ns"]["percentile"]
print("bench-json: " + json.dumps({"system": "ublk-cow-" + sys.argv[2], "workload": "cold-randread-4k-qd1",
      "round": 1, "iops": 0, "mib_s": 0, "p50_ms": j["50.000000"] / 1e6, "p99_ms": j["99.000000"] / 1e6}))
PY
    "$UC" del -n "$(dev_id "$dev")"
    for size in 4096 1048576; do
        : > $B/lat
        for i in $(seq 1 30); do
            off=$(( (RANDOM % (MB - 1)) << 20 ))
            fetch $srv -r "$off-$((off + size - 1))" -o /dev/null -w '%{time_total}\n' >> $B/lat
        done
        python3 - $B/lat "$size" "$srv" <<'PY'
import json, statistics, sys
v = sorted(float(x) * 1000 for x in open(sys.argv[1]))
print("bench-json: " + json.dumps({"system": "curl-" + sys.argv[3], "workload": f"get-{sys.argv[2]}", "round": 1,
      "iops": 0, "mib_s": 0, "p50_ms": statistics.median(v), "p99_ms": v[int(len(v) * 0.99) - 1]}))
PY
    done
done
