#!/bin/bash
# Installs, once, what the end-to-end tests need to boot a guest kernel that has
# ublk_drv under QEMU's software emulation: a Debian 6.12 cloud kernel image,
# QEMU, virtme-ng (vng), a Rust virtiofsd, and the tools the guest suite calls
# (fio, e2fsprogs, dmsetup, nbd peers). Idempotent: a second run only checks.
# Cached under $UBLK_COW_CACHE (default /opt/ublk-cow-ci).
set -eu
CACHE=${UBLK_COW_CACHE:-/opt/ublk-cow-ci}
mkdir -p "$CACHE"

need=""
for c in qemu-system-x86_64 fio dmsetup mkfs.ext4 e2fsck blkdiscard losetup nbdkit nbd-client sha256sum; do
    command -v "$c" >/dev/null || need=1
done
ls /boot/vmlinuz-6.12.*cloud* >/dev/null 2>&1 || need=1
for p in libclang-dev busybox-static; do dpkg -s "$p" >/dev/null 2>&1 || need=1; done
if [ -n "$need" ]; then
    echo "vm-setup: installing Debian packages (kernel image, QEMU, fio, ...)" >&2
    apt-get update -qq
    K=$(apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -n1)
    if [ -z "$K" ]; then
        echo "vm-setup: no linux-image-6.12.*-cloud-amd64-unsigned package found" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        qemu-system-x86 fio nbdkit nbd-client dmsetup e2fsprogs util-linux busybox-static \
        libclang-dev libseccomp-dev libcap-ng-dev kmod "$K" >/dev/null
fi
# qemu-system-x86 from Debian replaces a newer qemu-utils (qemu-img,
# qemu-nbd) if one was there; bring back the matching one.
command -v qemu-nbd >/dev/null || {
    echo "vm-setup: installing qemu-utils" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
}
command -v vng >/dev/null || {
    echo "vm-setup: pip install virtme-ng" >&2
    pip install -q virtme-ng >/dev/null
}
[ -x "$CACHE/virtiofsd/bin/virtiofsd" ] || {
    echo "vm-setup: cargo install virtiofsd (a few minutes, once)" >&2
    cargo install -q --locked virtiofsd --root "$CACHE/virtiofsd"
}
echo "vm-setup: ready" >&2
