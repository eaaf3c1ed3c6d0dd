# Cache requests: kernel readahead hints, the O_DIRECT detector, `cache`,
# copy-on-cache under concurrent writes, a base that fails after a
# copy-on-cache, copy-on-read. Sourced by run.sh.

case_readahead_hints() {
    local dev id
    dev=$(add --base "$BASE"); id=$(dev_id "$dev")
    echo 3 > /proc/sys/vm/drop_caches
    dd if="$dev" of=/dev/null bs=1M count=64 status=none
    local flagged hinted
    flagged=$(stat_of "$id" readahead_flagged_reads); hinted=$(stat_of "$id" cache_from_kernel_hint)
    say "  buffered sequential read: $flagged reads flagged readahead, $hinted cache requests from hints"
    [ "$flagged" -gt 0 ] || die "no READ arrived with the fail-fast (readahead) flags"
    [ "$hinted" -gt 0 ] || die "no cache request from kernel readahead hints"
    [ "$(stat_of "$id" fadvise_base_bytes)" -gt 0 ] || die "passthrough did not fadvise the base"
    "$UC" del -n "$id"
    base_unchanged
}

# Prefetch reached the loop device base `$1` in reads of $2 KiB in all, $3
# of them, larger on average than the kernel's 128 KiB readahead size: one
# fadvise reads ahead up to the device's largest I/O (1280 KiB for a loop
# device), and the daemon advises in pieces of that size.
large_base_reads() {
    local q=/sys/block/$(basename "$1")/queue
    [ $(($2 / $3)) -ge 256 ] || die "prefetch reached the base in reads of $(($2 / $3)) KiB" \
        "on average (its largest I/O: $(cat $q/max_sectors_kb) KiB, readahead $(cat $q/read_ahead_kb) KiB)"
}

# The base is a loop device, so that the reads reaching it can be counted:
# with `off` they are the reader's own 4K reads (no kernel readahead on the
# base either); with `auto` they are mostly prefetch, in large pieces. The
# overlay lives in tmpfs, as the default one does where /tmp is tmpfs: the
# base's node lives in devtmpfs, which says tmpfs too, and must not make
# the device look as if all its files were in memory (where it would not
# prefetch).
case_detector() {
    local dev id lo shm=$WORK/detector-tmpfs
    lo=$(losetup -f --show -r "$BASE")
    tmpfs_at "$shm" 64M
    local stat=/sys/block/$(basename "$lo")/stat
    for ra in auto off; do
        echo 3 > /proc/sys/vm/drop_caches
        rm -f "$shm/overlay"
        dev=$(add --base "$lo" --readahead $ra --overlay "$shm/overlay"); id=$(dev_id "$dev")
        local r0 s0 r1 s1
        read -r r0 _ s0 _ < "$stat"
        dd if="$dev" of=/dev/null bs=4k count=2048 iflag=direct status=none
        read -r r1 _ s1 _ < "$stat"
        local n reads=$((r1 - r0)) kib=$(((s1 - s0) / 2))
        n=$(stat_of "$id" cache_from_detector)
        say "  O_DIRECT sequential 4K reads (8 MiB), --readahead $ra: $n detector requests;" \
            "the base saw $reads reads, $kib KiB"
        # (a few pages may be cached already: the identity samples, the
        # partition scan)
        [ "$kib" -ge 7936 ] || die "the base saw less than was read"
        if [ $ra = auto ]; then
            [ "$n" -gt 0 ] || die "the detector asked for nothing"
            large_base_reads "$lo" "$kib" "$reads"
        else
            [ "$n" = 0 ] || die "--readahead off still prefetched"
            [ $((kib / reads)) -le 8 ] || die "--readahead off: the base still reads ahead"
        fi
        "$UC" del -n "$id"
    done
    losetup -d "$lo"
    umount "$shm"
    base_unchanged
}

# Readers the detector follows besides one going up: one going backwards
# and two at once at different offsets. The base is a loop device again:
# with `auto` the base sees large reads and the prefetched bytes are read;
# with `off` it sees the readers' own 4K reads.
case_detector_streams() {
    local dev id lo
    lo=$(losetup -f --show -r "$BASE")
    local stat=/sys/block/$(basename "$lo")/stat
    local back=(--name=back --direct=1 --ioengine=psync --rw=read:-8k --bs=4k --size=8M
        --offset=16M)
    local two=(--name=two --direct=1 --ioengine=psync --rw=read --bs=4k --size=4M
        --numjobs=2 --offset_increment=32M)
    for ra in auto off; do
        for job in back two; do
            echo 3 > /proc/sys/vm/drop_caches
            dev=$(add --base "$lo" --readahead $ra); id=$(dev_id "$dev")
            local r0 s0 r1 s1 args
            if [ $job = back ]; then args=("${back[@]}"); else args=("${two[@]}"); fi
            read -r r0 _ s0 _ < "$stat"
            fio --filename="$dev" "${args[@]}" > fio-$job.log 2>&1 || {
                cat fio-$job.log; die "fio $job failed"
            }
            read -r r1 _ s1 _ < "$stat"
            local reads=$((r1 - r0)) kib=$(((s1 - s0) / 2)) asked used
            asked=$(stat_of "$id" prefetch_bytes); used=$(stat_of "$id" prefetch_read_bytes)
            say "  $job, --readahead $ra: the base saw $reads reads, $kib KiB;" \
                "prefetched $((asked >> 10)) KiB, of it read $((used >> 10)) KiB"
            [ "$kib" -ge 7936 ] || die "the base saw less than was read"
            if [ $ra = auto ]; then
                large_base_reads "$lo" "$kib" "$reads"
                [ "$used" -ge $((6 << 20)) ] || die "$job: little of what was read had been prefetched"
                [ "$used" -le "$asked" ] || die "$job: more prefetched bytes read than prefetched"
            else
                [ "$asked" = 0 ] || die "--readahead off still prefetched"
                [ $((kib / reads)) -le 8 ] || die "--readahead off: the base still reads ahead"
            fi
            "$UC" del -n "$id"
        done
    done
    losetup -d "$lo"
    base_unchanged
}

case_cow_on_cache_race() {
    local dev id
    dev=$(add --base "$BASE" --cow-on-cache); id=$(dev_id "$dev")
    local job=(--filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 --offset=32M
        --size=32M --rw=randwrite --bssplit=4k/40:16k/30:64k/30 --verify=crc32c
        --randseed=77 --name=race)
    fio "${job[@]}" --do_verify=0 > race-w.log 2>&1 &
    local fpid=$! rounds=0
    while kill -0 $fpid 2>/dev/null; do
        "$UC" cache -n "$id" --offset 32M --length 32M --cow-on-cache >/dev/null
        rounds=$((rounds + 1))
    done
    wait $fpid || { cat race-w.log; die "fio failed"; }
    fio "${job[@]}" --verify_only --verify_fatal=1 > race-v.log 2>&1 \
        || { cat race-v.log; die "a copy-on-cache undid a write"; }
    say "  $rounds whole-range copy-on-cache rounds ran during the writes; verify clean"
    [ "$rounds" -ge 2 ] || die "the cache loop did not overlap the writes"
    "$UC" del -n "$id"
    base_unchanged
}

case_base_fails_after_cow_cache() {
    local dev id img=$WORK/failbase.img
    head -c 48M /dev/urandom > "$img"
    local want; want=$(digest "$img")
    local lo; lo=$(losetup -f --show "$img")
    local sz; sz=$(blockdev --getsz "$lo")
    dmsetup create ucfail --table "0 $sz linear $lo 0"
    dev=$(add --base /dev/mapper/ucfail --cow-on-cache); id=$(dev_id "$dev")
    dd if=/dev/urandom of="$dev" bs=4k count=16 seek=100 oflag=direct status=none
    dd if="$dev" of=mid.bin bs=4k count=16 skip=100 iflag=direct status=none
    "$UC" cache -n "$id" >/dev/null
    # The base fails for real from now on, and no cache holds its data.
    dmsetup reload ucfail --table "0 $sz error"
    dmsetup resume ucfail
    echo 3 > /proc/sys/vm/drop_caches
    blockdev --flushbufs /dev/mapper/ucfail
    if dd if=/dev/mapper/ucfail of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null; then
        die "the base still reads after switching to the error target"
    fi
    cp "$img" expect.img
    dd if=mid.bin of=expect.img bs=4k seek=100 conv=notrunc status=none
    cmp <(dd if="$dev" bs=1M iflag=direct status=none) expect.img \
        || die "a block did not read correctly from the overlay"
    rm -f expect.img
    "$UC" del -n "$id"
    dmsetup remove ucfail; losetup -d "$lo"
    [ "$(digest "$img")" = "$want" ] || die "the base file changed"
}

case_cow_on_read() {
    local dev id
    dev=$(add --base "$BASE" --cow-on-read --readahead off); id=$(dev_id "$dev")
    cmp <(dd if="$dev" bs=64k skip=80 count=32 iflag=direct status=none) \
        <(dd if="$BASE" bs=64k skip=80 count=32 status=none) || die "read differs"
    sleep 1
    local copied; copied=$(stat_of "$id" copied_to_overlay_bytes)
    say "  reading 2 MiB copied $copied bytes into the overlay"
    [ "$copied" -ge $((2 << 20)) ] || die "cow-on-read copied $copied bytes"
    [ "$(stat_of "$id" blocks_allocated)" -ge 512 ] || die "blocks not allocated"
    # What is now read from the overlay is the base's data.
    cmp <(dd if="$dev" bs=64k skip=80 count=32 iflag=direct status=none) \
        <(dd if="$BASE" bs=64k skip=80 count=32 status=none) || die "overlay copy differs"
    "$UC" del -n "$id"
    base_unchanged
}

case_direct_base() {
    # --base-io direct: base blocks the page cache lacks are read around it
    # (O_DIRECT, counted); blocks it holds (warmed by a cache request) are
    # read from there (in copy mode, by ublk's own copy); the data is the base's either way, and writes,
    # partial-block ones too, land in the overlay as ever.
    local lo dev id
    lo=$(losetup -f --show -r "$BASE")
    dev=$(add --base "$lo" --base-io direct --readahead off); id=$(dev_id "$dev")
    "$UC" list --json | grep -q '"base_io": "direct"' || die "list does not show --base-io direct"
    local want got c0 c1; want=$(head -c 32M "$BASE" | sha256sum)
    echo 3 > /proc/sys/vm/drop_caches
    c0=$(awk '/^Cached:/ {print $2}' /proc/meminfo)
    got=$(dd if="$dev" bs=64k count=512 iflag=direct status=none | sha256sum)
    c1=$(awk '/^Cached:/ {print $2}' /proc/meminfo)
    [ "$got" = "$want" ] || die "direct reads differ from the base"
    local direct; direct=$(stat_of "$id" read_base_direct_ops)
    say "  32 MiB in 64K reads: $direct base reads around the page cache, which grew $(((c1 - c0) / 1024)) MiB"
    [ $((c1 - c0)) -lt 8192 ] || die "reads around the page cache left $(((c1 - c0) / 1024)) MiB in it"
    [ "$direct" -ge 512 ] || die "only $direct of 512 base reads went around the page cache"
    "$UC" cache -n "$id" --offset 32M --length 32M --mode read >/dev/null
    # A second device over the same base, copy mode, added while the warmed
    # pages are cached and mapped by no one: adding it must not evict them
    # (its identity samples drop only pages they brought in). Its READs of
    # the warmed range are then named to ublk's copy in the base's page
    # cache (one copy).
    local cm cmid named
    cm=$(add --base "$lo" --zero-copy=off --readahead off); cmid=$(dev_id "$cm")
    cmp <(dd if="$dev" bs=64k skip=512 count=512 iflag=direct status=none) \
        <(dd if="$BASE" bs=64k skip=512 count=512 status=none) || die "cached reads differ"
    local after; after=$(stat_of "$id" read_base_direct_ops)
    [ "$after" = "$direct" ] || die "$((after - direct)) reads of warmed blocks went around the page cache"
    cmp <(dd if="$cm" bs=64k skip=512 count=512 iflag=direct status=none) \
        <(dd if="$BASE" bs=64k skip=512 count=512 status=none) || die "reads from the page cache's mapping differ"
    named=$(stat_of "$cmid" reads_from_mapping)
    say "  copy mode: $named of 512 warmed 64K reads copied by ublk from the base's page cache"
    [ "$named" -ge 480 ] || die "only $named of 512 warmed reads were copied from the base's page cache"
    "$UC" del -n "$cmid"
    fio --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 --offset=64M --size=16M \
        --rw=randwrite --bssplit=512/10:4k/50:64k/40 --verify=crc32c --verify_fatal=1 \
        --randseed=23 --name=direct >direct.log 2>&1 || { cat direct.log; die "fio verify"; }
    cmp <(dd if="$dev" bs=64k skip=1280 count=256 iflag=direct status=none) \
        <(dd if="$BASE" bs=64k skip=1280 count=256 status=none) || die "untouched blocks differ"
    # A recovered daemon keeps reading the base directly.
    kill_and_recover "$id"
    cmp <(dd if="$dev" bs=64k skip=1536 count=64 iflag=direct status=none) \
        <(dd if="$BASE" bs=64k skip=1536 count=64 status=none) || die "reads after recover differ"
    [ "$(stat_of "$id" read_base_direct_ops)" -ge 64 ] || die "recover lost --base-io direct"
    "$UC" del -n "$id"
    losetup -d "$lo"
    base_unchanged
}

case_cache_bad_input() {
    local dev id
    dev=$(add --base "$BASE"); id=$(dev_id "$dev")
    expect_fail "cache past the end" "$UC" cache -n "$id" --offset 1G
    expect_fail "cache range past the end" "$UC" cache -n "$id" --offset 100M --length 100M
    expect_fail "cache of an unknown device" "$UC" cache -n 99
    expect_fail "bad cache mode" "$UC" cache -n "$id" --mode fast
    expect_fail "stats of an unknown device" "$UC" stats -n 99
    expect_fail "bad --readahead" "$UC" add --base "$BASE" --readahead fast
    [ "$(stat_of "$id" blocks_allocated)" = 0 ] || die "a refused cache changed the overlay"
    "$UC" del -n "$id"
    base_unchanged
}

CASES+=("buffered reads arrive as readahead hints and prefetch|case_readahead_hints")
CASES+=("O_DIRECT readahead detector, auto and off|case_detector")
CASES+=("readahead detector: a backwards reader, two readers at once|case_detector_streams")
CASES+=("copy-on-cache racing fio verify writes|case_cow_on_cache_race")
CASES+=("cow-on-cache, then the base fails (dm error)|case_base_fails_after_cow_cache")
CASES+=("cow-on-read copies fully read blocks|case_cow_on_read")
CASES+=("--base-io direct: misses around the page cache, hits from it|case_direct_base")
CASES+=("cache and stats: bad input|case_cache_bad_input")
