#!/bin/bash
# Fetches, once, the newest Debian cloud kernel (trixie-backports) for a
# second run of the end-to-end suite (`make test-vm-newest`): ublk changes
# between kernels (7.3 completes a request committed short as a whole,
# where 6.12 serves the rest again). apt fetches it, checking the
# archive's signature, with a private state under $UBLK_COW_CACHE (default
# /opt/ublk-cow-ci); its modules go to /usr/lib/modules, where the guest
# (which shares this machine's root) looks for them. Idempotent. Writes
# the kernel image's path to $CACHE/newest-kernel for ci/vm-run.sh.
set -eu
CACHE=${UBLK_COW_CACHE:-/opt/ublk-cow-ci}
mkdir -p "$CACHE"
NEWEST_FILE=$CACHE/newest-kernel
if ! { [ -s "$NEWEST_FILE" ] && [ -f "$(cat "$NEWEST_FILE")" ]; }; then
    A=$CACHE/apt-newest
    mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/debs"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main" \
        > "$A/sources.list"
    apt_new() {
        "$@" -q -o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts=/dev/null \
            -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o APT::Sandbox::User=root
    }
    echo "newest-kernel: fetching the newest Debian cloud kernel (trixie-backports)" >&2
    apt_new apt-get update >/dev/null
    # The newest version that has both its image and its modules.
    V=$(apt_new apt-cache pkgnames linux-modules- | sed -n 's/^linux-modules-\(.*-cloud-amd64\)$/\1/p' \
        | while read -r v; do
            apt_new apt-cache show "linux-binary-$v" >/dev/null 2>&1 && echo "$v"
        done | sort -V | tail -n1)
    if [ -z "$V" ]; then
        echo "newest-kernel: no cloud kernel with its modules found in trixie-backports" >&2
        exit 1
    fi
    (cd "$A/debs" && rm -f ./*.deb && apt_new apt-get download "linux-binary-$V" "linux-modules-$V" >/dev/null)
    rm -rf "$A/root"; mkdir -p "$A/root"
    for d in "$A"/debs/*.deb; do dpkg-deb -x "$d" "$A/root"; done
    # Older packages put the image in /boot.
    [ -f "$A/root/boot/vmlinuz-$V" ] && mv "$A/root/boot/vmlinuz-$V" "$A/root/usr/lib/modules/$V/vmlinuz"
    rm -rf "/usr/lib/modules/$V"
    mv "$A/root/usr/lib/modules/$V" /usr/lib/modules/
    rm -rf "$A/root" "$A/debs"
    depmod "$V" 2>/dev/null
    [ -f "/usr/lib/modules/$V/vmlinuz" ] || { echo "newest-kernel: no vmlinuz in linux-binary-$V" >&2; exit 1; }
    echo "/usr/lib/modules/$V/vmlinuz" > "$NEWEST_FILE"
fi
echo "newest-kernel: $(cat "$NEWEST_FILE")" >&2
