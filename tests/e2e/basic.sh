# Basic cases: file system, fio verify, unaligned I/O, discard, persistence,
# several devices, bad input. Sourced by run.sh.
case_ext4() {
    local dev; dev=$(add --base "$BASE")
    [ -b "$dev" ] || die "$dev is not a block device"
    mkfs.ext4 -q -F "$dev"
    mkdir -p mnt; mount "$dev" mnt
    mkdir -p mnt/tree/a/b
    for i in $(seq 1 40); do head -c $((i * 7919)) /dev/urandom > "mnt/tree/a/f$i"; done
    head -c 20M /dev/urandom > mnt/tree/a/b/big
    cp -a mnt/tree ref-tree
    sync; umount mnt
    e2fsck -fn "$dev" >e2fsck.log 2>&1 || { cat e2fsck.log; die "e2fsck found errors"; }
    mount "$dev" mnt
    diff -r ref-tree mnt/tree || die "files differ after remount"
    umount mnt; rm -rf ref-tree
    "$UC" del -n "$(dev_id "$dev")"
    [ ! -e "$dev" ] || die "$dev still exists after del"
    base_unchanged
}

case_fio_verify() {
    # Two queues, two jobs: requests of both queues' threads meet in the
    # block locks and the map.
    local dev; dev=$(add --base "$BASE" --queues 2)
    local common=(--filename="$dev" --direct=1 --ioengine=io_uring --iodepth=32
        --numjobs=2 --size=64M --offset_increment=80M --rw=randwrite
        --bssplit=4k/50:64k/30:1m/20 --verify=crc32c --randseed=4242 --group_reporting)
    fio --name=write "${common[@]}" --do_verify=0 >fio-w.log || { cat fio-w.log; die "fio write failed"; }
    fio --name=write "${common[@]}" --verify_only --verify_fatal=1 >fio-v.log 2>&1 \
        || { cat fio-v.log; die "fio verify failed"; }
    grep -q "err= 0" fio-v.log || { cat fio-v.log; die "fio reported errors"; }
    "$UC" del -n "$(dev_id "$dev")"
    base_unchanged
}

case_unaligned_direct() {
    local dev; dev=$(add --base "$BASE")
    head -c 4096 /dev/urandom > pat
    # 512-byte direct writes at odd sectors inside 4 KiB blocks.
    for s in 1 3 9 15 4097 8191; do
        dd if=pat of="$dev" bs=512 count=1 skip=$((s % 8)) seek="$s" oflag=direct status=none
    done
    cp "$BASE" expect.img
    for s in 1 3 9 15 4097 8191; do
        dd if=pat of=expect.img bs=512 count=1 skip=$((s % 8)) seek="$s" conv=notrunc status=none
    done
    cmp <(dd if="$dev" bs=1M count=8 iflag=direct status=none) <(head -c 8M expect.img) \
        || die "unaligned writes read back wrong"
    rm -f expect.img
    "$UC" del -n "$(dev_id "$dev")"
    base_unchanged
}

case_discard() {
    local dev; dev=$(add --base "$BASE")
    dd if=/dev/urandom of="$dev" bs=1M count=4 seek=10 oflag=direct status=none
    blkdiscard -o $((10 << 20)) -l $((2 << 20)) "$dev"
    blkdiscard -z -o $((40 << 20)) -l $((3 << 20)) "$dev"
    # Unaligned zeroing: partial blocks are written with zeros.
    blkdiscard -z -o $((60 << 20 | 1024)) -l 8192 "$dev"
    for r in "10 2" "40 3"; do
        set -- $r
        cmp -n $(($2 << 20)) <(dd if="$dev" bs=1M skip="$1" count="$2" iflag=direct status=none) /dev/zero \
            || die "range at ${1}M does not read as zeros"
        cmp -s -n $(($2 << 20)) <(dd if="$BASE" bs=1M skip="$1" count="$2" status=none) /dev/zero \
            && die "the base has zeros at ${1}M (test is meaningless)"
    done
    cmp -n 8192 <(dd if="$dev" bs=1024 skip=$((60 << 10 | 1)) count=8 iflag=direct status=none) /dev/zero \
        || die "unaligned zeroed range is not zeros"
    cmp <(dd if="$dev" bs=1024 skip=$((60 << 10)) count=1 iflag=direct status=none) \
        <(dd if="$BASE" bs=1024 skip=$((60 << 10)) count=1 status=none) \
        || die "bytes before the unaligned zeroed range changed"
    "$UC" del -n "$(dev_id "$dev")"
    base_unchanged
}

case_persistent_overlay() {
    local dev ov=$WORK/keep.overlay
    rm -f "$ov"
    dev=$(add --base "$BASE" --overlay "$ov")
    head -c 3M /dev/urandom > data
    dd if=data of="$dev" bs=1M seek=20 oflag=direct status=none
    "$UC" del -n "$(dev_id "$dev")"
    dev=$(add --base "$BASE" --overlay "$ov")
    cmp <(dd if="$dev" bs=1M skip=20 count=3 iflag=direct status=none) data \
        || die "data written before del is not there after add"
    "$UC" list | grep "$ov" | grep -qw running \
        || die "the overlay was not marked clean by del: $("$UC" list)"
    "$UC" del -n "$(dev_id "$dev")"
    head -c 1M /dev/urandom > other.img
    local ov_sha; ov_sha=$(digest "$ov")
    expect_fail "overlay of another base" "$UC" add --base other.img --overlay "$ov"
    [ "$(digest "$ov")" = "$ov_sha" ] || die "the refused add changed the overlay"
    ls /sys/class/ublk-char/ 2>/dev/null | grep -q ublkc && die "a device was left behind"
    base_unchanged
}

case_two_devices() {
    local d1 d2
    d1=$(add --base "$BASE"); d2=$(add --base "$BASE")
    [ "$d1" != "$d2" ] || die "same device twice"
    head -c 1M /dev/urandom > one; head -c 1M /dev/urandom > two
    dd if=one of="$d1" bs=1M seek=5 oflag=direct status=none
    dd if=two of="$d2" bs=1M seek=5 oflag=direct status=none
    cmp <(dd if="$d1" bs=1M skip=5 count=1 iflag=direct status=none) one || die "device 1 wrong"
    cmp <(dd if="$d2" bs=1M skip=5 count=1 iflag=direct status=none) two || die "device 2 wrong"
    cmp <(dd if="$d1" bs=1M skip=6 count=4 iflag=direct status=none) \
        <(dd if="$BASE" bs=1M skip=6 count=4 status=none) || die "untouched range differs from base"
    "$UC" del --all
    [ ! -e "$d1" ] && [ ! -e "$d2" ] || die "devices left after del --all"
    base_unchanged
}

case_bad_input() {
    mkdir -p adir; head -c 1000 /dev/urandom > odd.img
    local before; before=$(ls /sys/class/ublk-char/ 2>/dev/null | wc -l)
    expect_fail "missing base" "$UC" add --base "$WORK/nope.img"
    expect_fail "base is a directory" "$UC" add --base adir
    expect_fail "odd size" "$UC" add --base odd.img
    expect_fail "block size 3000" "$UC" add --base "$BASE" --block-size 3000
    expect_fail "block size 2M" "$UC" add --base "$BASE" --block-size 2M
    expect_fail "del of a missing device" "$UC" del -n 77
    local dev; dev=$(add --base "$BASE" --id 5)
    [ "$dev" = /dev/ublkb5 ] || die "--id 5 gave $dev"
    expect_fail "add twice with --id 5" "$UC" add --base "$BASE" --id 5
    "$UC" del -n 5
    dev=$(add -b "$BASE" -n 6 -q 1 -d 16)
    [ "$dev" = /dev/ublkb6 ] || die "-n 6 gave $dev"
    "$UC" list -n 6 | grep -q '^6 .* running ' || die "list -n 6: $("$UC" list -n 6)"
    "$UC" del -n 6
    # A daemon that fails after the device is made but before it detaches
    # (its run directory cannot be made): one line, the device gone.
    expect_fail "a daemon that cannot make its run directory" \
        env UBLK_COW_RUN_DIR=/proc/ublk-cow-none "$UC" add --base "$BASE"
    local after; after=$(ls /sys/class/ublk-char/ 2>/dev/null | wc -l)
    [ "$before" = "$after" ] || die "devices left behind ($before before, $after after)"
    [ -z "$(ls "$UBLK_COW_RUN_DIR" 2>/dev/null)" ] || die "state files left: $(ls "$UBLK_COW_RUN_DIR")"
    base_unchanged
}

# FUA writes are durable when acknowledged: the overlay's file system sits on
# dm-log-writes; after FUA writes and no FLUSH, the log replayed with only
# what was durable then (up to the last FLUSH, FUA writes after) must hold
# them.
case_fua() {
    local pc=$WORK/fua small=$WORK/fua/base.img
    mkdir -p "$pc/mnt"
    head -c 32M /dev/urandom > "$small"
    truncate -s 96M "$pc/data.img"; truncate -s 256M "$pc/log.img"
    local ld ll; ld=$(losetup -f --show "$pc/data.img"); ll=$(losetup -f --show "$pc/log.img")
    cp "$pc/data.img" "$pc/work.img"
    dmsetup create ucfua --table "0 $(blockdev --getsz "$ld") log-writes $ld $ll"
    mkfs.ext4 -q -F /dev/mapper/ucfua
    mount /dev/mapper/ucfua "$pc/mnt"
    local dev id; dev=$(add --base "$small" --overlay "$pc/mnt/ov"); id=$(dev_id "$dev")
    # A FLUSH first: the overlay's creation is durable.
    blockdev --flushbufs "$dev"; sync "$dev"
    local before; before=$(stat_of "$id" flushes_map_only)
    local th0; th0=$(stat_of "$id" syncs_on_thread)
    head -c 16K /dev/urandom > "$pc/fua.bin"
    # O_DIRECT|O_DSYNC writes reach the device as FUA writes. Each is
    # written with RWF_DSYNC, and its flush writes the map page alone;
    # one at a time, each alone on its queue, so both on the queue's thread.
    dd if="$pc/fua.bin" of="$dev" bs=4k seek=10 oflag=direct,dsync status=none
    local after; after=$(stat_of "$id" flushes_map_only)
    local th1; th1=$(stat_of "$id" syncs_on_thread)
    dmsetup message ucfua 0 mark fua
    say "  4 FUA writes: flushes without a data sync $before -> $after, syncs on the queue's thread $th0 -> $th1"
    [ "$after" -ge $((before + 4)) ] || die "FUA writes were not made durable on their own"
    [ "$th1" -ge $((th0 + 8)) ] || die "FUA writes alone on their queue did not sync on its thread"
    "$UC" del -n "$id"
    umount "$pc/mnt"
    dmsetup remove ucfua; losetup -d "$ld" "$ll"
    local m; m=$(python3 "$ROOT/tests/e2e/logwrites.py" entries "$pc/log.img" | awk '$3 == "fua" { print $1 }')
    [ -n "$m" ] || die "the mark is not in the log"
    pc_point 0 "$m" durable
    cp "$small" "$pc/exp.img"
    dd if="$pc/fua.bin" of="$pc/exp.img" bs=4k seek=10 conv=notrunc status=none
    sector_hashes "$pc/exp.img" | cmp -s - "$pc/got" \
        || die "after a power cut at the mark, the acknowledged FUA writes are not all there"
    rm -rf "$pc"
    base_unchanged
}

case_tmpfs_files() {
    # Base and overlay in memory, in copy mode ($1 = copy): reads are
    # copied from mappings instead of going through io_uring, and a read of
    # one run is committed with the mapping's address; with user copy ($1 =
    # user) every run in a mapping is
    # copied from there into the request, all in one pwritev (see
    # ublk/exec/read.rs). The data must not differ.
    local t=$WORK/tmem dev id
    mkdir -p "$t"; mount -t tmpfs -o size=400M tmpfs "$t"
    cp "$BASE" "$t/base.img"
    local mode=(--zero-copy=off); [ "$1" = copy ] || mode+=(--user-copy)
    dev=$(add --base "$t/base.img" --overlay "$t/ov" "${mode[@]}"); id=$(dev_id "$dev")
    ! is_zero_copy "$id" || die "${mode[*]} gave a zero-copy device"
    if [ "$1" = copy ]; then
        ! is_user_copy "$id" || die "--zero-copy=off gave a user copy device"
    else
        is_user_copy "$id" || die "--user-copy did not give a user copy device"
    fi
    local job=(--filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 --size=48M
        --rw=randwrite --bssplit=4k/50:64k/50 --verify=crc32c --randseed=9 --name=tm)
    fio "${job[@]}" --do_verify=0 >tm-w.log 2>&1 || { cat tm-w.log; die "fio write"; }
    fio "${job[@]}" --verify_only --verify_fatal=1 >tm-v.log 2>&1 || { cat tm-v.log; die "verify"; }
    # Large reads of an area where every other block is written span runs
    # of base and overlay (each copied from its mapping into the buffer);
    # 4 KiB reads are one run each. On a machine with a CPU more than the
    # device's queues, the data of READs of 256 KiB and more is copied by
    # the queue's copy helper (ublk/copier.rs): into the buffer in copy
    # mode, into the request with user copy.
    fio --name=holes --filename="$dev" --direct=1 --ioengine=io_uring --rw=write:4k --bs=4k \
        --offset=48M --size=4M >tm-h.log 2>&1 || { cat tm-h.log; die "fio every other block"; }
    dd if="$dev" bs=4k skip=$((48 << 8)) count=1024 iflag=direct status=none > small
    [ "$(nproc)" -gt "$(dev_queues "$id")" ] || die "the copy helper needs a CPU more than the queues"
    local bs n helped0 helped
    for bs in 1M 256K 64K; do
        helped0=$(stat_of "$id" reads_copied_by_helper)
        cmp <(dd if="$dev" bs=$bs skip=48M count=4M iflag=direct,skip_bytes,count_bytes status=none) \
            small || die "$bs reads across base and overlay runs differ from 4K reads"
        helped=$(($(stat_of "$id" reads_copied_by_helper) - helped0))
        n=$(((4 << 20) / $(numfmt --from=iec $bs)))
        [ "$bs" != 64K ] || n=0
        say "  $bs reads of runs of base and overlay: $helped copied by the copy helper"
        [ "$helped" = "$n" ] || die "$helped of the $bs READs were copied by the copy helper, not $n"
    done
    rm -f small tm-h.log
    dd if=/dev/urandom of="$dev" bs=512 count=3 seek=$(((100 << 11) + 3)) oflag=direct status=none
    cp "$BASE" expect.img
    dd if="$dev" of=part bs=512 count=3 skip=$(((100 << 11) + 3)) iflag=direct status=none
    dd if=part of=expect.img bs=512 seek=$(((100 << 11) + 3)) conv=notrunc status=none
    cmp <(dd if="$dev" bs=1M skip=64 count=128 iflag=direct status=none) \
        <(dd if=expect.img bs=1M skip=64 count=128 status=none) || die "reads from tmpfs differ"
    local mapped; mapped=$(stat_of "$id" reads_from_mapping)
    say "  $mapped reads (or runs, with user copy) copied straight from a mapping"
    [ "$mapped" -gt 0 ] || die "no read was copied from a mapping"
    # Rewrites of written blocks: ublk (with user copy, the daemon) copies
    # the data straight into the overlay's mapped pages (see
    # ublk/write_data.rs); first writes go through the buffer.
    local placed0; placed0=$(stat_of "$id" writes_to_mapping)
    head -c 4M /dev/urandom > blob
    dd if=blob of="$dev" bs=64k seek=$((80 << 4)) oflag=direct status=none
    dd if=blob of="$dev" bs=64k seek=$((80 << 4)) oflag=direct status=none
    cmp <(dd if="$dev" bs=64k skip=$((80 << 4)) count=64 iflag=direct status=none) blob \
        || die "rewritten blocks read back differently"
    local placed; placed=$(stat_of "$id" writes_to_mapping)
    say "  $((placed - placed0)) of 128 writes copied straight into the overlay"
    [ $((placed - placed0)) = 64 ] || die "not just the 64 rewrites were copied into the overlay's mapping"
    rm -f expect.img part blob
    "$UC" del -n "$id"
    umount "$t"
    base_unchanged
}

# Fills the tmpfs at $1 but for $2 KiB (0: full).
fill_tmpfs_but() {
    [ "$2" = 0 ] || dd if=/dev/urandom of="$1/spare" bs=1k count="$2" status=none
    dd if=/dev/zero of="$1/filler" bs=1M status=none 2>/dev/null || true
    rm -f "$1/spare"
}

# Writes 64K of blob to $2 at 64K-unit offset $3; it must fail, not hang
# ($1 says what it is). Its error goes to full.err.
write_64k_fails() {
    local rc=0
    timeout 60 dd if=blob of="$2" bs=64k count=1 seek="$3" oflag=direct status=none 2>full.err || rc=$?
    [ "$rc" != 0 ] || die "$1 succeeded"
    [ "$rc" != 124 ] || die "$1 hung"
}

case_full_tmpfs() {
    # A write to a page of a tmpfs overlay that is missing (punched out
    # behind the daemon's back) while the tmpfs is full: in copy mode ublk
    # (with user copy the daemon's pread) cannot copy into it and the
    # daemon falls back to the buffer; with zero copy the overlay write
    # fails. Either way the write fails with an
    # error instead of hanging. With space again, it succeeds. $@: add's
    # --zero-copy and --user-copy.
    local t=$WORK/full dev id copy=true
    mkdir -p "$t"; mount -t tmpfs -o size=64M tmpfs "$t"
    dev=$(add --base "$BASE" --overlay "$t/ov" "$@"); id=$(dev_id "$dev")
    ! is_zero_copy "$id" || copy=false
    case " $* " in
        *" --user-copy "*) is_user_copy "$id" || die "$* did not give a user copy device" ;;
    esac
    head -c 1M /dev/urandom > blob
    dd if=blob of="$dev" bs=64k oflag=direct status=none
    local data=$(($(stat -c %s "$t/ov") - (BASE_MB << 20)))
    fallocate -p -o "$data" -l 1M "$t/ov"
    fill_tmpfs_but "$t" 0
    write_64k_fails "a write with no space for it" "$dev" 0
    say "  refused as expected: $(cat full.err)"
    ! $copy || [ "$(stat_of "$id" writes_mapping_refused)" -ge 1 ] || die "ublk's copy was not refused"
    rm "$t/filler"
    dd if=blob of="$dev" bs=64k oflag=direct status=none
    cmp <(dd if="$dev" bs=1M count=1 iflag=direct status=none) blob || die "the data differs"
    # With room for only two pages: a first write of 64K (through the
    # buffer) fails with ENOSPC and leaves its blocks reading from the base.
    # A rewrite of 64K whose pages were punched out gets only two pages
    # copied by ublk (or written, with zero copy), and must fail too:
    # committed short, a 7.3 kernel would complete the whole request and
    # lose the rest.
    fill_tmpfs_but "$t" 8
    write_64k_fails "a write with room for only part of it" "$dev" 32
    grep -q "No space left" full.err || die "a write with room for part of it failed otherwise: $(cat full.err)"
    cmp <(dd if="$dev" bs=64k count=1 skip=32 iflag=direct status=none) \
        <(dd if="$BASE" bs=64k count=1 skip=32 status=none) || die "a failed write changed the device"
    rm "$t/filler"
    fallocate -p -o "$data" -l 64k "$t/ov"
    fill_tmpfs_but "$t" 8
    local refused; refused=$(stat_of "$id" writes_mapping_refused)
    write_64k_fails "a rewrite copied only in part" "$dev" 0
    ! $copy || [ "$(stat_of "$id" writes_mapping_refused)" -gt "$refused" ] || die "the short copy was not counted"
    rm "$t/filler"
    dd if=blob of="$dev" bs=64k count=1 oflag=direct status=none
    cmp <(dd if="$dev" bs=64k count=1 iflag=direct status=none) <(head -c 64k blob) || die "the rewrite differs"
    say "  with room for part of a write: a first write ENOSPC, a rewrite$(cut -d: -f3- full.err)"
    "$UC" del -n "$id"
    rm -f blob full.err
    umount "$t"
    base_unchanged
}

case_zero_copy() {
    # Zero copy (UBLK_F_AUTO_BUF_REG) is the default exactly where the
    # kernel offers it; there the suite runs in it, and copy mode still
    # works. Elsewhere --zero-copy=on is refused with one line, and copy
    # mode is the default (user copy only when asked for).
    local dev id
    dev=$(add --base "$BASE"); id=$(dev_id "$dev")
    if kernel_has_zero_copy; then
        is_zero_copy "$id" || die "kernel $(uname -r) offers zero copy, the device does not use it"
        "$UC" del -n "$id"
        say "  kernel $(uname -r): zero copy by default"
        dev=$(add --base "$BASE" --zero-copy=off); id=$(dev_id "$dev")
        ! is_zero_copy "$id" || die "--zero-copy=off gave a zero-copy device"
        fio --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 --size=32M \
            --rw=randwrite --bssplit=4k/40:64k/40:1m/20 --verify=crc32c --verify_fatal=1 \
            --randseed=17 --name=copymode >zc-off.log 2>&1 || { cat zc-off.log; die "copy mode verify"; }
        say "  --zero-copy=off: copy mode, fio verify clean"
        "$UC" del -n "$id"
        # Base and overlay in tmpfs: 4K reads go from the mappings into the
        # request through the tag's pipe, 4K writes by ublk's user copy (a
        # first write into the tag's staging buffer, a rewrite straight into
        # the overlay's pages; the rest go through the ring); data written
        # twice (the second time over allocated blocks) must verify, and
        # untouched blocks read as the base, whole or from 512 bytes into a
        # page.
        local t=$WORK/zc
        mkdir -p "$t"; mount -t tmpfs -o size=300M tmpfs "$t"
        cp "$BASE" "$t/base.img"
        dev=$(add --base "$t/base.img" --overlay "$t/ov" --queues 2); id=$(dev_id "$dev")
        local job=(--filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 --size=16M
            --numjobs=2 --offset_increment=20M --rw=randwrite --bs=4k --verify=crc32c --name=zcuc)
        for seed in 3 4; do
            fio "${job[@]}" --randseed=$seed --do_verify=0 >zc-w.log 2>&1 || { cat zc-w.log; die "fio write"; }
        done
        fio "${job[@]}" --randseed=4 --verify_only --verify_fatal=1 >zc-v.log 2>&1 \
            || { cat zc-v.log; die "user copy verify"; }
        cmp <(dd if="$dev" bs=4k skip=16384 count=256 iflag=direct status=none) \
            <(dd if="$BASE" bs=4k skip=16384 count=256 status=none) || die "untouched 4K reads differ"
        # Large reads of an area where every other block is written span
        # runs of base and overlay: the tag's pipe holds them all, and one
        # read takes them into the request. 4 KiB reads are one run each.
        # spliced_reads OFF REF WHAT: 4 MiB of the device from OFF, in 1M,
        # 256K and 64K READs, equal file REF, and each READ went through
        # the pipe whole.
        spliced_reads() {
            local bs n spliced0 spliced
            for bs in 1M 256K 64K; do
                spliced0=$(stat_of "$id" reads_spliced)
                n=$(((4 << 20) / $(numfmt --from=iec $bs)))
                cmp <(dd if="$dev" bs=$bs skip=$1 count=$n iflag=direct,skip_bytes status=none) "$2" \
                    || die "$bs reads of $3 differ from $2"
                spliced=$(($(stat_of "$id" reads_spliced) - spliced0))
                say "  $n reads of $bs of $3: as $2, $spliced through the pipe whole"
                [ "$spliced" -ge "$n" ] || die "not every $bs read of $3 went through the pipe"
            done
        }
        fio --name=holes --filename="$dev" --direct=1 --ioengine=io_uring --rw=write:4k --bs=4k \
            --offset=16M --size=4M >zc-h.log 2>&1 || { cat zc-h.log; die "fio every other block"; }
        dd if="$dev" bs=4k skip=4096 count=1024 iflag=direct status=none > small
        spliced_reads 16M small "blocks every other one written (runs of base and overlay)"
        # Large reads of untouched blocks are one run of the base each: the
        # pipe takes them whole too (a fixed-buffer read of a tmpfs file
        # would wait for an io_uring worker).
        dd if="$BASE" bs=1M skip=64 count=4 status=none > untouched
        spliced_reads 64M untouched "untouched blocks (one run of the base)"
        rm -f untouched
        rm -f small zc-h.log
        cmp <(dd if="$dev" bs=512 skip=$(((16384 << 3) + 1)) count=8 iflag=direct status=none) \
            <(dd if="$BASE" bs=512 skip=$(((16384 << 3) + 1)) count=8 status=none) \
            || die "an untouched 4K read across two pages differs"
        local reads spliced writes staged; reads=$(stat_of "$id" reads_from_mapping)
        spliced=$(stat_of "$id" reads_spliced); writes=$(stat_of "$id" writes_to_mapping)
        staged=$(stat_of "$id" writes_staged)
        say "  tmpfs base and overlay: $reads reads from the mapping ($spliced through a pipe), $writes writes by user copy into the overlay, $staged through the staging buffer"
        [ "$spliced" -gt 0 ] || die "no 4K read went through the tag's pipe"
        [ "$writes" -gt 0 ] || die "no 4K rewrite was user-copied"
        [ "$staged" -gt 0 ] || die "no 4K first write went through the staging buffer"
        "$UC" del -n "$id"
        umount "$t"
    else
        ! is_zero_copy "$id" || die "kernel $(uname -r) has no zero copy, yet the device claims it"
        ! is_user_copy "$id" || die "kernel $(uname -r): user copy without --user-copy"
        "$UC" del -n "$id"
        say "  kernel $(uname -r): copy mode by default"
        local before; before=$(ublk_devices)
        expect_fail "--zero-copy=on without kernel support" "$UC" add --base "$BASE" --zero-copy=on
        [ "$(ublk_devices)" = "$before" ] || die "the failed add left a device behind"
        dev=$(add --base "$BASE" --zero-copy=off); id=$(dev_id "$dev")
        "$UC" del -n "$id"
    fi
    rm -f zc-off.log zc-w.log zc-v.log
    base_unchanged
}

case_preallocate() {
    # --preallocate allocates the overlay's data area before serving; where
    # it does not fit, add fails with one line and leaves nothing behind.
    local t=$WORK/pre dev id
    mkdir -p "$t"; mount -t tmpfs -o size=300M tmpfs "$t"
    dev=$(add --base "$BASE" --overlay "$t/ov" --preallocate); id=$(dev_id "$dev")
    local kib; kib=$(du -k "$t/ov" | cut -f1)
    say "  a ${BASE_MB} MiB device: the overlay holds $kib KiB before any write"
    [ "$kib" -ge $((BASE_MB << 10)) ] || die "the overlay was not preallocated ($kib KiB)"
    local job=(--filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 --size=32M
        --rw=randwrite --bssplit=4k/50:64k/50 --verify=crc32c --randseed=11 --name=pre)
    fio "${job[@]}" --do_verify=0 >pre-w.log 2>&1 || { cat pre-w.log; die "fio write"; }
    fio "${job[@]}" --verify_only --verify_fatal=1 >pre-v.log 2>&1 || { cat pre-v.log; die "verify"; }
    # Its pages are ready in memory: in copy mode first writes too are
    # copied by ublk straight into them (zero copy writes every WRITE from
    # the request's pages).
    if ! is_zero_copy "$id"; then
        local placed; placed=$(stat_of "$id" writes_to_mapping)
        say "  $placed of $(stat_of "$id" write_ops) writes copied straight into the overlay"
        [ "$placed" = "$(stat_of "$id" write_ops)" ] || die "some writes were not copied into the overlay's mapping"
    fi
    cmp <(dd if="$dev" bs=1M skip=64 count=64 iflag=direct status=none) \
        <(dd if="$BASE" bs=1M skip=64 count=64 status=none) || die "unwritten blocks differ from the base"
    "$UC" del -n "$id"
    umount "$t"
    mount -t tmpfs -o size=64M tmpfs "$t"
    local before; before=$(ublk_devices)
    expect_fail "--preallocate on a file system too small" \
        "$UC" add --base "$BASE" --overlay "$t/ov" --preallocate
    [ ! -e "$t/ov" ] || die "the failed add left its overlay behind"
    [ "$(ublk_devices)" = "$before" ] || die "the failed add left a device behind"
    # An existing overlay that fits sparse but not preallocated: refused,
    # and still clean afterwards.
    dev=$(add --base "$BASE" --overlay "$t/ov"); id=$(dev_id "$dev")
    dd if=/dev/urandom of="$dev" bs=1M count=2 seek=5 oflag=direct status=none
    "$UC" del -n "$id"
    expect_fail "--preallocate of an existing overlay that does not fit" \
        "$UC" add --base "$BASE" --overlay "$t/ov" --preallocate
    dev=$(add --base "$BASE" --overlay "$t/ov"); id=$(dev_id "$dev")
    "$UC" list | grep -q "^$id .* running " || { "$UC" list; die "the refused add left the overlay unclean"; }
    "$UC" del -n "$id"
    umount "$t"
    base_unchanged
}

CASES+=("FUA writes are durable when acknowledged (dm-log-writes)|case_fua")
CASES+=("--preallocate: space allocated up front, none when it does not fit|case_preallocate")
CASES+=("base and overlay in tmpfs (copy mode: mapped reads and writes)|case_tmpfs_files copy")
CASES+=("zero copy: the default where the kernel offers it|case_zero_copy")
CASES+=("a write into a full tmpfs overlay fails, does not hang (copy mode)|case_full_tmpfs --zero-copy=off")
# With zero copy where the kernel has it (case_zero_copy checks the rest).
if kernel_has_zero_copy; then
    CASES+=("a write into a full tmpfs overlay fails, does not hang (zero copy)|case_full_tmpfs --zero-copy=on")
fi
# With user copy (--user-copy, without zero copy): on every kernel.
CASES+=("base and overlay in tmpfs (user copy: reads gathered from mappings)|case_tmpfs_files user")
CASES+=("a write into a full tmpfs overlay fails, does not hang (user copy)|case_full_tmpfs --zero-copy=off --user-copy")
CASES+=("ext4: mkfs, files, e2fsck, remount|case_ext4")
CASES+=("fio crc32c verify, mixed sizes, QD32 x2, two queues|case_fio_verify")
CASES+=("unaligned 512-byte direct writes|case_unaligned_direct")
CASES+=("discard and write-zeroes read as zeros|case_discard")
CASES+=("persistent overlay across del/add|case_persistent_overlay")
CASES+=("two devices from one base|case_two_devices")
CASES+=("bad input refused, nothing left behind|case_bad_input")
