# Power cut: the overlay's file system sits on dm-log-writes, which records
# every write in the order it became durable and every FLUSH. The device is
# written in steps, each ending with a FLUSH (fsync of the device) and a
# mark. Then the log is replayed to every flush point: the file system is
# mounted as a power cut there would have left it, the overlay is added
# again, and every 4 KiB block must read as after the last completed step or
# as after the step in progress; at a step's mark, exactly as after it.
# Sourced by run.sh.

PC_STEPS=${REPLAY_STEPS:-24}

block_hashes() { python3 - "$1" <<'PY'
import hashlib, sys
with open(sys.argv[1], "rb", buffering=0) as f:
    while True:
        b = f.read(4096)
        if not b:
            break
        print(hashlib.sha1(b).hexdigest()[:16])
PY
}

case_power_cut_replay() {
    local pc=$WORK/pc small=$WORK/pc/base.img
    mkdir -p "$pc/mnt"
    head -c 32M /dev/urandom > "$small"
    truncate -s 96M "$pc/data.img"; truncate -s 1G "$pc/log.img"
    cp "$pc/data.img" "$pc/data0.img"
    local ld ll; ld=$(losetup -f --show "$pc/data.img"); ll=$(losetup -f --show "$pc/log.img")
    dmsetup create ucpc --table "0 $(blockdev --getsz "$ld") log-writes $ld $ll"
    mkfs.ext4 -q -F /dev/mapper/ucpc
    mount /dev/mapper/ucpc "$pc/mnt"
    local dev; dev=$(add --base "$small" --overlay "$pc/mnt/ov")
    block_hashes "$dev" > "$pc/h0"
    dmsetup message ucpc 0 mark step0
    for s in $(seq 1 "$PC_STEPS"); do
        local sec=$((RANDOM % 60000)) n=$((RANDOM % 2048 + 1))
        if [ $((s % 5)) = 0 ]; then
            blkdiscard -z -o $((sec * 512)) -l $((n * 512)) "$dev"
            blockdev --flushbufs "$dev"; sync "$dev"
        else
            dd if=/dev/urandom of="$dev" bs=512 seek="$sec" count="$n" oflag=direct conv=fsync status=none
        fi
        block_hashes "$dev" > "$pc/h$s"
        dmsetup message ucpc 0 mark "step$s"
    done
    "$UC" del -n "$(dev_id "$dev")"
    umount "$pc/mnt"
    dmsetup remove ucpc; losetup -d "$ld" "$ll"

    # Replay to every FLUSH after the first mark, and to every mark.
    python3 "$ROOT/tests/e2e/logwrites.py" entries "$pc/log.img" > "$pc/entries"
    cp "$pc/data0.img" "$pc/work.img"
    local done_to=0 step=-1 points=0 exact=0 i flags mark
    while read -r i flags mark; do
        case $mark in step*) step=${mark#step} ;; esac
        [ "$step" -ge 0 ] || continue
        if [ $((flags & 1)) = 0 ] && [ "$mark" = - ]; then continue; fi
        [ "$step" -lt "$PC_STEPS" ] || [ "$mark" != - ] || continue
        python3 "$ROOT/tests/e2e/logwrites.py" replay "$pc/log.img" "$pc/work.img" "$done_to" $((i + 1))
        done_to=$((i + 1))
        cp "$pc/work.img" "$pc/snap.img"
        local sl; sl=$(losetup -f --show "$pc/snap.img")
        mount "$sl" "$pc/mnt" || { losetup -d "$sl"; die "entry $i: the file system does not mount"; }
        local d; d=$("$UC" add --base "$small" --overlay "$pc/mnt/ov") \
            || { umount "$pc/mnt"; losetup -d "$sl"; die "entry $i: the overlay is refused"; }
        block_hashes "$d" > "$pc/got"
        "$UC" del -n "$(dev_id "$d")"
        umount "$pc/mnt"; losetup -d "$sl"
        points=$((points + 1))
        if [ "$mark" != - ]; then
            cmp -s "$pc/got" "$pc/h$step" || die "at mark $mark the device is not as written before it"
            exact=$((exact + 1))
        else
            paste "$pc/got" "$pc/h$step" "$pc/h$((step + 1))" \
                | awk '$1 != $2 && $1 != $3 { bad++ } END { exit bad > 0 }' \
                || die "entry $i (flush in step $((step + 1))): a block is neither old nor new"
        fi
    done < "$pc/entries"
    say "  replayed $points power-cut points ($exact step marks exact, the rest old-or-new)"
    [ "$points" -ge 50 ] || die "only $points replay points (want at least 50)"
    rm -rf "$pc"
    base_unchanged
}

CASES+=("power cut replayed at every flush (dm-log-writes)|case_power_cut_replay")
