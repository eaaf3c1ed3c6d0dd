#!/bin/bash
# Boots a guest kernel that has ublk_drv (Debian 6.12 cloud image, or with
# VM_KERNEL=newest the newest Debian cloud kernel that ci/newest-kernel.sh
# fetched) under QEMU's software emulation, with this machine's root file
# system shared read-only and /tmp writable, and runs SCRIPT inside.
# SCRIPT's exit status comes back as this script's. Environment for the
# guest goes in VM_ENV.
#   usage: [VM_ENV="A=1 B=2"] [VM_KERNEL=6.12|newest] [VM_MEM=3G] [VM_TIMEOUT=2400]
#          ci/vm-run.sh SCRIPT [ARGS...]
set -eu
CACHE=${UBLK_COW_CACHE:-/opt/ublk-cow-ci}
case ${VM_KERNEL:-6.12} in
    6.12) K=$(ls /boot/vmlinuz-6.12.*cloud* 2>/dev/null | sort -V | tail -n1)
          setup=ci/vm-setup.sh ;;
    newest) K=$(cat "$CACHE/newest-kernel" 2>/dev/null || true)
          setup=ci/newest-kernel.sh ;;
    *) echo "vm-run: VM_KERNEL is 6.12 or newest, not ${VM_KERNEL}" >&2; exit 1 ;;
esac
if [ -z "$K" ] || [ ! -f "$K" ]; then
    echo "vm-run: no ${VM_KERNEL:-6.12} kernel; run $setup first" >&2
    exit 1
fi
echo "vm-run: booting $K" >&2
script=$(readlink -f "$1"); shift
log=$(mktemp /tmp/ublk-cow-vm.XXXXXX.log)
boot() {
    PATH=$CACHE/virtiofsd/bin:$PATH timeout "${VM_TIMEOUT:-2400}" \
        vng -r "$K" --disable-kvm -p 2 -m "${VM_MEM:-3G}" \
        --exec "env ${VM_ENV:-} bash $script $*" 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
}
set +e
boot "$@"; rc=$?
# vng right after another guest has been seen to exit at once without a
# word (exit 255); nothing ran then, so one more try is safe.
if [ "$rc" != 0 ] && [ ! -s "$log" ]; then
    echo "vm-run: vng exited $rc without output; trying once more" >&2
    sleep 5
    boot "$@"; rc=$?
fi
set -e
if [ "$rc" = 124 ]; then
    echo "vm-run: the guest did not finish within ${VM_TIMEOUT:-2400} s" >&2
elif [ "$rc" != 0 ] && ! grep -q "ublk-cow-guest:" "$log"; then
    echo "vm-run: the VM did not start or the guest script did not run (exit $rc); see $log" >&2
fi
exit "$rc"
