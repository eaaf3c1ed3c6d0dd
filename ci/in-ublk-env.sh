#!/bin/bash
# Runs a guest script where ublk_drv is: directly on a host that has
# /dev/ublk-control (or can load ublk_drv), otherwise (or when VM_KERNEL is
# set) in a VM booted by ci/vm-run.sh.
set -eu
cd "$(dirname "$0")/.."
# VM_KERNEL names a guest kernel (see ci/vm-run.sh): always a VM then.
if [ -z "${VM_KERNEL:-}" ]; then
    modprobe ublk_drv 2>/dev/null || true
    if [ -e /dev/ublk-control ]; then
        exec bash "$@"
    fi
fi
echo "in-ublk-env: running $1 in a VM" >&2
# The guest does not inherit this environment: pass on the knobs of the
# guest scripts that are set here.
for v in E2E_ONLY CRASH_CYCLES REPLAY_STEPS REPLAY_SUBSETS ROUNDS RUNTIME SYSTEMS SERVERS CAP_MIBS WORKLOADS COPY_ONLY READAHEAD_ONLY SLOW_MS OVERLAY_FS PROFILE_BS UBLK_COW_OLD_BIN UBLK_COW_OLD2_BIN UBLK_COW_BIN; do
    if [ -n "${!v:-}" ]; then
        VM_ENV="${VM_ENV:-} $v='${!v}'"
    fi
done
export VM_ENV
exec bash ci/vm-run.sh "$@"
