#!/bin/bash
# Benchmark inside a guest with ublk_drv: fio (io_uring, O_DIRECT) against
# ublk-cow and its peers over the same base, in one boot, in interleaved
# rounds, each starting one system later than the one before (A B C, B C
# A, C A B: each system takes each place in turn), a fresh device for
# every first-write job.
# Prints one "bench-json: {...}" line per run (ci/bench/run.sh collects
# them on the host), then the summary table.
#   env: ROUNDS (3), SYSTEMS (all of SYSTEMS_ALL), WORKLOADS (all but the
#        sync ones), RUNTIME (10 s), SLOW_MS (unset: the base in tmpfs; else
#        the base on a device that takes this many ms per I/O), OVERLAY_FS
#        (tmpfs: the file systems the overlays live on, in turn, each a
#        fresh one: tmpfs, ext4, xfs; workloads on ext4 or xfs are named
#        with -ext4 or -xfs). seqread-SIZE, randread-SIZE and
#        seqread-SIZE-written take any fio block size (64k, 128k, 512k)
#        besides the default 1m and 4k and the written ones' 64k, 256k
#        and 1m.
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
modprobe nbd max_part=0 2>/dev/null || true
need_ublk
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
SYSTEMS=${SYSTEMS:-$SYSTEMS_ALL}
WORKLOADS=${WORKLOADS:-"randread-4k randwrite-4k-first chunkwrite-4k-first randread-4k-written seqread-1m seqread-64k-written seqread-256k-written seqread-1m-written seqwrite-1m-first randrw-4k"}
OUT=${OUT:-/tmp/ublk-cow-bench-out}
mkdir -p "$OUT"; : > "$OUT/runs.jsonl"

bench_base
# The variant on a slower device: the base (and loop's and rublk's copies)
# on disks that take SLOW_MS ms per I/O; overlays and COW stores stay in
# tmpfs. Its workloads are named with -slow-base.
SUFFIX=
if [ -n "${SLOW_MS:-}" ]; then
    slow_setup
    SUFFIX=-slow-base
    say "bench: the base on a slower device, $SLOW_MS ms per I/O (null_blk)"
fi

# fio arguments of each workload. Every run gets a fresh device. First
# writes cover their range once (fio's random map writes each block once),
# so every write is a first write. chunkwrite-4k-first writes one 4 KiB
# block, at random, in each 64 KiB of the 512 MiB device, in order (fio's
# strided zones), so every write is also the first in its 64 KiB chunk:
# the case where a chunk-based store copies 64 KiB of base for each 4 KiB
# written (in randwrite-4k-first 15 writes in 16 land in a chunk copied
# already).
TIMED="--time_based --runtime=$RUNTIME --ramp_time=1"
workload_args() {
    case $1 in
        randread-4k) echo "--rw=randread --bs=4k --iodepth=32 $TIMED" ;;
        randwrite-4k-first) echo "--rw=randwrite --bs=4k --iodepth=32 --size=64M" ;;
        randread-4k-written) echo "--rw=randread --bs=4k --iodepth=32 --size=64M $TIMED" ;;
        chunkwrite-4k-first) echo "--rw=randwrite --bs=4k --iodepth=32 --zonemode=strided --zonesize=4k --zonerange=64k --io_size=32M" ;;
        seqread-*-written)
            local bs=${1#seqread-}; bs=${bs%-written}
            echo "--rw=read --bs=$bs --iodepth=8 --size=64M $TIMED" ;;
        # A fresh device read in order: each READ one run of the base.
        seqread-*) echo "--rw=read --bs=${1#seqread-} --iodepth=8 $TIMED" ;;
        # A fresh device read at random in READs of another size (64k).
        randread-*) echo "--rw=randread --bs=${1#randread-} --iodepth=32 $TIMED" ;;
        seqwrite-1m-first) echo "--rw=write --bs=1m --iodepth=8 --size=256M" ;;
        randrw-4k) echo "--rw=randrw --rwmixread=70 --bs=4k --iodepth=32 $TIMED" ;;
        # What file systems and databases send: each write FUA (O_SYNC) at
        # QD1, and a flush after every write at QD32 (1:1 write:flush).
        randwrite-4k-sync) echo "--rw=randwrite --bs=4k --iodepth=1 --sync=1 --size=64M $TIMED" ;;
        randwrite-4k-fsync) echo "--rw=randwrite --bs=4k --iodepth=32 --fsync=1 --size=64M $TIMED" ;;
        # The same FUA writes over blocks written (and flushed) before: a
        # disk in use, where no write allocates.
        randwrite-4k-sync-written) echo "--rw=randwrite --bs=4k --iodepth=1 --sync=1 --size=64M $TIMED" ;;
        *) echo "unknown workload $1" >&2; return 1 ;;
    esac
}

# run_workloads SUFFIX: every workload, round and system; SUFFIX names
# the overlays' file system in the workloads' names.
run_workloads() {
    for wl in $WORKLOADS; do
        args=$(workload_args "$wl")
        for round in $(seq 1 "$ROUNDS"); do
            for sys in $(rotated "$round" $SYSTEMS); do
                dev=$(sys_up "$sys")
                prepare "$dev" "$wl"
                s0=$(slow_base_sectors)
                fio --name="$wl" --filename="$dev" --direct=1 --ioengine=io_uring \
                    --output-format=json $args > "$OUT/fio.json"
                s1=$(slow_base_sectors)
                sys_down "$sys" "$dev"
                fio_record "$OUT/fio.json" "$sys" "$wl$SUFFIX$1" "$round" "$OUT/runs.jsonl" \
                    "${s0:+$(((s1 - s0) * 512))}"
            done
        done
    done
}

for fs in ${OVERLAY_FS:-tmpfs}; do
    overlay_fs "$fs"
    say "bench: overlays on $fs"
    if [ "$fs" = tmpfs ]; then run_workloads ""; else run_workloads "-$fs"; fi
done
overlay_fs tmpfs
[ -z "${SLOW_MS:-}" ] || slow_teardown
python3 "$ROOT/ci/bench/summarize.py" "$OUT/runs.jsonl" | tee "$OUT/summary.md"
