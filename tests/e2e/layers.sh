# Layers: `commit` of an overlay into a copy of the base, then of a chain
# (a snapshot's new top into the layer, the layer into the base), and commit
# refused while a device uses the overlay or the layer. Sourced by run.sh.

case_commit() {
    local base=$WORK/commit-base.img ov=$WORK/commit.ov
    rm -f "$ov"
    cp "$BASE" "$base"
    local dev; dev=$(add --base "$base" --overlay "$ov")
    # Random writes of 4 KiB to 1 MiB, some unaligned, a discard and a
    # write-zeroes.
    local i
    for i in $(seq 1 60); do
        dd if=/dev/urandom of="$dev" bs=4k count=$((RANDOM % 256 + 1)) \
            seek=$(( (RANDOM * 32768 + RANDOM) % 48000 )) oflag=direct status=none
    done
    for i in 1 2 3 4 5; do
        dd if=/dev/urandom of="$dev" bs=512 count=3 seek=$(( (RANDOM * 32768 + RANDOM) % 390000 )) \
            oflag=direct status=none
    done
    blkdiscard -z -o $((100 << 20)) -l $((3 << 20)) "$dev"
    blkdiscard -o $((150 << 20)) -l $((2 << 20)) "$dev"
    local want; want=$(digest "$dev")

    # In use by the device: refused, one line, nothing changed.
    local ov_sha; ov_sha=$(digest "$ov")
    expect_fail "commit of an overlay in use" "$UC" commit "$ov"
    expect_fail "commit --force of an overlay in use" "$UC" commit --force "$ov"
    [ "$(digest "$base")" = "$BASE_DIGEST" ] || die "a refused commit changed the base"
    [ "$(digest "$ov")" = "$ov_sha" ] || die "a refused commit changed the overlay"

    "$UC" del -n "$(dev_id "$dev")"
    "$UC" commit "$ov" >commit.log || { cat commit.log; die "commit failed"; }
    say "  $(cat commit.log)"
    [ "$(digest "$base")" = "$want" ] || die "the base after commit differs from the device"
    "$UC" check "$ov" || die "check of the committed overlay failed"
    # Added again over the committed base: it reads the same.
    dev=$(add --base "$base" --overlay "$ov")
    [ "$(digest "$dev")" = "$want" ] || die "the device after commit reads other data"
    "$UC" del -n "$(dev_id "$dev")"

    # A chain: the overlay frozen by a snapshot, a device over the new top.
    local top=$WORK/commit.top
    rm -f "$top"
    "$UC" snapshot "$ov" --overlay "$top" >/dev/null
    dev=$(add --base "$ov" --overlay "$top")
    for i in $(seq 1 20); do
        dd if=/dev/urandom of="$dev" bs=64k count=$((RANDOM % 16 + 1)) \
            seek=$(( (RANDOM * 32768 + RANDOM) % 3000 )) oflag=direct status=none
    done
    want=$(digest "$dev")
    expect_fail "commit of a layer below a device" "$UC" commit "$ov"
    expect_fail "commit of a device's top" "$UC" commit "$top"
    "$UC" del -n "$(dev_id "$dev")"
    # The top into the layer, then the layer into the base: the chain
    # reads the same after each, and the base at last reads as the device.
    "$UC" commit "$top" >/dev/null
    dev=$(add --base "$ov" --overlay "$top")
    [ "$(digest "$dev")" = "$want" ] || die "the chain reads other data after the top's commit"
    "$UC" del -n "$(dev_id "$dev")"
    "$UC" commit "$ov" >/dev/null
    [ "$(digest "$base")" = "$want" ] || die "the base after the layer's commit differs"
    dev=$(add --base "$ov" --overlay "$top")
    [ "$(digest "$dev")" = "$want" ] || die "the chain reads other data after the layer's commit"
    "$UC" del -n "$(dev_id "$dev")"
    rm -f "$ov" "$top" "$base" commit.log
    base_unchanged
}

CASES+=("layers: commit of an overlay into a copy of the base, of a chain down to it; refused while in use|case_commit")
