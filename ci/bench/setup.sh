#!/bin/bash
# What `make bench` needs besides the VM tools: the rublk ublk loop target
# (the ublk round-trip baseline), matplotlib for the chart, xfsprogs, perf.
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
# Debian packages: mkfs.xfs, for overlays on xfs (OVERLAY_FS); perf, for
# ci/bench/written-profile-guest.sh.
need=()
dpkg -s xfsprogs >/dev/null 2>&1 || need+=(xfsprogs)
command -v perf >/dev/null || need+=(linux-perf)
[ ${#need[@]} = 0 ] || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}
