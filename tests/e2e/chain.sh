# Chains of layers served by a device: `snapshot` freezes an overlay into a
# layer and puts a new one over it; `add --base LAYER` serves the chain.
# Each case keeps an expected image (a copy of the base with the same
# writes applied) and compares the device with it.

# chain_write DEV EXPECTED: three 64 KiB writes at random 4 KiB-aligned
# offsets, a 512-byte write inside a block (its fill comes from below), and
# a 64 KiB discard; each applied to EXPECTED too.
chain_write() {
    local dev=$1 exp=$2 blocks=$((BASE_MB * 256 - 16)) off j
    for j in 1 2 3; do
        off=$(( (RANDOM * 32768 + RANDOM) % blocks ))
        head -c 65536 /dev/urandom > piece
        dd if=piece of="$dev" bs=4096 seek="$off" oflag=direct status=none || return 1
        dd if=piece of="$exp" bs=4096 seek="$off" conv=notrunc status=none
    done
    off=$(( (RANDOM * 32768 + RANDOM) % blocks ))
    head -c 512 /dev/urandom > piece
    dd if=piece of="$dev" bs=512 seek=$((off * 8 + 3)) oflag=direct status=none || return 1
    dd if=piece of="$exp" bs=512 seek=$((off * 8 + 3)) conv=notrunc status=none
    off=$(( (RANDOM * 32768 + RANDOM) % blocks ))
    blkdiscard -o $((off * 4096)) -l 65536 "$dev" || return 1
    dd if=/dev/zero of="$exp" bs=4096 seek="$off" count=16 conv=notrunc status=none
}

case_chain_16() {
    local exp=$WORK/chain-expected.img dev i n=16
    rm -f "$WORK"/chain-l*.cow
    cp "$BASE" "$exp"
    dev=$(add --base "$BASE" --overlay "$WORK/chain-l0.cow") || { die "add"; return; }
    for i in $(seq 0 "$n"); do
        chain_write "$dev" "$exp" || { die "writing layer $i"; return; }
        if [ $((i % 4)) = 0 ]; then
            [ "$(digest "$dev")" = "$(digest "$exp")" ] || { die "layer $i: the device reads wrong"; return; }
        fi
        "$UC" del -n "$(dev_id "$dev")" || { die "del"; return; }
        [ "$i" = "$n" ] && break
        "$UC" snapshot "$WORK/chain-l$i.cow" --overlay "$WORK/chain-l$((i + 1)).cow" \
            || { die "snapshot $i"; return; }
        dev=$(add --base "$WORK/chain-l$i.cow" --overlay "$WORK/chain-l$((i + 1)).cow") \
            || { die "add over layer $i"; return; }
    done
    # The top and the 16 layers below it, read again from a fresh device.
    dev=$(add --base "$WORK/chain-l$((n - 1)).cow" --overlay "$WORK/chain-l$n.cow") \
        || { die "add of the whole chain"; return; }
    [ "$(digest "$dev")" = "$(digest "$exp")" ] || { die "the chain of $n layers reads wrong"; return; }
    local layers
    layers=$("$UC" info --backing-chain "$WORK/chain-l$n.cow" | grep -c '^file:')
    [ "$layers" = $((n + 2)) ] || { die "info --backing-chain lists $layers files, not $((n + 2))"; return; }
    "$UC" check "$WORK/chain-l$n.cow" >/dev/null || { die "check of the top failed"; return; }
    say "  a chain of $n layers and the top read as the writes made them"
    expect_fail "a layer written to" "$UC" add --base "$BASE" --overlay "$WORK/chain-l3.cow"
    "$UC" del -n "$(dev_id "$dev")"
    base_unchanged
}

case_chain_forks() {
    local layer=$WORK/fork-layer.cow a=$WORK/fork-a.cow b=$WORK/fork-b.cow
    local exp_a=$WORK/fork-a.img exp_b=$WORK/fork-b.img dev da db at_snapshot
    rm -f "$layer" "$a" "$b"
    cp "$BASE" "$exp_a"
    dev=$(add --base "$BASE" --overlay "$layer") || { die "add"; return; }
    chain_write "$dev" "$exp_a" || { die "write"; return; }
    at_snapshot=$(digest "$dev")
    "$UC" del -n "$(dev_id "$dev")"
    "$UC" snapshot "$layer" --overlay "$a" || { die "snapshot"; return; }
    cp "$exp_a" "$exp_b"
    # Two forks of one layer at once: the snapshot's own overlay, and one
    # that `add` creates over the layer.
    da=$(add --base "$layer" --overlay "$a") || { die "add fork a"; return; }
    db=$(add --base "$layer" --overlay "$b") || { die "add fork b"; return; }
    [ "$(digest "$da")" = "$at_snapshot" ] && [ "$(digest "$db")" = "$at_snapshot" ] \
        || { die "a fork does not read what the device held at the snapshot"; return; }
    # The blocks written in fork a, as map will list them at depth 0.
    local blocks=$((BASE_MB * 256)) off written=""
    for off in $(( (RANDOM * 32768 + RANDOM) % blocks )) $(( (RANDOM * 32768 + RANDOM) % blocks )); do
        head -c 8192 /dev/urandom > piece
        dd if=piece of="$da" bs=4096 seek="$off" oflag=direct status=none
        dd if=piece of="$exp_a" bs=4096 seek="$off" conv=notrunc status=none
        written="$written $off $((off + 1))"
    done
    chain_write "$db" "$exp_b" || { die "write fork b"; return; }
    [ "$(digest "$da")" = "$(digest "$exp_a")" ] || { die "fork a reads wrong"; return; }
    [ "$(digest "$db")" = "$(digest "$exp_b")" ] || { die "fork b reads wrong"; return; }
    expect_fail "a live overlay in use as a base" "$UC" add --base "$a" --overlay "$WORK/fork-c.cow"
    [ ! -e "$WORK/fork-c.cow" ] || { die "the refused add created its overlay"; return; }
    expect_fail "a snapshot of an overlay in use" "$UC" snapshot "$a" --overlay "$WORK/fork-c.cow"
    expect_fail "a snapshot onto an existing file" "$UC" snapshot "$layer" --overlay "$b"
    expect_fail "another block size over a layer" \
        "$UC" add --base "$layer" --overlay "$WORK/fork-c.cow" --block-size 8K
    "$UC" del -n "$(dev_id "$da")"; "$UC" del -n "$(dev_id "$db")"
    # map: the extents at depth 0 of fork a are exactly the blocks written.
    local got want
    got=$("$UC" map --json "$a" | python3 -c '
import json, sys
blocks = set()
for e in json.load(sys.stdin):
    if e["depth"] == 0:
        blocks.update(range(e["start"] // 4096, (e["start"] + e["length"]) // 4096))
print(" ".join(str(b) for b in sorted(blocks)))')
    want=$(printf '%s\n' $written | sort -n -u | tr '\n' ' ' | sed 's/ $//')
    [ "$got" = "$want" ] || { die "map of fork a at depth 0: [$got], written: [$want]"; return; }
    say "  two forks served at once; map lists the $(echo "$want" | wc -w) blocks written in fork a"
    base_unchanged
}

CASES+=("layers: a chain of 16 layers made by snapshot reads as its writes|case_chain_16")
CASES+=("layers: two forks of a layer at once; map lists a fork's written blocks; refusals|case_chain_forks")

# The same writes to a chain of ublk-cow layers and to a qcow2 chain made
# with qemu-img (4 KiB clusters, written through qemu-nbd): the same bytes,
# and the same layer holding each block (qemu-img map against ublk-cow map).
case_chain_qcow2() {
    local n=4 i j off dev q blocks=$((BASE_MB * 256 - 4))
    rm -f "$WORK"/cq*.cow "$WORK"/cq*.qcow2
    modprobe nbd max_part=0 || { die "no nbd module"; return; }
    dev=$(add --base "$BASE" --overlay "$WORK/cq1.cow") || { die "add"; return; }
    for i in $(seq 1 $n); do
        q=$WORK/cq$i.qcow2
        if [ "$i" = 1 ]; then
            qemu-img create -q -f qcow2 -o cluster_size=4096 -b "$BASE" -F raw "$q"
        else
            qemu-img create -q -f qcow2 -o cluster_size=4096 -b "$WORK/cq$((i - 1)).qcow2" -F qcow2 "$q"
        fi
        qemu-nbd -c /dev/nbd3 -f qcow2 "$q" || { die "qemu-nbd"; return; }
        wait_nbd /dev/nbd3
        for j in 1 2 3 4 5; do
            off=$(( (RANDOM * 32768 + RANDOM) % blocks ))
            head -c $((4096 * (1 + RANDOM % 4))) /dev/urandom > piece
            dd if=piece of="$dev" bs=4096 seek="$off" oflag=direct status=none
            dd if=piece of=/dev/nbd3 bs=4096 seek="$off" oflag=direct status=none
        done
        # One 512-byte write inside a block: both copy the rest from below.
        off=$(( (RANDOM * 32768 + RANDOM) % blocks ))
        head -c 512 /dev/urandom > piece
        dd if=piece of="$dev" bs=512 seek=$((off * 8 + 5)) oflag=direct status=none
        dd if=piece of=/dev/nbd3 bs=512 seek=$((off * 8 + 5)) oflag=direct status=none
        qemu-nbd -d /dev/nbd3 >/dev/null
        "$UC" del -n "$(dev_id "$dev")"
        [ "$i" = $n ] && break
        "$UC" snapshot "$WORK/cq$i.cow" --overlay "$WORK/cq$((i + 1)).cow" || { die "snapshot"; return; }
        dev=$(add --base "$WORK/cq$i.cow" --overlay "$WORK/cq$((i + 1)).cow") || { die "add $i"; return; }
    done
    qemu-img convert -O raw "$WORK/cq$n.qcow2" "$WORK/cq.raw"
    dev=$(add --base "$WORK/cq$((n - 1)).cow" --overlay "$WORK/cq$n.cow") || { die "add top"; return; }
    [ "$(digest "$dev")" = "$(digest "$WORK/cq.raw")" ] \
        || { die "the ublk-cow chain and the qcow2 chain read differently"; return; }
    "$UC" del -n "$(dev_id "$dev")"
    rm -f "$WORK/cq.raw"
    local ours theirs
    ours=$("$UC" map --json "$WORK/cq$n.cow" | depth_per_block) || { die "map"; return; }
    theirs=$(qemu-img map --output=json "$WORK/cq$n.qcow2" | depth_per_block) || { die "qemu-img map"; return; }
    [ "$ours" = "$theirs" ] || { die "the layer of each block differs: ours $ours, qcow2 $theirs"; return; }
    say "  $n layers: the same bytes as the qcow2 chain, and the same layer for each of $(echo "$ours" | wc -w) runs of written blocks"
    base_unchanged
}

# wait_nbd DEV: until the device answers with a size.
wait_nbd() {
    local i
    for i in $(seq 50); do [ "$(blockdev --getsize64 "$1" 2>/dev/null || echo 0)" -gt 0 ] && return; sleep 0.1; done
}

# The extents of `map --json` (ours or qemu-img's) as runs of 4 KiB blocks
# held above the base: "depth:first-last" for each, depth 0 the file named.
depth_per_block() {
    python3 -c '
import json, sys
ext = json.load(sys.stdin)
deepest = max(e["depth"] for e in ext)
held = {}
for e in ext:
    if e["depth"] < deepest and e.get("data", True):
        for b in range(e["start"] // 4096, (e["start"] + e["length"]) // 4096):
            held[b] = e["depth"]
runs, prev = [], None
for b in sorted(held):
    if prev and prev[0] == held[b] and prev[2] == b - 1:
        prev[2] = b
    else:
        prev = [held[b], b, b]
        runs.append(prev)
print(" ".join("%d:%d-%d" % tuple(r) for r in runs))'
}

CASES+=("layers: the same writes to a ublk-cow chain and a qcow2 chain (qemu-img): same bytes, same layers|case_chain_qcow2")

# snapshot -n of a device in use, taken by its daemon: under a fio verify
# load and a reader (no error, no failed request), then quietly: a fork of
# the frozen layer reads what the device held at the snapshot, and map of
# the new top lists exactly the blocks written since.
case_live_snapshot() {
    local l0=$WORK/live0.cow l1=$WORK/live1.cow l2=$WORK/live2.cow fork=$WORK/live-fork.cow
    local dev id pause at_snapshot
    rm -f "$l0" "$l1" "$l2" "$fork"
    # Copies into the overlay too (cow-on-read, cache requests copying):
    # the snapshot drops what was queued for the old device.
    dev=$(add --base "$BASE" --overlay "$l0" --cow-on-read --cow-on-cache) || { die "add"; return; }
    id=$(dev_id "$dev")
    fio --name=verify --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite \
        --bs=4k --iodepth=16 --size=48M --verify=crc32c --do_verify=1 \
        --output=fio.out >/dev/null 2>&1 &
    local fio_pid=$! waited=0
    # A sequential reader of the first 16 MiB beside it (readahead, copies)
    # until fio ends.
    ( while kill -0 "$fio_pid" 2>/dev/null; do
        dd if="$dev" of=/dev/null bs=64k count=256 iflag=direct status=none || exit 1
    done ) &
    local reader=$!
    # The snapshot falls in the middle of the writes: after 16 MiB of 48.
    while [ "$(stat_of "$id" write_bytes)" -lt $((16 << 20)) ]; do
        sleep 0.2; waited=$((waited + 1))
        [ "$waited" -lt 600 ] || { die "fio wrote less than 16 MiB in 120 s"; return; }
    done
    local pid; pid=$(daemon_pid "$id")
    pause=$("$UC" snapshot -n "$id" --overlay "$l1" 2>&1 >/dev/null) || { die "snapshot under load: $pause"; return; }
    say "  under fio verify: $pause"
    # Taken inside the daemon: the same process serves on.
    [ "$(daemon_pid "$id")" = "$pid" ] || { die "the daemon was replaced at the snapshot"; return; }
    wait "$fio_pid" || { die "fio verify failed across the snapshot: $(grep -i err fio.out | head -3)"; return; }
    wait "$reader" || { die "a read failed across the snapshot"; return; }
    "$UC" info "$l0" | grep -q 'frozen' || { die "the old overlay is not frozen"; return; }
    "$UC" list | grep -q "$l1" || { die "the device does not name its new overlay: $("$UC" list)"; return; }
    # Quiet: the device's contents at the snapshot are the frozen layer's.
    # The first 64 MiB hold every write; reading them copies them up (the
    # whole device would fill the guest's /tmp with copies).
    head64() { dd if="$1" bs=1M count=64 iflag=direct status=none | md5sum | cut -d' ' -f1; }
    at_snapshot=$(head64 "$dev")
    pause=$("$UC" snapshot -n "$id" --overlay "$l2" 2>&1 >/dev/null) || { die "snapshot: $pause"; return; }
    say "  quiet: $pause"
    local f; f=$(add --base "$l1" --overlay "$fork") || { die "add fork"; return; }
    [ "$(head64 "$f")" = "$at_snapshot" ] || { die "the fork does not read what the device held at the snapshot"; return; }
    [ "$(head64 "$dev")" = "$at_snapshot" ] || { die "the device changed at the snapshot"; return; }
    "$UC" del -n "$(dev_id "$f")"
    local off written=""
    for off in 100 101 5000 20000; do
        head -c 4096 /dev/urandom | dd of="$dev" bs=4096 seek="$off" oflag=direct status=none
        written="$written $off"
    done
    expect_fail "a snapshot onto an existing file" "$UC" snapshot -n "$id" --overlay "$l1"
    "$UC" del -n "$id"
    local got
    got=$("$UC" map --json "$l2" | python3 -c '
import json, sys
print(" ".join(str(b) for e in json.load(sys.stdin) if e["depth"] == 0
               for b in range(e["start"] // 4096, (e["start"] + e["length"]) // 4096)))')
    [ "$got" = "${written# }" ] || { die "map of the new top: [$got], written since the snapshot: [${written# }]"; return; }
    expect_fail "a snapshot of no device" "$UC" snapshot -n 77 --overlay "$WORK/none.cow"
    rm -f "$l0" "$l1" "$l2" "$fork"
    base_unchanged
}

CASES+=("layers: snapshot -n of a device under fio verify; a fork reads the snapshot; map lists the writes since|case_live_snapshot")

# A snapshot interrupted after the daemon was stopped (as if `snapshot -n`
# were killed there: the state file names the new overlay): `recover`
# finishes it, and the device reads on over the chain; `del` of another
# such device forgets the snapshot and keeps every write.
case_interrupted_snapshot() {
    local l0=$WORK/int0.cow l1=$WORK/int1.cow m0=$WORK/intm0.cow m1=$WORK/intm1.cow
    local dev id sum st
    rm -f "$l0" "$l1" "$m0" "$m1"
    dev=$(add --base "$BASE" --overlay "$l0") || { die "add"; return; }
    id=$(dev_id "$dev")
    head -c 4M /dev/urandom | dd of="$dev" bs=1M seek=7 oflag=direct status=none
    sum=$(digest "$dev")
    interrupt() { # ID NEW: kill the daemon, and record the snapshot begun
        st=$(daemon_pid "$1")
        kill -9 "$st"
        while kill -0 "$st" 2>/dev/null; do sleep 0.05; done
        python3 - "$UBLK_COW_RUN_DIR/$1.json" "$2" <<'PY'
import json, sys
p, new = sys.argv[1], sys.argv[2]
s = json.load(open(p)); s["snapshot_to"] = new
json.dump(s, open(p, "w"))
PY
    }
    # The new overlay's path taken by another overlay, holding writes, in
    # the window before the snapshot made it: recover leaves it and says so.
    local taken=$WORK/intx.cow tsum
    rm -f "$taken"
    st=$(add --base "$BASE" --overlay "$taken") || { die "add of the other overlay"; return; }
    head -c 1M /dev/urandom | dd of="$st" bs=1M seek=2 oflag=direct status=none
    "$UC" del -n "$(dev_id "$st")"
    tsum=$(digest "$taken")
    interrupt "$id" "$taken"
    expect_fail "recover over another's overlay at the new path" "$UC" recover -n "$id"
    [ "$(digest "$taken")" = "$tsum" ] || { die "recover removed or changed another's overlay"; return; }
    rm -f "$taken"
    python3 - "$UBLK_COW_RUN_DIR/$id.json" "$l1" <<'PY'
import json, sys
p, new = sys.argv[1], sys.argv[2]
s = json.load(open(p)); s["snapshot_to"] = new
json.dump(s, open(p, "w"))
PY
    expect_fail "a snapshot's new overlay in use" "$UC" add --base "$BASE" --overlay "$l1"
    "$UC" recover -n "$id" >/dev/null || { die "recover did not finish the snapshot"; return; }
    "$UC" info "$l0" | grep -q frozen || { die "the old overlay is not frozen"; return; }
    "$UC" list | grep -q "$l1" || { die "the device does not name the new overlay"; return; }
    [ "$(digest "$dev")" = "$sum" ] || { die "the device reads other data after the finished snapshot"; return; }
    "$UC" del -n "$id"
    # del of an interrupted snapshot whose overlay is not frozen yet.
    dev=$(add --base "$BASE" --overlay "$m0") || { die "add 2"; return; }
    id=$(dev_id "$dev")
    head -c 2M /dev/urandom | dd of="$dev" bs=1M seek=3 oflag=direct status=none
    sum=$(digest "$dev")
    interrupt "$id" "$m1"
    "$UC" del -n "$id" || { die "del of an interrupted snapshot"; return; }
    "$UC" info "$m0" | grep -q frozen && { die "del froze the overlay"; return; }
    dev=$(add --base "$BASE" --overlay "$m0") || { die "add of the kept overlay"; return; }
    [ "$(digest "$dev")" = "$sum" ] || { die "writes lost by del of an interrupted snapshot"; return; }
    "$UC" del -n "$(dev_id "$dev")"
    base_unchanged
}

CASES+=("layers: an interrupted snapshot: recover finishes it, del forgets it, no write lost|case_interrupted_snapshot")

# A snapshot -n that fails after the freeze (its new overlay's file system
# turned read-only after the command's checks): the daemon ends, the
# kernel holds the device's I/O, and once NEW can be made, recover finishes
# the snapshot with no write lost.
case_snapshot_fails_after_freeze() {
    local ro=$WORK/ro l0=$WORK/ff0.cow dev id pid sum err
    rm -f "$l0"; mkdir -p "$ro"; mount -t tmpfs -o size=64M tmpfs "$ro"
    dev=$(add --base "$BASE" --overlay "$l0") || { die "add"; return; }
    id=$(dev_id "$dev"); pid=$(daemon_pid "$id")
    head -c 3M /dev/urandom | dd of="$dev" bs=1M seek=5 oflag=direct status=none
    sum=$(digest "$dev")
    mount -o remount,ro "$ro"
    err=$("$UC" snapshot -n "$id" --overlay "$ro/new.cow" 2>&1 >/dev/null) \
        && { die "snapshot onto a read-only file system succeeded"; return; }
    say "  refused after the freeze: $err"
    [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] || { die "expected one error line"; return; }
    case $err in *"recover -n $id"*) ;; *) die "the error does not say recover finishes it"; return ;; esac
    ! kill -0 "$pid" 2>/dev/null || { die "the daemon serves on over a frozen overlay"; return; }
    "$UC" info "$l0" | grep -q frozen || { die "the overlay was not frozen"; return; }
    mount -o remount,rw "$ro"
    "$UC" recover -n "$id" >/dev/null || { die "recover did not finish the snapshot"; return; }
    "$UC" list | grep -q "$ro/new.cow" || { die "the device does not name the new overlay"; return; }
    [ "$(digest "$dev")" = "$sum" ] || { die "a write was lost"; return; }
    "$UC" del -n "$id"
    umount "$ro"; rm -f "$l0"
    base_unchanged
}

CASES+=("layers: a snapshot -n that fails after the freeze: the daemon ends, recover finishes it|case_snapshot_fails_after_freeze")
