# Shared helpers of the guest scripts (sourced). Runs as root inside the VM.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
UC=${UBLK_COW_BIN:-$ROOT/target/release/ublk-cow}
WORK=${WORK:-/tmp/ublk-cow-e2e}
export UBLK_COW_RUN_DIR=${UBLK_COW_RUN_DIR:-/run/ublk-cow}
PASS=0
FAIL=0
FAILED=()

say() { echo "ublk-cow-guest: $*"; }

# Loads ublk_drv; its absence is a failure, not a skip.
need_ublk() {
    modprobe loop 2>/dev/null || true
    modprobe ublk_drv 2>/dev/null
    if [ ! -e /dev/ublk-control ]; then
        say "FATAL: /dev/ublk-control is missing: this kernel has no ublk_drv"
        exit 1
    fi
}

# tmpfs_at DIR SIZE: a tmpfs of SIZE at DIR (made, mounted once).
tmpfs_at() { mkdir -p "$1"; mountpoint -q "$1" || mount -t tmpfs -o size="$2" tmpfs "$1"; }

# How many ublk block devices there are.
ublk_devices() { ls /dev | grep -c '^ublkb' || true; }

# Device number of a /dev/ublkbN path.
dev_id() { echo "${1#/dev/ublkb}"; }

# A digest of file or device $1's content, to compare contents with: MD5,
# the quickest of the coreutils digests in the emulated guest (nothing here
# defends against anyone).
digest() { md5sum "$1" | cut -d' ' -f1; }

# The pid of device ID's daemon, from its state file.
daemon_pid() { grep -o '"pid": *[0-9]*' "$UBLK_COW_RUN_DIR/$1.json" | grep -o '[0-9]*$'; }

# stat_of ID NAME: one counter of `ublk-cow stats`.
stat_of() { "$UC" stats -n "$1" --json | grep -o "\"$2\": *[0-9]*" | grep -o '[0-9]*$'; }

# is_zero_copy ID: device ID moves data with zero copy (`add --zero-copy`).
is_zero_copy() {
    "$UC" list --json | python3 -c 'import json,sys
sys.exit(0 if any(d["id"] == int(sys.argv[1]) and d["zero_copy"] for d in json.load(sys.stdin)) else 1)' "$1"
}

# is_user_copy ID: device ID moves data with ublk's user copy (`--user-copy`,
# taken where the kernel has no zero copy).
is_user_copy() {
    "$UC" list --json | python3 -c 'import json,sys
sys.exit(0 if any(d["id"] == int(sys.argv[1]) and d["user_copy"] for d in json.load(sys.stdin)) else 1)' "$1"
}

# dev_queues ID: the queues of device ID (`add --queues`).
dev_queues() {
    "$UC" list --json | python3 -c 'import json,sys
print(next(d["queues"] for d in json.load(sys.stdin) if d["id"] == int(sys.argv[1])))' "$1"
}

# kernel_has_zero_copy: this kernel's ublk_drv offers UBLK_F_AUTO_BUF_REG
# (merged in Linux 6.16).
kernel_has_zero_copy() {
    [ "$(printf '6.16\n%s\n' "$(uname -r | cut -d- -f1)" | sort -V | head -n1)" = 6.16 ]
}

# Fails the current case with a message.
die() { say "  FAILED: $*"; return 1; }

# expect_fail DESC CMD...: CMD must fail with exactly one line on stderr.
expect_fail() {
    local desc=$1; shift
    local err rc
    err=$("$@" 2>&1 >/dev/null) && rc=0 || rc=$?
    if [ "$rc" = 0 ]; then die "$desc: succeeded but should fail"; return 1; fi
    if [ "$(printf '%s\n' "$err" | wc -l)" != 1 ] || [ -z "$err" ]; then
        die "$desc: expected one error line, got: $err"; return 1
    fi
    say "  refused as expected ($desc): $err"
}

# run_case NAME "FUNCTION [ARGS]": runs one case and records pass/fail.
run_case() {
    local name=$1 fn=$2
    say "case: $name"
    local t0=$SECONDS
    # A subshell of its own (not an `if` condition), so that `set -e` holds
    # and the first failing command fails the case.
    # shellcheck disable=SC2086 # FUNCTION and its words
    ( set -e; $fn )
    if [ $? = 0 ]; then
        PASS=$((PASS + 1)); say "ok - $name ($((SECONDS - t0)) s)"
    else
        FAIL=$((FAIL + 1)); FAILED+=("$name"); say "not ok - $name ($((SECONDS - t0)) s)"
        "$UC" del --all >/dev/null 2>&1 || true
    fi
}

summary() {
    "$UC" del --all >/dev/null 2>&1 || true
    if [ -n "${BASE_DIGEST:-}" ] && [ "$(digest "$BASE")" != "$BASE_DIGEST" ]; then
        FAIL=$((FAIL + 1)); FAILED+=("the base's content changed during the suite")
    fi
    for n in "${FAILED[@]}"; do say "failed case: $n"; done
    echo "$PASS passed, $FAIL failed"
    [ "$FAIL" = 0 ]
}

# One short hash per 512-byte sector of file or device $1.
sector_hashes() { python3 "$ROOT/tests/e2e/logwrites.py" sectors "$1"; }

# Power-cut replay of a dm-log-writes log $pc/log.img (logwrites.py): into a
# copy of $pc/work.img the entries [$1, $2) kept by $3 (all or durable),
# mounted, the overlay $pc/mnt/ov added over the base $small, and the sector
# hashes of its device left in $pc/got. $pc and $small are the caller's.
pc_point() {
    cp "$pc/work.img" "$pc/snap.img"
    python3 "$ROOT/tests/e2e/logwrites.py" replay "$pc/log.img" "$pc/snap.img" "$1" "$2" "$3"
    local sl; sl=$(losetup -f --show "$pc/snap.img")
    mount "$sl" "$pc/mnt" || {
        dmesg | tail -n 8; losetup -d "$sl"; die "entry $2 ($3): the file system does not mount"; return 1
    }
    local d; d=$("$UC" add --base "$small" --overlay "$pc/mnt/ov") \
        || { umount "$pc/mnt"; losetup -d "$sl"; die "entry $2: the overlay is refused"; return 1; }
    sector_hashes "$d" > "$pc/got"
    "$UC" del -n "$(dev_id "$d")"
    umount "$pc/mnt"; losetup -d "$sl"
}
