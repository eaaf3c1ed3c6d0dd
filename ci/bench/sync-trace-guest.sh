#!/bin/bash
# Where a FUA write's time goes on an overlay on ext4 or xfs (issue 24).
# For kernel loop over a sparse file (loop-sparse), rublk's loop target
# over a sparse file (rublk-sparse: a ublk server with no map, the floor
# of the ublk round trip) and ublk-cow, each with its file on a fresh ext4
# or xfs on a RAM disk (brd, mounted without `discard`): random 4 KiB
# first writes with FUA at QD1 (fio --sync=1). Prints per run the IOPS
# and the journal commits (ext4) or log forces (xfs) per write, and for
# ext4 in the first round the median time of each step of a write
# (`fua_steps`, ci/bench/fua.sh), from a trace of a second run on the same
# device.
#   bash ci/in-ublk-env.sh ci/bench/sync-trace-guest.sh
#   env: ROUNDS (2), RUNTIME (5 s), SYSTEMS (loop-sparse rublk-sparse
#        ublk-cow; any of ci/bench/systems.sh that write)
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
need_ublk
ROUNDS=${ROUNDS:-2}
RUNTIME=${RUNTIME:-5}
source "$(dirname "$0")/fua.sh"
bench_base

# Journal commits of ext4 on ram0, or xfs log forces, so far.
commits() {
    case $1 in
        ext4) awk 'NR==1{print $1}' /proc/fs/jbd2/ram0-8/info ;;
        xfs) awk '/^log /{print $5}' /proc/fs/xfs/stat ;;
    esac
}

SYSTEMS=${SYSTEMS:-loop-sparse rublk-sparse ublk-cow}
for fs in ext4 xfs; do
    for round in $(seq 1 "$ROUNDS"); do
        for sys in $(rotated "$round" $SYSTEMS); do
            overlay_fs "$fs" ""
            dev=$(sys_up "$sys")
            q=/sys/block/${dev#/dev/}/queue
            [ "$round" != 1 ] || say "sync-trace: $sys: write cache $(cat $q/write_cache), fua $(cat $q/fua)"
            c0=$(commits "$fs")
            fua "$dev" 0 "$RUNTIME" --output-format=json > /tmp/sync-trace.json
            c1=$(commits "$fs")
            python3 - "$fs" "$sys" "$round" "$((c1 - c0))" <<'PY'
import json, sys
w = json.load(open("/tmp/sync-trace.json"))["jobs"][0]["write"]
fs, name, rnd, commits = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
print(f"sync-trace: {fs} {name} round {rnd}: {w['iops']:.0f} IOPS, "
      f"{w['clat_ns']['mean'] / 1000:.0f} us a write, "
      f"{commits / max(w['total_ios'], 1):.2f} commits a write")
PY
            if [ "$fs" = ext4 ] && [ "$round" = 1 ]; then
                fua_steps "$sys" "$dev"
            fi
            sys_down "$sys" "$dev"
        done
    done
done
overlay_fs tmpfs
