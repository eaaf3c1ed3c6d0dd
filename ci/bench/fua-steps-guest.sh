#!/bin/bash
# The steps of one FUA write at QD1, traced (issue 24): for each system
# (default ublk-cow rublk-sparse), a fresh ext4 on a RAM disk (brd) under
# its file, 4 s of random 4 KiB first writes with FUA (fio --sync=1,
# untraced IOPS printed), then the median time of each step of a write
# from a trace of a second run (`fua_steps`, ci/bench/fua.sh).
#   bash ci/in-ublk-env.sh ci/bench/fua-steps-guest.sh
#   env: SYSTEMS (ublk-cow rublk-sparse; any of ci/bench/systems.sh)
source "$(dirname "$0")/../../tests/e2e/lib.sh"
source "$(dirname "$0")/systems.sh"
set -e
need_ublk
source "$(dirname "$0")/fua.sh"
bench_base
for sys in ${SYSTEMS:-ublk-cow rublk-sparse}; do
    overlay_fs ext4 ""
    dev=$(sys_up "$sys")
    echo "fua-steps: $sys: $(fua "$dev" 0 4 --output-format=terse | cut -d';' -f49) IOPS untraced"
    fua_steps "$sys" "$dev"
    sys_down "$sys" "$dev"
done
overlay_fs tmpfs
