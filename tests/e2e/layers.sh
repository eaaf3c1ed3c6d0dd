# Layers: `commit` of an overlay into a copy of the base, and commit
# refused while the overlay is in use. Sourced by run.sh.

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
    local want; want=$(sha "$dev")

    # In use by the device: refused, one line, nothing changed.
    local ov_sha; ov_sha=$(sha "$ov")
    expect_fail "commit of an overlay in use" "$UC" commit "$ov"
    expect_fail "commit --force of an overlay in use" "$UC" commit --force "$ov"
    [ "$(sha "$base")" = "$BASE_SHA" ] || die "a refused commit changed the base"
    [ "$(sha "$ov")" = "$ov_sha" ] || die "a refused commit changed the overlay"

    "$UC" del -n "$(dev_id "$dev")"
    "$UC" commit "$ov" >commit.log || { cat commit.log; die "commit failed"; }
    say "  $(cat commit.log)"
    [ "$(sha "$base")" = "$want" ] || die "the base after commit differs from the device"
    "$UC" check "$ov" || die "check of the committed overlay failed"
    # Added again over the committed base: it reads the same.
    dev=$(add --base "$base" --overlay "$ov")
    [ "$(sha "$dev")" = "$want" ] || die "the device after commit reads other data"
    "$UC" del -n "$(dev_id "$dev")"
    rm -f "$ov" "$base" commit.log
    base_unchanged
}

CASES+=("commit of an overlay into a copy of the base; refused while in use|case_commit")
