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
            [ "$(sha "$dev")" = "$(sha "$exp")" ] || { die "layer $i: the device reads wrong"; return; }
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
    [ "$(sha "$dev")" = "$(sha "$exp")" ] || { die "the chain of $n layers reads wrong"; return; }
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
    at_snapshot=$(sha "$dev")
    "$UC" del -n "$(dev_id "$dev")"
    "$UC" snapshot "$layer" --overlay "$a" || { die "snapshot"; return; }
    cp "$exp_a" "$exp_b"
    # Two forks of one layer at once: the snapshot's own overlay, and one
    # that `add` creates over the layer.
    da=$(add --base "$layer" --overlay "$a") || { die "add fork a"; return; }
    db=$(add --base "$layer" --overlay "$b") || { die "add fork b"; return; }
    [ "$(sha "$da")" = "$at_snapshot" ] && [ "$(sha "$db")" = "$at_snapshot" ] \
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
    [ "$(sha "$da")" = "$(sha "$exp_a")" ] || { die "fork a reads wrong"; return; }
    [ "$(sha "$db")" = "$(sha "$exp_b")" ] || { die "fork b reads wrong"; return; }
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
