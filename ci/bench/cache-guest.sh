#!/bin/bash
# Cache benchmarks inside a guest with ublk_drv, in one boot:
# 1. readahead over a slow base (dm-delay, 1 ms per I/O, over a loop device):
#    each workload on ublk-cow with --readahead auto, off, and auto with
#    --cache-mode cow, and on the kernel loop driver (direct I/O off, so it
#    reads through its page cache) over the same base; interleaved rounds,
#    medians. After each ublk-cow run its prefetch counters (bytes asked,
#    bytes of those later read) go into the record. WORKLOADS and SYSTEMS
#    (space-separated) pick some of:
#      seqread-4k-qd1-slow-base        4K O_DIRECT sequential, QD1
#      seqread-64k-qd1-slow-base       64K O_DIRECT sequential, QD1
#      seqread-buffered-4k-slow-base   4K buffered sequential (the kernel's
#                                      readahead-hint path, as dd bs=4k)
#      seqread-2streams-4k-slow-base   two 4K O_DIRECT QD1 readers, 128M apart
#      seqread-backwards-4k-slow-base  4K O_DIRECT QD1, going backwards
#      randread-4k-qd1-slow-base       4K O_DIRECT random, QD1
#      seqread-4k-qd1-no-delay         4K O_DIRECT sequential, QD1, over the
#                                      loop device without the delay: what
#                                      each system can do when reads never
#                                      wait for the base (not in the default)
#    Any of the *-slow-base ones with "-nullb" appended runs over another
#    1 ms base instead: a null_blk disk holding the same bytes in memory
#    that completes each I/O by a timer. device-mapper's delay target keeps
#    a CPU busy while any I/O waits, which under emulation with two CPUs
#    takes one from the reader and the daemon for as long as prefetch
#    keeps I/O in flight (not in the default). With "-memory" appended
#    instead, the base is the image file in the guest's tmpfs: every READ
#    finds its data in memory, for every system, so each system's figure
#    there is the most any prefetch could give it over a slow base (not in
#    the default). With "-warm" appended, the base's page cache holds the
#    whole base before each run (read once after the caches are dropped,
#    and held open until the run ends):
#    every read a system sends to the base finds its pages there, as a
#    perfect prefetch would leave them. Unlike -memory the base is the same
#    device, read the same way, so each system's figure is the most any
#    prefetch into the base's page cache could give it (not in the
#    default).
#    SYSTEMS: loop ublk-cow-ra-auto ublk-cow-ra-off ublk-cow-ra-auto-cow
#    ublk-cow-ra-auto-copy (`--zero-copy off`: copy mode on a kernel with
#    zero copy)
#    ublk-cow-old-ra-auto and ublk-cow-old2-ra-auto (other builds,
#    UBLK_COW_OLD_BIN and UBLK_COW_OLD2_BIN), ublk-cow-ra-auto-rakb1m and
#    loop-rakb1m (the device's read_ahead_kb at 1024; not in the default).
#    Each run reads at most RUNTIME seconds and at most the device once;
#    each round starts one system later than the one before.
# 2. `cache --cow-on-cache` of a whole device against `cp` of the base file
#    to the same file system.
# Prints "bench-json: {...}" lines and a summary.
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
ALL_WORKLOADS="seqread-4k-qd1-slow-base seqread-64k-qd1-slow-base seqread-buffered-4k-slow-base
 seqread-2streams-4k-slow-base seqread-backwards-4k-slow-base randread-4k-qd1-slow-base"
WORKLOADS=${WORKLOADS:-$ALL_WORKLOADS}
SYSTEMS=${SYSTEMS:-loop ublk-cow-ra-auto ublk-cow-ra-off ublk-cow-ra-auto-cow}
B=/tmp/ublk-cow-cache-bench
tmpfs_at $B 1800M
export TMPDIR=$B
OUT=$B/out; mkdir -p $OUT; : > $OUT/runs.jsonl

head -c 256M /dev/urandom > $B/base.img
if [ -z "${COPY_ONLY:-}" ]; then
LO=$(losetup -f --show $B/base.img)
SZ=$(blockdev --getsz "$LO")
dmsetup create ucslow --table "0 $SZ delay $LO 0 1"
SLOW=/dev/mapper/ucslow
case $WORKLOADS in *-nullb*)
    modprobe null_blk nr_devices=1 gb=1 bs=4096 memory_backed=1 irqmode=2 completion_nsec=1000000
    dd if=$B/base.img of=/dev/nullb0 bs=1M oflag=direct status=none
    dmsetup create ucnullb --readonly --table "0 $SZ linear /dev/nullb0 0"
    NULLB=/dev/mapper/ucnullb ;;
esac

# The base's reads and sectors read so far (/sys/block/*/stat).
# A base in tmpfs (the -memory workloads) has none: 0 0.
base_io() {
    [ -b "$1" ] || { echo "0 0"; return; }
    read -r r _ s _ < "/sys/block/$(basename "$(readlink -f "$1")")/stat"; echo "$r $s"
}

record() { # system workload round fio.json [stats.json]; BASE0/BASE1 the base_io around it
    python3 - "$4" "$1" "$2" "$3" "${5:-}" $BASE0 $BASE1 >> $OUT/runs.jsonl <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
r0, s0, r1, s1 = map(int, sys.argv[6:10])
r = {"system": sys.argv[2], "workload": sys.argv[3], "round": int(sys.argv[4]),
     "iops": j["read"]["iops"], "mib_s": j["read"]["bw_bytes"] / 2**20,
     "base_reads": r1 - r0, "base_read_bytes": (s1 - s0) * 512}
if sys.argv[5]:
    st = json.load(open(sys.argv[5]))
    st = st.get("stats", st)
    for k in ("prefetch_bytes", "prefetch_read_bytes", "cache_dropped_over_budget",
              "read_base_ops", "read_base_bytes"):
        r[k] = st.get(k, 0)
    r["bytes_read"] = j["read"]["io_bytes"]
print(json.dumps(r))
PY
    echo "bench-json: $(tail -n1 $OUT/runs.jsonl)"
}

# fio options of each workload: all at QD1 (psync), each stops after
# RUNTIME seconds or one pass over the device.
fio_args() {
    local common="--ioengine=psync --iodepth=1 --runtime=$RUNTIME --output-format=json"
    local wl=${1%-warm}
    wl=${wl%-nullb}
    case ${wl%-memory} in
        seqread-4k-qd1-slow-base) echo "--name=w --direct=1 --rw=read --bs=4k $common" ;;
        seqread-64k-qd1-slow-base) echo "--name=w --direct=1 --rw=read --bs=64k $common" ;;
        seqread-buffered-4k-slow-base) echo "--name=w --direct=0 --rw=read --bs=4k $common" ;;
        seqread-2streams-4k-slow-base)
            echo "--name=w --direct=1 --rw=read --bs=4k --numjobs=2 --size=128M" \
                 "--offset_increment=128M --group_reporting $common" ;;
        # Back 8K after each 4K read: every read is the one before the last.
        seqread-backwards-4k-slow-base) echo "--name=w --direct=1 --rw=read:-8k --bs=4k $common" ;;
        randread-4k-qd1-slow-base) echo "--name=w --direct=1 --rw=randread --bs=4k $common" ;;
        seqread-4k-qd1-no-delay) echo "--name=w --direct=1 --rw=read --bs=4k $common" ;;
    esac
}

for round in $(seq 1 "$ROUNDS"); do
    for wl in $WORKLOADS; do
        for sys in $(rotated "$round" $SYSTEMS); do
            echo 3 > /proc/sys/vm/drop_caches
            base=$SLOW
            case $wl in *no-delay) base=$LO ;; *-nullb) base=$NULLB ;; *-memory) base=$B/base.img ;; esac
            # A block device's page cache is dropped at its last close: fd 9
            # holds the base open from the warming read to the run's end.
            case $wl in *-warm) exec 9<"$base"; dd if="$base" of=/dev/null bs=1M status=none ;; esac
            case $sys in
                loop) dev=$(losetup -f --show "$base") ;;
                ublk-cow-ra-auto) dev=$("$UC" add --base "$base" --readahead auto) ;;
                ublk-cow-ra-off) dev=$("$UC" add --base "$base" --readahead off) ;;
                ublk-cow-ra-auto-cow) dev=$("$UC" add --base "$base" --readahead auto --cache-mode cow) ;;
                ublk-cow-ra-auto-copy) dev=$("$UC" add --base "$base" --readahead auto --zero-copy off) ;;
                # The kernel's own readahead window on the device at 1 MiB
                # instead of 128 KiB (buffered readers only).
                ublk-cow-ra-auto-rakb1m)
                    dev=$("$UC" add --base "$base" --readahead auto)
                    echo 1024 > "/sys/block/$(basename "$dev")/queue/read_ahead_kb" ;;
                loop-rakb1m)
                    dev=$(losetup -f --show "$base")
                    echo 1024 > "/sys/block/$(basename "$dev")/queue/read_ahead_kb" ;;
                ublk-cow-old-ra-auto)
                    dev=$(UBLK_COW_RUN_DIR=/run/ublk-cow-old "$UBLK_COW_OLD_BIN" add --base "$base" --readahead auto) ;;
                ublk-cow-old2-ra-auto)
                    dev=$(UBLK_COW_RUN_DIR=/run/ublk-cow-old2 "$UBLK_COW_OLD2_BIN" add --base "$base" --readahead auto) ;;
            esac
            BASE0=$(base_io "$base")
            # shellcheck disable=SC2046
            fio --filename="$dev" $(fio_args "$wl") > $OUT/fio.json
            BASE1=$(base_io "$base")
            case $wl in *-warm) exec 9<&- ;; esac
            case $sys in
                loop*) losetup -d "$dev"; record "$sys" "$wl" "$round" $OUT/fio.json ;;
                ublk-cow-old-ra-auto)
                    UBLK_COW_RUN_DIR=/run/ublk-cow-old "$UBLK_COW_OLD_BIN" del -n "$(dev_id "$dev")"
                    record "$sys" "$wl" "$round" $OUT/fio.json ;;
                ublk-cow-old2-ra-auto)
                    UBLK_COW_RUN_DIR=/run/ublk-cow-old2 "$UBLK_COW_OLD2_BIN" stats -n "$(dev_id "$dev")" --json > $OUT/stats.json
                    UBLK_COW_RUN_DIR=/run/ublk-cow-old2 "$UBLK_COW_OLD2_BIN" del -n "$(dev_id "$dev")"
                    record "$sys" "$wl" "$round" $OUT/fio.json $OUT/stats.json ;;
                *)
                    "$UC" stats -n "$(dev_id "$dev")" --json > $OUT/stats.json
                    "$UC" del -n "$(dev_id "$dev")"
                    record "$sys" "$wl" "$round" $OUT/fio.json $OUT/stats.json
                    ;;
            esac
        done
    done
done
dmsetup remove ucslow; losetup -d "$LO"
[ -z "${NULLB:-}" ] || { dmsetup remove ucnullb; rmmod null_blk; }
fi

# Whole-device copy-on-cache against cp, same file system (tmpfs), same base;
# which of the two goes first alternates between rounds. Set COPY_ONLY=1 to
# skip the readahead part, READAHEAD_ONLY=1 to skip this one.
if [ -z "${READAHEAD_ONLY:-}" ]; then
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
fi
python3 "$ROOT/ci/bench/summarize.py" $OUT/runs.jsonl
