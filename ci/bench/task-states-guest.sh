#!/bin/bash
# Where a sequential reader's time goes over a 1 ms base (issue 26): for
# kernel loop and ublk-cow (--readahead auto), over dm-delay and over a
# null_blk disk that completes by a timer (as ci/bench/cache-guest.sh
# builds them), 4 KiB buffered and 4 KiB O_DIRECT reads at QD1, each run
# three times: unsampled (its throughput), with the daemon's threads
# sampled (ublk-cow only), and with every running or waiting task of the
# machine sampled (ci/bench/task-states.py).
#   env: RUNTIME (5 s)
source "$(dirname "$0")/../../tests/e2e/lib.sh"
set -e
need_ublk
RUNTIME=${RUNTIME:-5}
SAMPLE="python3 $ROOT/ci/bench/task-states.py"
B=/tmp/ublk-cow-task-states
tmpfs_at $B 1G
export TMPDIR=$B
head -c 256M /dev/urandom > $B/base.img
LO=$(losetup -f --show $B/base.img)
SZ=$(blockdev --getsz "$LO")
dmsetup create tsdelay --table "0 $SZ delay $LO 0 1"
modprobe null_blk nr_devices=1 gb=1 bs=4096 memory_backed=1 irqmode=2 completion_nsec=1000000
dd if=$B/base.img of=/dev/nullb0 bs=1M oflag=direct status=none
dmsetup create tsnullb --readonly --table "0 $SZ linear /dev/nullb0 0"

for base in /dev/mapper/tsdelay /dev/mapper/tsnullb; do
    for wl in buffered direct; do
        for sys in loop ublk-cow; do
            for how in none daemon machine; do
                [ "$sys/$how" != loop/daemon ] || continue
                echo 3 > /proc/sys/vm/drop_caches
                case $sys in
                    loop) dev=$(losetup -f --show "$base") ;;
                    ublk-cow) dev=$("$UC" add --base "$base" --readahead auto)
                              pid=$(pgrep -f "ublk-cow add --base $base" | head -n1) ;;
                esac
                fio --name=r --filename="$dev" --direct=$([ $wl = direct ] && echo 1 || echo 0) \
                    --rw=read --bs=4k --ioengine=psync --runtime="$RUNTIME" \
                    --output-format=terse > $B/fio.txt &
                fio_pid=$!
                sleep 0.5
                case $how in
                    daemon) $SAMPLE $((RUNTIME - 1)) "$pid" > $B/states.txt ;;
                    machine) $SAMPLE $((RUNTIME - 1)) > $B/states.txt ;;
                    none) : > $B/states.txt ;;
                esac
                wait $fio_pid
                say "$(basename "$base") $wl 4k $sys, sampled: $how: $(cut -d';' -f7 $B/fio.txt) KiB/s"
                cat $B/states.txt
                case $sys in
                    loop) losetup -d "$dev" ;;
                    ublk-cow) "$UC" del -n "$(dev_id "$dev")" ;;
                esac
            done
        done
    done
done
dmsetup remove tsdelay; dmsetup remove tsnullb; losetup -d "$LO"; rmmod null_blk
say "task states: done"
