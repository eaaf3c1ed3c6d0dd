#!/bin/bash
# What `make bench` needs besides the VM tools: the rublk ublk loop target
# (the ublk round-trip baseline), matplotlib for the chart, xfsprogs.
# Idempotent.
set -eu
cd "$(dirname "$0")/../.."
bash ci/setup.sh
CACHE=${UBLK_COW_CACHE:-/opt/ublk-cow-ci}
[ -x "$CACHE/rublk/bin/rublk" ] || {
    echo "bench-setup: cargo install rublk (a few minutes, once)" >&2
    cargo install -q --locked rublk --no-default-features --root "$CACHE/rublk"
}
python3 -c "import matplotlib" 2>/dev/null || pip install -q matplotlib
# mkfs.xfs, for overlays on xfs (OVERLAY_FS).
dpkg -s xfsprogs >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xfsprogs >/dev/null
}
# perf, for ci/bench/written-profile-guest.sh.
command -v perf >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
}
