#!/bin/bash
# The end-to-end suite, run inside a guest with ublk_drv (ci/vm-run.sh boots
# one). Sources every case file; each case asserts. The base's size and
# times are checked after each case, its whole content at the end.
# E2E_ONLY=REGEX runs only the cases whose name matches.
source "$(dirname "$0")/lib.sh"
need_ublk
rm -rf "$WORK"; mkdir -p "$WORK"; cd "$WORK"

BASE=$WORK/base.img
BASE_MB=192
say "kernel $(uname -r)"
say "making a ${BASE_MB} MiB base of random data"
head -c $((BASE_MB << 20)) /dev/urandom > "$BASE"
BASE_DIGEST=$(digest "$BASE")

add() { "$UC" add "$@"; }

# Size, modification and change time: a write, truncate or chmod of the
# base moves one of them. Cheap, so every case checks it; summary() hashes
# the whole content once more at the end.
base_stamp() { stat -c '%s %y %z' "$BASE"; }
BASE_STAMP=$(base_stamp)
base_unchanged() {
    local now; now=$(base_stamp)
    [ "$now" = "$BASE_STAMP" ] || die "the base changed (size, mtime, ctime: $now; before: $BASE_STAMP)"
}

CASES=()
for f in basic.sh cache.sh crash.sh powercut.sh security.sh chain.sh layers.sh service.sh remote.sh; do
    source "$(dirname "${BASH_SOURCE[0]}")/$f"
done
selected() { [[ $1 =~ ${E2E_ONLY:-} ]]; }
for c in "${CASES[@]}"; do
    name=${c%|*}
    if selected "$name" && [[ $name == "remote base"* ]]; then remote_start; break; fi
done
for c in "${CASES[@]}"; do
    name=${c%|*}
    selected "$name" && run_case "$name" "${c#*|}"
done
summary
