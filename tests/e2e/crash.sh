# Crash cases: the daemon killed with SIGKILL mid-I/O and recovered, a full
# overlay file system. Sourced by run.sh.

# kill -9 the daemon of device $1 and start a new one with `recover`.
kill_and_recover() {
    local id=$1 pid; pid=$(daemon_pid "$id")
    kill -9 "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    "$UC" recover -n "$id" >/dev/null
    [ "$(daemon_pid "$id")" != "$pid" ] || die "recover did not start a new daemon"
}

CYCLES=${CRASH_CYCLES:-20}

case_kill9_fio() {
    local dev id ov=$WORK/crash.overlay
    rm -f "$ov"
    dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
    for c in $(seq 0 $((CYCLES - 1))); do
        local region=(--filename="$dev" --direct=1 --ioengine=io_uring --iodepth=32
            --offset=$((c * 8))M --size=8M --rw=randwrite --bssplit=4k/60:64k/30:256k/10
            --verify=crc32c --randseed=$((1000 + c)) --name=c$c)
        # At 4 MiB/s the writes last two seconds: the kill lands among them.
        fio "${region[@]}" --do_verify=0 --rate=4m > "fio-$c.log" 2>&1 &
        local fpid=$!
        sleep "0.$((RANDOM % 9 + 1))"
        kill -0 "$fpid" 2>/dev/null || die "cycle $c: fio had finished before the daemon was killed"
        kill_and_recover "$id"
        wait "$fpid" || { cat "fio-$c.log"; die "cycle $c: fio saw an error across the crash"; }
        fio "${region[@]}" --verify_only --verify_fatal=1 > "fio-v$c.log" 2>&1 \
            || { cat "fio-v$c.log"; die "cycle $c: verify failed after recover"; }
        "$UC" list | grep "$ov" | grep -qw unclean \
            || die "cycle $c: list does not report the overlay a killed daemon left unclean"
        # Closed and opened again, the overlay holds the same data.
        "$UC" del -n "$id"
        dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
        region[0]=--filename=$dev
        fio "${region[@]}" --verify_only --verify_fatal=1 > "fio-r$c.log" 2>&1 \
            || { cat "fio-r$c.log"; die "cycle $c: verify failed after del and add"; }
    done
    say "  $CYCLES kill -9 / recover cycles, each verified after recover and after del and add"
    # Everything written in every cycle is still there: one fio, a job per
    # region.
    local all=(--filename="$dev" --direct=1 --ioengine=io_uring --iodepth=32 --size=8M
        --rw=randwrite --bssplit=4k/60:64k/30:256k/10 --verify=crc32c --verify_only --verify_fatal=1)
    for c in $(seq 0 $((CYCLES - 1))); do
        all+=(--name=c$c --offset=$((c * 8))M --randseed=$((1000 + c)))
    done
    fio "${all[@]}" > fio-all.log 2>&1 || { cat fio-all.log; die "a region lost data"; }
    "$UC" del -n "$id"
    base_unchanged
}

# Writes files f1, f2, ... into directory $1, the content of each a slice
# of ext4-src, until the file $2 appears (at most 600); then syncs and
# prints how many it wrote. Paced, so that kills land among the writes.
ext4_writer() {
    python3 - "$1" "$2" <<'PY'
import os, sys, time
d, stop = sys.argv[1], sys.argv[2]
src = open("ext4-src", "rb").read()
n = 0
while n < 600 and not os.path.exists(stop):
    n += 1
    with open(os.path.join(d, f"f{n}"), "wb") as f:
        f.write(src[n * 97:n * 97 + n * 1531])
    time.sleep(0.02)
os.sync()
print(n)
PY
}

# Files 1..$2 in directory $1 must hold what ext4_writer wrote; prints the
# names of those that do not.
ext4_check() {
    python3 - "$1" "$2" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
src = open("ext4-src", "rb").read()
for i in range(1, n + 1):
    with open(os.path.join(d, f"f{i}"), "rb") as f:
        if f.read() != src[i * 97:i * 97 + i * 1531]:
            print(f"f{i}")
PY
}

case_kill9_ext4() {
    local dev id ov=$WORK/crash-ext4.overlay
    rm -f "$ov" stop ext4-count
    head -c 1M /dev/urandom > ext4-src
    dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
    mkfs.ext4 -q -F "$dev"
    mkdir -p mnt; mount "$dev" mnt
    ext4_writer mnt stop > ext4-count &
    local wpid=$! k
    for k in $(seq 600); do [ -e mnt/f1 ] && break; sleep 0.05; done
    [ -e mnt/f1 ] || die "the writer did not start"
    for k in 1 2 3; do
        sleep 0.7
        kill -0 "$wpid" 2>/dev/null || die "kill $k: the files were all written before the daemon was killed"
        kill_and_recover "$id"
    done
    touch stop
    wait "$wpid" || die "writing files failed across daemon crashes"
    local n; n=$(cat ext4-count)
    [ "$n" -lt 600 ] || die "the writer ended before the kills were done"
    sync; umount mnt
    e2fsck -fn "$dev" > e2fsck.log 2>&1 || { cat e2fsck.log; die "e2fsck after recover"; }
    # Closed and opened again: the file system is clean and every file
    # holds what was written.
    "$UC" del -n "$id"
    dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
    e2fsck -fn "$dev" > e2fsck.log 2>&1 || { cat e2fsck.log; die "e2fsck after del and add"; }
    mount "$dev" mnt
    local bad; bad=$(ext4_check mnt "$n")
    umount mnt
    [ -z "$bad" ] || die "$(echo "$bad" | wc -l) of $n files do not hold what was written: $(echo $bad | head -c 200)"
    say "  $n files written across 3 kills; e2fsck clean, every file as written"
    "$UC" del -n "$id"
    base_unchanged
}

case_full_disk() {
    local dev id small=$WORK/small
    mkdir -p "$small"; mount -t tmpfs -o size=24M tmpfs "$small"
    dev=$(add --base "$BASE" --overlay "$small/ov"); id=$(dev_id "$dev")
    head -c 4M /dev/urandom > first
    dd if=first of="$dev" bs=1M seek=100 oflag=direct status=none
    # 40 MiB of writes into a 24 MiB file system must fail, not hang.
    if dd if=/dev/urandom of="$dev" bs=1M count=40 oflag=direct status=none 2>dd.err; then
        die "writing past a full overlay succeeded"
    fi
    grep -qiE "no space|input/output" dd.err || { cat dd.err; die "unexpected error: $(cat dd.err)"; }
    kill -0 "$(daemon_pid "$id")" || die "the daemon died on a full disk"
    cmp <(dd if="$dev" bs=1M skip=100 count=4 iflag=direct status=none) first \
        || die "data written before the disk filled is damaged"
    cmp <(dd if="$dev" bs=1M skip=150 count=4 iflag=direct status=none) \
        <(dd if="$BASE" bs=1M skip=150 count=4 status=none) || die "reads fail on a full disk"
    # Free space (discard punches holes in the overlay), then write again.
    blkdiscard -o 0 -l $((40 << 20)) "$dev"
    head -c 2M /dev/urandom > again
    dd if=again of="$dev" bs=1M seek=60 oflag=direct status=none || die "writes fail after space was freed"
    cmp <(dd if="$dev" bs=1M skip=60 count=2 iflag=direct status=none) again || die "new write reads back wrong"
    cmp <(dd if="$dev" bs=1M skip=100 count=4 iflag=direct status=none) first || die "old data damaged"
    "$UC" del -n "$id"
    umount "$small"
    base_unchanged
}

case_recover_bad_input() {
    local dev id
    expect_fail "recover of an unknown device" "$UC" recover -n 99
    dev=$(add --base "$BASE"); id=$(dev_id "$dev")
    expect_fail "recover of a live device" "$UC" recover -n "$id"
    "$UC" del -n "$id"
    base_unchanged
}

# kill -9 the daemon of device $1 and wait until it is gone; the device
# then waits for `recover`.
kill_daemon() {
    local pid; pid=$(daemon_pid "$1")
    kill -9 "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}

# One overlay, one device: a second `add` of it is refused, naming the
# device, while the device runs and while it waits for `recover`.
case_overlay_one_device() {
    local dev id ov=$WORK/lock.overlay err
    rm -f "$ov"
    dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
    head -c 1M /dev/urandom > lock1
    dd if=lock1 of="$dev" bs=1M seek=3 oflag=direct conv=fsync status=none
    local n; n=$(ublk_devices)
    expect_fail "a second add of an overlay in use" add --base "$BASE" --overlay "$ov"
    err=$(add --base "$BASE" --overlay "$ov" 2>&1 >/dev/null) || true
    [[ $err == *"device $id"* ]] || die "the refusal does not name device $id: $err"
    kill_daemon "$id"
    expect_fail "add of an overlay whose device waits for recover" \
        add --base "$BASE" --overlay "$ov"
    err=$(add --base "$BASE" --overlay "$ov" 2>&1 >/dev/null) || true
    [[ $err == *"recover -n $id"* ]] || die "the refusal does not point to recover: $err"
    [ "$(ublk_devices)" = "$n" ] || die "a refused add left a device"
    "$UC" recover -n "$id" >/dev/null
    cmp <(dd if="$dev" bs=1M skip=3 count=1 iflag=direct status=none) lock1 \
        || die "the device's data changed"
    "$UC" del -n "$id"
    base_unchanged
}

# `del` of a device whose daemon died writes the live map into the overlay:
# writes that were never flushed but reached the overlay file are kept.
case_del_dead_daemon_keeps_writes() {
    local dev id ov=$WORK/deldead.overlay
    rm -f "$ov"
    dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
    head -c 2M /dev/urandom > unflushed
    # O_DIRECT without fsync: no FLUSH reaches the device.
    dd if=unflushed of="$dev" bs=1M seek=20 oflag=direct status=none
    kill_daemon "$id"
    "$UC" del -n "$id"
    [ ! -e "$UBLK_COW_RUN_DIR/$id.map" ] || die "del left the live map"
    dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
    cmp <(dd if="$dev" bs=1M skip=20 count=2 iflag=direct status=none) unflushed \
        || die "writes of the dead daemon were lost by del"
    "$UC" list | grep "$ov" | grep -qw running \
        || die "the overlay was not closed clean by del"
    "$UC" del -n "$id"
    base_unchanged
}

# A run directory that outlived a restart of the machine: a state file and
# live map of an earlier boot name a daemon, a ublk device and writes that
# are gone, and a live snapshot under way into a new overlay. `recover`
# refuses it and changes nothing; `del` removes it without writing its live
# map into the overlay or removing the new overlay (it may hold flushed
# writes). Made here from a live device's files, under an id no device has,
# with the boot id changed.
case_state_from_an_earlier_boot() {
    local dev id ov=$WORK/boot.overlay new=$WORK/boot.new st=77 sum newsum
    rm -f "$ov"
    dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
    head -c 1M /dev/urandom > boot1
    dd if=boot1 of="$dev" bs=1M seek=20 oflag=direct conv=fsync status=none
    cp "$UBLK_COW_RUN_DIR/$id.map" "$UBLK_COW_RUN_DIR/$st.map"
    head -c 64K /dev/urandom > "$new"; newsum=$(digest "$new")
    python3 - "$UBLK_COW_RUN_DIR/$id.json" "$UBLK_COW_RUN_DIR/$st.json" "$st" "$new" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
s.update(id=int(sys.argv[3]), pid=999999, device="/dev/ublkb" + sys.argv[3], boot_id="an-earlier-boot",
         snapshot_to=sys.argv[4])
json.dump(s, open(sys.argv[2], "w"))
PY
    chmod 600 "$UBLK_COW_RUN_DIR/$st.json" "$UBLK_COW_RUN_DIR/$st.map"
    # Written after the stale map was taken: it names none of this.
    head -c 1M /dev/urandom > boot2
    dd if=boot2 of="$dev" bs=1M seek=40 oflag=direct conv=fsync status=none
    "$UC" del -n "$id"
    "$UC" list -n "$st" | grep -qw dead || die "list does not show the old device dead"
    sum=$(digest "$ov")
    expect_fail "recover of a device from an earlier boot" "$UC" recover -n "$st"
    [ "$(digest "$ov")" = "$sum" ] || die "recover wrote the old live map into the overlay"
    local err; err=$("$UC" del -n "$st" 2>&1) || die "del of a device from an earlier boot failed: $err"
    [[ $err == *"before the machine restarted"* ]] || die "del did not say why: $err"
    [[ $err == *"left as it was"* ]] || die "del did not name the snapshot: $err"
    [ ! -e "$UBLK_COW_RUN_DIR/$st.json" ] && [ ! -e "$UBLK_COW_RUN_DIR/$st.map" ] \
        || die "del left the old device's files"
    [ "$(digest "$ov")" = "$sum" ] || die "del wrote the old live map into the overlay"
    [ -e "$new" ] && [ "$(digest "$new")" = "$newsum" ] \
        || die "del removed or changed the snapshot's new overlay"
    rm -f "$new"
    dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
    cmp <(dd if="$dev" bs=1M skip=40 count=1 iflag=direct status=none) boot2 \
        || die "a flushed write is lost"
    "$UC" del -n "$id"
    base_unchanged
}

# dm_table NAME TABLE: switches dm device NAME to TABLE without freezing the
# file system on it (a freeze would write back what the test leaves dirty).
dm_table() { dmsetup suspend --nolockfs "$1"; dmsetup reload "$1" --table "$2"; dmsetup resume "$1"; }

# fsync_dev DEV: an fsync of the block device, which sends it a FLUSH.
fsync_dev() { python3 -c 'import os, sys; os.fsync(os.open(sys.argv[1], os.O_WRONLY))' "$1"; }

# The overlay's disk fails one writeback, then works again: the kernel
# reports the error once, so the device must fail every later FLUSH and
# FUA write itself, and never persist a map that names the lost data.
case_failed_overlay_sync() {
    local img=$WORK/syncfail.img mnt=$WORK/syncfail dev id ov lo sz err
    truncate -s 256M "$img"
    lo=$(losetup -f --show "$img"); sz=$(blockdev --getsz "$lo")
    dmsetup create ucsync --table "0 $sz linear $lo 0"
    # No journal and errors=continue: the file system stays writable.
    mkfs.ext4 -q -O ^has_journal /dev/mapper/ucsync
    mkdir -p "$mnt"; mount -o errors=continue /dev/mapper/ucsync "$mnt"
    ov=$mnt/ov
    dev=$(add --base "$BASE" --overlay "$ov"); id=$(dev_id "$dev")
    head -c 1M /dev/urandom > good
    dd if=good of="$dev" bs=1M seek=5 oflag=direct conv=fsync status=none
    dd if=/dev/urandom of="$dev" bs=1M seek=30 count=1 oflag=direct status=none
    dm_table ucsync "0 $sz error"
    if fsync_dev "$dev" 2>/dev/null; then die "a flush succeeded on a failing disk"; fi
    dm_table ucsync "0 $sz linear $lo 0"
    if fsync_dev "$dev" 2>/dev/null; then die "a flush after a failed sync succeeded"; fi
    if dd if=good of="$dev" bs=4k count=1 seek=2000 oflag=direct,dsync status=none 2>/dev/null; then
        die "a FUA write after a failed sync succeeded"
    fi
    "$UC" list | grep "$ov" | grep -qw failed || die "list does not show the device failed"
    [ "$(stat_of "$id" overlay_failed)" = 1 ] || die "stats do not show the device failed"
    # Its daemon dies: its live map may name the lost writes, and no new
    # daemon takes it.
    kill_daemon "$id"
    expect_fail "recover of a device whose flush failed" "$UC" recover -n "$id"
    err=$("$UC" recover -n "$id" 2>&1) || true
    [[ $err == *"last good flush"* ]] || die "recover did not say why: $err"
    if err=$("$UC" del -n "$id" 2>&1); then die "del of a failed device said nothing"; fi
    [[ $err == *"last good flush"* ]] || die "del did not say what became of the overlay: $err"
    [ ! -e "$UBLK_COW_RUN_DIR/$id.json" ] || die "del left the failed device"
    echo 3 > /proc/sys/vm/drop_caches
    dev=$(add --base "$BASE" --overlay "$ov" 2>warn.txt); id=$(dev_id "$dev")
    grep -q "flush of its last device failed" warn.txt || die "add did not warn: $(cat warn.txt)"
    cmp <(dd if="$dev" bs=1M skip=5 count=1 iflag=direct status=none) good \
        || die "data flushed before the failure is lost"
    cmp <(dd if="$dev" bs=1M skip=30 count=1 iflag=direct status=none) \
        <(dd if="$BASE" bs=1M skip=30 count=1 status=none) \
        || die "the overlay's map names data whose writeback failed"
    "$UC" del -n "$id"
    dev=$(add --base "$BASE" --overlay "$ov" 2>warn.txt); id=$(dev_id "$dev")
    [ ! -s warn.txt ] || die "a clean close did not clear the mark: $(cat warn.txt)"
    "$UC" del -n "$id"
    umount "$mnt"; dmsetup remove ucsync; losetup -d "$lo"
    base_unchanged
}

CASES+=("a failed overlay sync fails every later flush and persists nothing|case_failed_overlay_sync")
CASES+=("one overlay, one device: a second add refused, also while waiting for recover|case_overlay_one_device")
CASES+=("del of a killed daemon writes its live map into the overlay|case_del_dead_daemon_keeps_writes")
CASES+=("a state file from an earlier boot: recover refuses, del leaves the overlay|case_state_from_an_earlier_boot")
CASES+=("kill -9 of the daemon under fio verify, recover, $CYCLES cycles|case_kill9_fio")
CASES+=("kill -9 of the daemon under a mounted ext4, e2fsck and file contents after|case_kill9_ext4")
CASES+=("full overlay file system: errors, no damage, recovers|case_full_disk")
CASES+=("recover: bad input|case_recover_bad_input")
