#!/bin/bash
# The demo: a sample base image, a ublk-cow device over it, an ext4 file
# system on the device, files written and read back, and the proof that the
# base did not change. Runs where ublk_drv is (a VM from `make demo`).
source "$(dirname "$0")/lib.sh"
set -e
need_ublk
# (`cmd && say` would not stop the demo when cmd fails: `set -e` ignores
# the left side of `&&`.)
fail() { say "FAILED: $*"; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK"; cd "$WORK"

say "1. a 256 MiB sample base image holding an ext4 file system with one file"
truncate -s 256M base.img
mkfs.ext4 -q -F base.img
mkdir -p mnt; mount -o loop base.img mnt
echo "hello from the base image" > mnt/hello.txt
umount mnt
sha256sum base.img | tee base.sha256

say "2. ublk-cow add --base base.img --overlay demo.overlay"
DEV=$("$UC" add --base base.img --overlay "$WORK/demo.overlay")
say "   device: $DEV"
"$UC" list

say "3. mount the device, read the base's file, write new files"
mount "$DEV" mnt
cat mnt/hello.txt
head -c 32M /dev/urandom > mnt/random.bin
cp -a "$ROOT/src" mnt/src-copy
echo "written through ublk-cow" > mnt/new.txt
sync
sha256sum mnt/random.bin | tee random.sha256
umount mnt

say "4. remove the device, add it again from the same overlay, check the files"
"$UC" del -n "$(dev_id "$DEV")"
DEV=$("$UC" add --base base.img --overlay "$WORK/demo.overlay")
mount "$DEV" mnt
cat mnt/new.txt
sha256sum -c random.sha256
diff -r "$ROOT/src" mnt/src-copy || fail "the source tree copy differs"
say "   source tree copy matches"
umount mnt
e2fsck -fn "$DEV" >/dev/null || fail "e2fsck found errors"
say "   e2fsck: clean"
"$UC" del -n "$(dev_id "$DEV")"

say "5. the base is unchanged, the overlay holds the writes"
sha256sum -c base.sha256
mount -o loop,ro base.img mnt
[ ! -e mnt/new.txt ] || fail "base.img has new.txt: a write reached the base"
say "   base.img has no new.txt: writes went to the overlay"
umount mnt
say "   overlay: $(du -h --apparent-size demo.overlay | cut -f1) apparent, $(du -h demo.overlay | cut -f1) allocated"
say "demo finished"
