#!/bin/bash
# What UBLK_F_BATCH_IO saves per request, inside a guest with ublk_drv:
# fio (io_uring, O_DIRECT) against ci/bench/batch-null (a null target, so
# the transport between the kernel and the queue is all that is measured)
# in each of its modes, interleaved rounds. Prints one "bench-json: {...}"
# line per run (ci/bench/run.sh collects them on the host).
#   env: ROUNDS (3), RUNTIME (5 s), SYSTEMS (null-classic null-zero-copy
#        null-batch), WORKLOADS (randread-4k randread-4k-qd1 randwrite-4k
#        seqread-128k)
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
SYSTEMS=${SYSTEMS:-null-classic null-zero-copy null-batch}
WORKLOADS=${WORKLOADS:-randread-4k randread-4k-qd1 randwrite-4k seqread-128k}
BIN=${BATCH_NULL_BIN:-$ROOT/ci/bench/batch-null/target/release/batch-null}
[ -x "$BIN" ] || die "no $BIN: make bench-batch builds it"
OUT=/tmp/ublk-cow-batch-out; rm -rf "$OUT"; mkdir -p "$OUT"; : > "$OUT/runs.jsonl"
say "bench: null target transports on $(uname -r)"

workload_args() {
    case $1 in
        randread-4k) echo "--rw=randread --bs=4k --iodepth=32" ;;
        randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
        randwrite-4k) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
        seqread-128k) echo "--rw=read --bs=128k --iodepth=8" ;;
    esac
}

for wl in $WORKLOADS; do
    for round in $(seq 1 "$ROUNDS"); do
        for sys in $SYSTEMS; do
            rm -f "$OUT/stop"
            "$BIN" "${sys#null-}" "$OUT/stop" > "$OUT/dev" 2> "$OUT/err" &
            pid=$!
            for _ in $(seq 1 100); do [ -s "$OUT/dev" ] && break; sleep 0.1; done
            dev=$(cat "$OUT/dev")
            [ -b "$dev" ] || { cat "$OUT/err"; die "$sys did not start"; }
            # shellcheck disable=SC2046
            fio --name="$wl" --filename="$dev" --direct=1 --ioengine=io_uring \
                --time_based --runtime="$RUNTIME" --output-format=json \
                $(workload_args "$wl") > "$OUT/fio.json"
            touch "$OUT/stop"; wait "$pid"
            fio_record "$OUT/fio.json" "$sys" "$wl" "$round" "$OUT/runs.jsonl"
        done
    done
done
