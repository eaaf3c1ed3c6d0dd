# The systems a benchmark compares (sourced by the guest scripts).
# `sys_up NAME` prints the device of a fresh instance over $BASE (in $B);
# `sys_down NAME DEV` removes it. Systems that write to their backing file
# (kernel loop, rublk) get a private copy of the base; the others keep their
# writes in an overlay/COW store in $B (guest tmpfs). $BASE_FILE is the base
# as a file in $B; $BASE is what the systems read: that file, or with
# SLOW_MS set the same bytes on a slower device (`slow_setup`).
RUBLK=${RUBLK:-/opt/ublk-cow-ci/rublk/bin/rublk}
SYSTEMS_ALL="loop dm-snap-4k dm-snap-64k qemu-nbd nbdkit-cow rublk ublk-cow ublk-cow-q1 ublk-cow-q2 ublk-cow-prealloc"
# Also: loop-sparse, kernel loop over a fresh sparse file beside the
# overlays (write workloads only), loop-sparse-buffered the same without
# direct I/O, and rublk-sparse, rublk's loop target
# over one; rublk-zc, rublk's loop target with zero copy (UBLK_F_AUTO_BUF_REG,
# kernel 6.16 or later: VM_KERNEL=newest); ublk-cow-copy and
# ublk-cow-copy-prealloc, ublk-cow in copy mode where zero copy is the
# default (--zero-copy=off); ublk-cow-user-copy, with ublk's user copy
# (--zero-copy=off --user-copy); ublk-cow-direct, base reads around the page
# cache (--base-io direct; for a base on a device: SLOW_MS), and
# ublk-cow-direct-raoff, the same without prefetch (--readahead off);
# ublk-cow-layer1 and ublk-cow-layersN (N layers, e.g. 3 or 8), a fresh
# overlay over a chain whose layers hold 256 MiB of random 4 KiB writes in
# all: in one layer, or 256/N MiB in each of N (`layers`, made once per
# boot); ublk-cow-old, another build of ublk-cow (UBLK_COW_OLD_BIN, e.g. an older
# commit's) for a before/after comparison in one boot, with a run
# directory of its own (older builds made it with other modes), and
# ublk-cow-old2 a third build (UBLK_COW_OLD2_BIN), to compare two changes.

# rotated ROUND SYSTEM...: the systems, starting ROUND - 1 places on.
rotated() {
    local n=$(($1 - 1)); shift
    local k=$((n % $#))
    echo "${@:k+1}" "${@:1:k}"
}

# The benchmarks' tmpfs $B and in it the base: 512 MiB of random data,
# $BASE_FILE = $BASE. Overlays and COW stores go in $OV ($TMPDIR too, where
# ublk-cow keeps its temporary overlays): $B, or a file system of
# `overlay_fs`.
bench_base() {
    B=/tmp/ublk-cow-bench
    tmpfs_at $B 2200M
    OV=$B
    export TMPDIR=$OV
    BASE_FILE=$B/base.img
    BASE=$BASE_FILE
    say "bench: 512 MiB base of random data in guest tmpfs ($(uname -r))"
    head -c 512M /dev/urandom > "$BASE_FILE"
}

# The slower device (`make bench-slow`): null_blk disks that keep their data
# in memory and complete every I/O SLOW_MS ms after it arrives, by a timer
# (device-mapper's delay target busies a CPU while I/O waits and rounds
# delays up to the guest's 4 ms tick). nullb0 holds the base, seen read-only
# through /dev/mapper/ucslowbase; nullb1 holds the private copy of loop and
# rublk (/dev/mapper/ucslowcopy). dm-linear trims both to the base's size.
slow_setup() {
    if [ -e /dev/nullb0 ]; then
        echo "slow_setup: null_blk is loaded already; rmmod null_blk first" >&2; return 1
    fi
    local bytes; bytes=$(stat -c %s "$BASE_FILE")
    modprobe null_blk nr_devices=2 gb=$(((bytes + (1 << 30) - 1) >> 30)) bs=4096 \
        memory_backed=1 irqmode=2 completion_nsec=$((SLOW_MS * 1000000))
    dd if="$BASE_FILE" of=/dev/nullb0 bs=1M oflag=direct status=none
    dmsetup create ucslowbase --readonly --table "0 $((bytes / 512)) linear /dev/nullb0 0"
    dmsetup create ucslowcopy --table "0 $((bytes / 512)) linear /dev/nullb1 0"
    BASE=/dev/mapper/ucslowbase
}

# Sectors read so far from the slow base's disk (empty without SLOW_MS).
# loop and rublk read their own copy, on the second disk.
slow_base_sectors() {
    [ -z "${SLOW_MS:-}" ] || awk '{print $3}' /sys/block/nullb0/stat
}

slow_teardown() {
    dmsetup remove ucslowbase; dmsetup remove ucslowcopy; rmmod null_blk
}

# overlay_fs FS [OPTIONS]: overlays and COW stores (and the sparse file of
# loop-sparse) on a fresh FS (ext4 or xfs, mounted with OPTIONS, discard
# unless given; "" for the defaults) on a RAM disk (brd), in $OV;
# `overlay_fs tmpfs` puts them back in $B. The base stays where it is.
overlay_fs() {
    local o=/tmp/ublk-cow-ovfs opts=${2-discard}
    if mountpoint -q $o; then umount $o; fi
    [ ! -e /dev/ram0 ] || rmmod brd
    OV=$B
    if [ "$1" != tmpfs ]; then
        modprobe brd rd_nr=1 rd_size=$((1200 * 1024))
        case $1 in
            ext4) mkfs.ext4 -q -F /dev/ram0 ;;
            xfs) modprobe xfs; mkfs.xfs -q -f /dev/ram0 ;;
            *) echo "overlay_fs: $1 is not ext4, xfs or tmpfs" >&2; return 1 ;;
        esac
        mkdir -p $o; mount ${opts:+-o "$opts"} /dev/ram0 $o
        OV=$o
    fi
    export TMPDIR=$OV
}

# A private writable copy of the base for the systems that write in place
# (kernel loop, rublk): a file in $B, or the slow copy device. Prints it.
private_copy() { # NAME
    if [ -n "${SLOW_MS:-}" ]; then
        dd if="$BASE_FILE" of=/dev/mapper/ucslowcopy bs=1M oflag=direct status=none
        echo /dev/mapper/ucslowcopy
    else
        cp --sparse=never "$BASE_FILE" "$B/$1.img"
        echo "$B/$1.img"
    fi
}

base_loop() { # the base as a read-only block device, made once
    if [ -b "$BASE" ]; then
        echo "$BASE"; return
    fi
    if [ -z "${BASE_RO_LOOP:-}" ]; then
        BASE_RO_LOOP=$(losetup -f --show --read-only --direct-io=on "$BASE")
    fi
    echo "$BASE_RO_LOOP"
}

wait_dev() { # wait until a block device answers with its full size
    for _ in $(seq 1 100); do
        [ "$(blockdev --getsize64 "$1" 2>/dev/null || echo 0)" -gt 0 ] && return 0
        sleep 0.1
    done
    echo "device $1 did not come up" >&2; return 1
}

# layers N: a chain of N layers over $BASE whose layers hold 256 MiB of
# random 4 KiB writes in all (256/N MiB in each, made with `snapshot`);
# prints the top layer. Made once per boot, in $B/layersN.
layers() {
    local n=$1 d=$B/layers$1 i dev
    if [ ! -e "$d/done" ]; then
        rm -rf "$d"; mkdir -p "$d"
        dev=$("$UC" add --base "$BASE" --overlay "$d/l1.cow")
        for i in $(seq 1 "$n"); do
            fio --name=layer --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite \
                --bs=4k --iodepth=32 --io_size=$((256 / n))M --randseed="$i" >/dev/null
            "$UC" del -n "$(dev_id "$dev")"
            "$UC" snapshot "$d/l$i.cow" --overlay "$d/l$((i + 1)).cow"
            [ "$i" = "$n" ] || dev=$("$UC" add --base "$d/l$i.cow" --overlay "$d/l$((i + 1)).cow")
        done
        rm -f "$d/l$((n + 1)).cow"
        touch "$d/done"
    fi
    echo "$d/l$n.cow"
}

sys_up() {
    local sz; sz=$(($(stat -c %s "$BASE_FILE") / 512))
    case $1 in
        loop)
            losetup --find --show --direct-io=on "$(private_copy loop)" ;;
        loop-sparse)
            # Every first write allocates, nothing is copied: the floor of
            # any sparse overlay on $OV's file system (it reads zeros, not
            # the base: for write workloads only).
            truncate -s "$(stat -c %s "$BASE_FILE")" $OV/sparse.img
            losetup --find --show --direct-io=on $OV/sparse.img ;;
        loop-sparse-buffered)
            # The same through the file's page cache, as ublk-cow writes a
            # small first write: allocation waits for writeback.
            truncate -s "$(stat -c %s "$BASE_FILE")" $OV/sparse.img
            losetup --find --show --direct-io=off $OV/sparse.img ;;
        dm-snap-4k|dm-snap-64k|dm-snap-64k-persistent)
            # N: the exception table lives in memory only; P (the
            # -persistent variant) commits it to the COW device, as a
            # COW device that survives a power cut must.
            local chunk=8 kind=N
            [ "$1" = dm-snap-4k ] || chunk=128
            [ "$1" = dm-snap-64k-persistent ] && kind=P
            truncate -s 700M $OV/snap.cow
            local cow; cow=$(losetup -f --show $OV/snap.cow)
            echo "$cow" > $B/snap.cowdev
            dmsetup create ucbsnap --table "0 $sz snapshot $(base_loop) $cow $kind $chunk"
            echo /dev/mapper/ucbsnap ;;
        qemu-nbd)
            modprobe nbd max_part=0 2>/dev/null || true
            qemu-img create -q -f qcow2 -b "$BASE" -F raw $OV/ov.qcow2
            qemu-nbd -c /dev/nbd0 -f qcow2 --cache=none --aio=native $OV/ov.qcow2 2>/dev/null \
                || qemu-nbd -c /dev/nbd0 -f qcow2 $OV/ov.qcow2
            wait_dev /dev/nbd0 && echo /dev/nbd0 ;;
        nbdkit-cow)
            modprobe nbd max_part=0 2>/dev/null || true
            # nbdkit forks into the background once it listens (loopback only).
            nbdkit -P $B/nbdkit.pid -i 127.0.0.1 -p 10810 --filter=cow file "$BASE"
            nbd-client -N default 127.0.0.1 10810 /dev/nbd1 -b 4096 >/dev/null
            wait_dev /dev/nbd1 && echo /dev/nbd1 ;;
        rublk-sparse)
            # rublk's loop target over a fresh sparse file beside the
            # overlays: a ublk server that allocates on first writes and
            # keeps no map (write workloads only, as loop-sparse).
            truncate -s "$(stat -c %s "$BASE_FILE")" $OV/rublk-sparse.img
            "$RUBLK" add loop -n 50 -f $OV/rublk-sparse.img >/dev/null
            wait_dev /dev/ublkb50 && echo /dev/ublkb50 ;;
        rublk|rublk-zc)
            local zc=; [ "$1" = rublk-zc ] && zc=-z
            "$RUBLK" add loop -n 50 $zc -f "$(private_copy rublk)" >/dev/null
            wait_dev /dev/ublkb50 && echo /dev/ublkb50 ;;
        ublk-cow) "$UC" add --base "$BASE" ;;
        ublk-cow-old) UBLK_COW_RUN_DIR=/run/ublk-cow-old \
            "${UBLK_COW_OLD_BIN:?the path of the other build}" add --base "$BASE" ;;
        ublk-cow-old2) UBLK_COW_RUN_DIR=/run/ublk-cow-old2 \
            "${UBLK_COW_OLD2_BIN:?the path of a third build}" add --base "$BASE" ;;
        ublk-cow-layer1) "$UC" add --base "$(layers 1)" --overlay $B/top.cow ;;
        ublk-cow-layers[0-9]*) "$UC" add --base "$(layers "${1#ublk-cow-layers}")" --overlay $B/top.cow ;;
        ublk-cow-bs64k) "$UC" add --base "$BASE" --block-size 64K ;;
        ublk-cow-q1) "$UC" add --base "$BASE" --queues 1 ;;
        ublk-cow-q2) "$UC" add --base "$BASE" --queues 2 ;;
        ublk-cow-prealloc) "$UC" add --base "$BASE" --preallocate ;;
        ublk-cow-direct) "$UC" add --base "$BASE" --base-io direct ;;
        ublk-cow-direct-raoff) "$UC" add --base "$BASE" --base-io direct --readahead off ;;
        ublk-cow-copy) "$UC" add --base "$BASE" --zero-copy=off ;;
        ublk-cow-copy-prealloc) "$UC" add --base "$BASE" --zero-copy=off --preallocate ;;
        ublk-cow-user-copy) "$UC" add --base "$BASE" --zero-copy=off --user-copy ;;
        *) echo "unknown system $1" >&2; return 1 ;;
    esac
}

sys_down() {
    case $1 in
        loop) losetup -d "$2"; rm -f $B/loop.img ;;
        loop-sparse|loop-sparse-buffered) losetup -d "$2"; rm -f $OV/sparse.img ;;
        dm-snap-*) dmsetup remove ucbsnap; losetup -d "$(cat $B/snap.cowdev)"; rm -f $OV/snap.cow ;;
        qemu-nbd) qemu-nbd -d /dev/nbd0 >/dev/null; rm -f $OV/ov.qcow2 ;;
        nbdkit-cow) nbd-client -d /dev/nbd1 >/dev/null; kill "$(cat $B/nbdkit.pid)"; rm -f $B/nbdkit.pid
            while pgrep -x nbdkit >/dev/null; do sleep 0.1; done ;;
        rublk-sparse) "$RUBLK" del -n 50 >/dev/null; rm -f $OV/rublk-sparse.img ;;
        rublk*) "$RUBLK" del -n 50 >/dev/null; rm -f $B/rublk.img ;;
        ublk-cow-old) UBLK_COW_RUN_DIR=/run/ublk-cow-old "$UBLK_COW_OLD_BIN" del -n "$(dev_id "$2")" ;;
        ublk-cow-old2) UBLK_COW_RUN_DIR=/run/ublk-cow-old2 "$UBLK_COW_OLD2_BIN" del -n "$(dev_id "$2")" ;;
        ublk-cow-layer*) "$UC" del -n "$(dev_id "$2")"; rm -f $B/top.cow ;;
        ublk-cow*) "$UC" del -n "$(dev_id "$2")" ;;
    esac
}

# fio_record FIO_JSON SYSTEM WORKLOAD ROUND RUNS [BASE_BYTES]: appends the
# run's IOPS and MiB/s (reads and writes together), and the bytes read from
# the slow base when given, to RUNS, and prints it as the
# "bench-json: {...}" line that ci/bench/run.sh collects.
fio_record() {
    python3 - "$1" "$2" "$3" "$4" "${6:-}" >> "$5" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
r, w = j["read"], j["write"]
rec = {"system": sys.argv[2], "workload": sys.argv[3], "round": int(sys.argv[4]),
       "iops": r["iops"] + w["iops"],
       "mib_s": (r["bw_bytes"] + w["bw_bytes"]) / 2**20}
if sys.argv[5]:
    rec["base_read_bytes"] = int(sys.argv[5])
print(json.dumps(rec))
PY
    echo "bench-json: $(tail -n1 "$5")"
}

# Untimed preparation of a fresh device for a workload. randread-4k-written
# reads the first 64 MiB after every 4 KiB block of it was written once.
# The seqread-*-written workloads read the same 64 MiB from its start, in
# order, after half of its 4 KiB blocks, chosen at random, were written
# (fio's random map writes each block once): about half of the blocks are
# in the overlay, scattered among the base's, as on a disk in use, so
# almost every request spans runs of both.
prepare() {
    case $2 in
        randread-4k-written)
            fio --name=fill --filename="$1" --direct=1 --ioengine=io_uring --rw=randwrite \
                --bs=4k --iodepth=32 --size=64M >/dev/null ;;
        randwrite-4k-sync-written)
            fio --name=fill --filename="$1" --direct=1 --ioengine=io_uring --rw=write \
                --bs=1m --iodepth=8 --size=64M --end_fsync=1 >/dev/null ;;
        seqread-*-written)
            fio --name=fill --filename="$1" --direct=1 --ioengine=io_uring --rw=randwrite \
                --bs=4k --iodepth=32 --size=64M --io_size=32M >/dev/null ;;
    esac
}
