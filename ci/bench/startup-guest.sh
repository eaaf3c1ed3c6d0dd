#!/bin/bash
# Map size and start-up time at scale: `add` over a 1 TiB sparse base with a
# fresh overlay (both sparse, in guest tmpfs), the size of the live map, the
# daemon's resident memory, and `del`. Prints "bench-json:" lines.
source "$(dirname "$0")/../../tests/e2e/lib.sh"
set -e
need_ublk
B=/tmp/ublk-cow-startup; mkdir -p $B
mountpoint -q $B || mount -t tmpfs -o size=4T,nr_inodes=1k tmpfs $B
truncate -s 1T $B/base.img
for round in 1 2 3; do
    t0=$(date +%s.%N)
    dev=$("$UC" add --base $B/base.img --overlay $B/ov)
    t1=$(date +%s.%N)
    id=$(dev_id "$dev")
    map=$(stat -c %s "$UBLK_COW_RUN_DIR/$id.map")
    pid=$(grep -o '"pid": *[0-9]*' "$UBLK_COW_RUN_DIR/$id.json" | grep -o '[0-9]*$')
    rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
    dd if="$dev" of=/dev/null bs=1M count=1 skip=$((512 << 10)) iflag=direct status=none
    t2=$(date +%s.%N)
    "$UC" del -n "$id"
    t3=$(date +%s.%N)
    rm -f $B/ov
    python3 -c "import json,sys; a=list(map(float,sys.argv[1:5])); print('bench-json: '+json.dumps({'round':$round,'add_s':a[1]-a[0],'del_s':a[3]-a[2],'map_bytes':$map,'map_mib_per_tib':$map/2**20,'daemon_rss_kib':$rss}))" $t0 $t1 $t2 $t3
done
