# Power cut: the overlay's file system sits on dm-log-writes, which records
# every write in the order it completed, every FLUSH and FUA. A small device
# is written in steps (scattered 512-byte writes made durable by fsync, FUA
# writes, zeroing, 256 KiB writes into blocks never written, which the
# overlay takes with O_DIRECT), no sector written twice in a step, each step
# followed by a mark. The reference is independent of the device: a copy of the base
# with the same writes applied, kept after each step. Then the log is
# replayed (logwrites.py powercut, which says which points and what each
# must hold): at every mark with only the durable writes, at every FLUSH,
# and at points between two FLUSHes that leave out a random subset of the
# writes since the first (what a volatile cache does); at each, the file
# system is mounted as a power cut would have left it, the overlay added
# again and its device read whole. At a mark it must read exactly as after
# the step, elsewhere each 512-byte sector as after the last completed step
# or as after the step in progress. The steps of FUA writes alone prove
# that an acknowledged FUA write is durable.
# Sourced by run.sh.

PC_STEPS=${REPLAY_STEPS:-10}
# Points between two FLUSHes, each a different random subset left out.
PC_SUBSETS=${REPLAY_SUBSETS:-56}

case_power_cut_replay() {
    local pc=$WORK/pc small=$WORK/pc/base.img secs=8192 t0=$SECONDS
    # The scattered steps keep to the first `room` sectors; the 256 KiB
    # writes each have 512 sectors of their own after them.
    local room=$((8192 - 1024))
    mkdir -p "$pc/mnt"
    head -c $((secs * 512)) /dev/urandom > "$small"
    cp "$small" "$pc/exp.img"; cp "$small" "$pc/exp0.img"
    truncate -s 16M "$pc/fs.img"; truncate -s 256M "$pc/log.img"
    local ld ll; ld=$(losetup -f --show "$pc/fs.img"); ll=$(losetup -f --show "$pc/log.img")
    dmsetup create ucpc --table "0 $(blockdev --getsz "$ld") log-writes $ld $ll"
    mkfs.ext4 -q -F -b 4096 /dev/mapper/ucpc
    mount /dev/mapper/ucpc "$pc/mnt"
    local dev; dev=$(add --base "$small" --overlay "$pc/mnt/ov")
    dmsetup message ucpc 0 mark step0
    local s r fua_steps=0
    for s in $(seq 1 "$PC_STEPS"); do
        if [ $((s % 4)) = 0 ]; then
            local sec=$((RANDOM % (room - 512))) n=$((RANDOM % 512 + 1))
            blkdiscard -z -o $((sec * 512)) -l $((n * 512)) "$dev"
            blockdev --flushbufs "$dev"; sync "$dev"
            dd if=/dev/zero of="$pc/exp.img" bs=512 seek="$sec" count="$n" conv=notrunc status=none
        elif [ $((s % 4)) = 2 ]; then
            # O_DIRECT|O_DSYNC: each write a FUA write, and no FLUSH after.
            local blk=$((RANDOM % (room / 8 - 4))) n=$((RANDOM % 4 + 1))
            head -c $((n * 4096)) /dev/urandom > "$pc/w"
            dd if="$pc/w" of="$dev" bs=4k seek="$blk" oflag=direct,dsync status=none
            dd if="$pc/w" of="$pc/exp.img" bs=4k seek="$blk" conv=notrunc status=none
            fua_steps=$((fua_steps + 1))
        elif [ $((s % 4)) = 3 ]; then
            # One WRITE of 256 KiB, whole pages into blocks never written,
            # then an fsync.
            local at=$(((room + (s / 4 % 2) * 512) * 512))
            head -c 262144 /dev/urandom > "$pc/w"
            dd if="$pc/w" of="$dev" bs=256k seek="$at" oflag=direct,seek_bytes conv=fsync status=none
            dd if="$pc/w" of="$pc/exp.img" bs=256k seek="$at" oflag=seek_bytes conv=notrunc status=none
        else
            # Three writes, one in each third of the device, then one fsync.
            for r in 0 1 2; do
                local n=$((RANDOM % 48 + 1)) sec
                sec=$((r * room / 3 + RANDOM % (room / 3 - 48)))
                head -c $((n * 512)) /dev/urandom > "$pc/w"
                local sync=; [ "$r" = 2 ] && sync=conv=fsync
                dd if="$pc/w" of="$dev" bs=512 seek="$sec" oflag=direct $sync status=none
                dd if="$pc/w" of="$pc/exp.img" bs=512 seek="$sec" conv=notrunc status=none
            done
        fi
        cp "$pc/exp.img" "$pc/exp$s.img"
        cmp -s "$dev" "$pc/exp.img" || die "step $s: the device does not read as written"
        dmsetup message ucpc 0 mark "step$s"
    done
    local direct; direct=$(stat_of "$(dev_id "$dev")" writes_direct)
    [ "$direct" -ge 1 ] || die "no 256 KiB write into fresh blocks took the direct path (writes_direct $direct)"
    "$UC" del -n "$(dev_id "$dev")"
    umount "$pc/mnt"
    dmsetup remove ucpc; losetup -d "$ld" "$ll"
    local t1=$SECONDS seed=$RANDOM out
    out=$(python3 "$ROOT/tests/e2e/logwrites.py" powercut "$pc/log.img" "$pc/fs.img" "$pc" "$small" "$UC" \
        "$pc" "$PC_SUBSETS" "$seed") || die "$(tail -n 1 <<<"$out") (subset seed $seed)"
    local flushes subsets marks
    read -r flushes subsets marks <<<"$(tail -n 1 <<<"$out")"
    say "  replayed $flushes flushes, $subsets points between flushes (subset seed $seed), $marks marks exact with durable writes only ($fua_steps steps of FUA writes, $direct direct writes); writing $((t1 - t0)) s, replay $((SECONDS - t1)) s"
    [ "$subsets" -ge 50 ] || die "only $subsets points between flushes (want at least 50)"
    [ "$marks" = $((PC_STEPS + 1)) ] || die "$marks marks replayed, not $((PC_STEPS + 1))"
    rm -rf "$pc"
    base_unchanged
}

CASES+=("power cut replayed at every flush and between (dm-log-writes)|case_power_cut_replay")
